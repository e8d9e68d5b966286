"""What both generation backends of `faqtune serve` share: the served runs' names and checks, a request on its
way to a backend (`Job`) and back (`Result`), the bound-queue errors, and the streaming rules (what part of a
partial answer is safe to send, which may still turn into a replaced decline, how an answer becomes a choice).

The backends: engine.py (in-process: one base + every adapter, one batching worker thread) and
upstream.py (an OpenAI-compatible engine such as vLLM or llama.cpp's server generates; faqtune
retrieves, prompts, declines and cites in front of it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faqtune.config import FaqtuneConfig
from faqtune.errors import FaqtuneError, ModelError
from faqtune.generate import Answer, Answerer
from faqtune.grounding import DECLINE, make_answerer, starts_decline
from faqtune.loading import OpenedRun, open_run

log = logging.getLogger("faqtune.serve")


# --- the served runs ---------------------------------------------------------------------------------------

def parse_run_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """`RUN_DIR` or `NAME=RUN_DIR` -> (name, folder); the name defaults to the folder's name."""
    out: list[tuple[str, Path]] = []
    problems: list[str] = []
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or Path(spec).exists():
            name, path = Path(spec).resolve().name, spec
        name = name.strip()
        if not name or any(c.isspace() for c in name):
            problems.append(f"{spec!r}: a model name must be non-empty and without spaces (NAME=RUN_DIR)")
        elif name in [n for n, _ in out]:
            problems.append(f"two runs are named {name!r}: name them apart with NAME=RUN_DIR")
        else:
            out.append((name, Path(path)))
    if problems:
        raise ModelError("\n".join(problems))
    return out


DEFAULT_CONTEXT = 2048  # tokens, for a base whose config does not say its context


def context_length(config: Any) -> int:
    """The base's context in tokens (its config's max_position_embeddings), for the limits both backends set and
    the engines `serve-config` launches."""
    return int(getattr(config, "max_position_embeddings", 0) or DEFAULT_CONTEXT)


def base_display_name(base_model: str) -> str:
    """The name the bare base is served under: an alias or hub id as written, a folder by its name."""
    return Path(base_model).name if Path(base_model).expanduser().exists() else base_model


def served_base_name(runs: list[tuple[str, OpenedRun, FaqtuneConfig]]) -> str:
    """The bare base's served name (`base_display_name`), which no run may also be named."""
    name = base_display_name(runs[0][2].base_model)
    if name in [run_name for run_name, _, _ in runs]:
        raise ModelError(f"the run name {name!r} is the base model's name: rename the run with NAME=RUN_DIR")
    return name


def build_answerer(model, tokenizer, cfg, run_dir: Path | None) -> Answerer:
    """The one place the server builds an Answerer: a run's (grounded when it was trained with retrieval:
    it retrieves, declines below the threshold and cites), or the bare base's when run_dir is None."""
    if run_dir is None:
        return Answerer(model, tokenizer, cfg.generation, None)
    return make_answerer(run_dir, model, tokenizer, cfg)


def check_runs(specs: list[str], trust_remote_code: bool = False) -> tuple[list[tuple[str, OpenedRun,
                                                                                       FaqtuneConfig]], str]:
    """Open every run (a run directory, a pushed adapter folder or its Hub id); one error listing every problem
    (missing runs, adapters, mixed bases). Returns (name, run, its settings) for each, and the shared base."""
    runs, problems = [], []
    for name, path in parse_run_specs(specs):
        try:
            run = open_run(path, trust_remote_code=trust_remote_code)
        except FaqtuneError as e:
            problems.append(str(e))
            continue
        if not run.has_adapter():
            problems.append(f"{path}: no adapter/adapter_config.json (did training finish?)")
            continue
        if run.cfg.generation.merged not in ("none", "auto"):  # one base serves every adapter: nothing is merged
            log.warning("%s: generation.merged %r is not used by serve (every run's adapter is served on the one "
                        "shared 4-bit base); ask and chat use it", name, run.cfg.generation.merged)
        runs.append((name, run, run.cfg))
    if problems:
        raise ModelError("cannot serve:\n" + "\n".join(f"  - {p}" for p in problems))
    if not runs:
        raise ModelError("cannot serve: give at least one run directory")
    kinds = {(str(Path(run.base).resolve()) if Path(run.base).exists() else run.base, cfg.quantization.mode,
              cfg.quantization.quant_type) for _, run, cfg in runs}
    if len(kinds) > 1:
        lines = [f"  - {name}: base_model {cfg.base_model} ({cfg.quantization.mode})" for name, _, cfg in runs]
        raise ModelError("runs served together must share the same base model and quantization; got:\n"
                         + "\n".join(lines) + "\nserve them with separate `faqtune serve` commands")
    return runs, runs[0][1].base


# --- jobs --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenSettings:
    """Generation settings of a request; requests with equal settings (and model) share a batch."""

    max_new_tokens: int
    temperature: float
    top_p: float
    n: int = 1
    stop: tuple[str, ...] = ()


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    completion_tokens: int
    streamed: str = ""  # the text already sent as deltas (a prefix of `text`)
    source: dict | None = None
    declined: bool = False
    related: tuple[dict, ...] = ()  # other FAQ entries offered with it (Answer.related)


@dataclass
class Result:
    choices: list[Choice]
    prompt_tokens: int


@dataclass
class Job:
    """One request, from the HTTP side to the worker and back (events cross threads via the event loop)."""

    model: str
    messages: list[dict[str, str]]
    settings: GenSettings
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # answered (or failed): set before the answer is emitted, so a late cancel is a no-op
    sent: dict[int, str] = field(default_factory=dict)  # choice index -> text streamed so far (kept on a retry)

    @property
    def key(self) -> tuple:
        return (self.model, self.settings)

    def emit(self, kind: str, payload: Any) -> None:
        """("delta", (choice index, text)) | ("done", Result) | ("error", message), to the request's coroutine."""
        if kind != "delta":
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class WorkerStopped(Exception):
    pass


@dataclass
class Row:
    job: Job
    choices: list[int]  # choice indices this generated row feeds (several when greedy n > 1 is replicated)
    tokens: list[int] = field(default_factory=list)  # generated so far, up to (without) its stop token
    seen: int = 0  # generated positions already read (tokens, the stop token, pads after it)
    ended: bool = False
    stop_hit: bool = False  # ended on a stop string (which `clean` may have stripped, e.g. "\n\n")
    sent: str = ""


def streamable(text: str, markers: tuple[str, ...]) -> str:
    """The part of a partial answer that is safe to send: what `clean` and the stop strings will keep.

    Cut at the first marker or stop string; hold back a tail that may still grow into one, trailing whitespace
    (the final answer is stripped) and an incomplete UTF-8 character.
    """
    cuts = [i for i in (text.find(m) for m in markers) if i != -1]
    text = text[:min(cuts)] if cuts else text
    hold = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), hold, -1):
            if text.endswith(m[:k]):
                hold = k
                break
    text = text[:len(text) - hold]
    return text.rstrip().rstrip("\ufffd").lstrip()


def send_safe(row: Row, text: str, markers: tuple[str, ...], hold: Callable[[str], bool] | None) -> None:
    """Stream the part of a row's partial answer `text` that the final answer will keep (see `streamable`),
    to every choice the row feeds; nothing while `hold` says the answerer may still replace it."""
    if not row.job.stream or (hold is not None and not row.sent and hold(text)):
        return
    safe = streamable(text, markers)
    if len(safe) > len(row.sent) and safe.startswith(row.sent):
        for index in row.choices:
            row.job.emit("delta", (index, safe[len(row.sent):]))
            row.job.sent[index] = safe
        row.sent = safe


def replaced_declines(answerer) -> Callable[[str], bool] | None:
    """For a grounded answerer that answers its model's declines with the top entry (grounding.fallback):
    the test for a partial answer that may still become such a decline, so the stream holds it back and sends
    what `finish` returns instead (else the stream would show a decline the non-streamed answer replaced)."""
    grounding = getattr(answerer, "grounding", None)
    if grounding is None or not getattr(grounding, "fallback", False):
        return None
    def may_become_decline(text: str) -> bool:
        return starts_decline(text, grounding.decline_message) or DECLINE.search(text) is not None

    return may_become_decline


def finish_choice(answer: Answer, index: int, s: GenSettings, row: Row | None, tokenizer) -> Choice:
    """An Answer -> an API choice: cut at the first stop string; finish "stop" on EOS or a stop string. An FAQ
    entry said verbatim (grounding's fallback, choice step, too-long prompt) is cut at the request's max_tokens,
    finish "length", as generated text is, and counted by its tokens: it went out whole, counted as the
    generated decline it replaced (or as 0). The decline message is said whole, as a fixed message."""
    text, hit, stopped, tokens = answer.text, bool(row and row.stop_hit), answer.stopped, answer.new_tokens
    if answer.source and answer.source.get("verbatim"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stopped, tokens = len(ids) <= s.max_new_tokens, min(len(ids), s.max_new_tokens)
        text = text if stopped else tokenizer.decode(ids[:tokens], skip_special_tokens=True)
    cuts = [i for i in (text.find(stop) for stop in s.stop) if i != -1]
    if cuts:
        text, hit = text[:min(cuts)], True
    finish = "stop" if stopped or hit else "length"
    streamed = row.sent if row else ""
    return Choice(index, text, finish, tokens, streamed, answer.source, answer.declined, answer.related)
