"""The upstream backend of `faqtune serve --backend URL`: an OpenAI-compatible engine (vLLM, llama.cpp's server)
generates, faqtune stays in front of it.

For each request faqtune retrieves (a grounded run), declines below the threshold without calling the engine,
renders the grounded conversation with the run's own chat template (the exact prompt text the in-process
engine tokenizes) and sends it to the engine's `/completions` endpoint with the run's name as `model` (vLLM:
`--lora-modules NAME=PATH`; llama-cpp-python: `model_alias`; see launch.py), always streamed, so deltas
reach the client as they come and a client that goes away closes the engine's stream (which aborts the
generation there). The answer is cleaned, cut at `stop` strings and cited by the same Answerer `finish` as
in-process. `--max-batch-size` bounds the requests in flight to the engine, `--queue-size` those waiting for
a slot (then 429). Engine failures become OpenAI-style errors (502 unreachable, bad status or malformed
stream; 504 timeout) and never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

import httpx2

from faqtune.errors import ModelError
from faqtune.generate import Answer, clean
from faqtune.models import load_tokenizer
from faqtune.prompting import TEMPLATE_MARKERS, encode_prompt, render
from faqtune.run import RunDir
from faqtune.serve import jobs
from faqtune.serve.engine import ServedModel, ServedModels
from faqtune.serve.http import APIError, printable
from faqtune.serve.index_watch import IndexWatcher
from faqtune.serve.jobs import GenSettings, Job, QueueFull, Result, Row, WorkerStopped

log = logging.getLogger("faqtune.serve")


@dataclass(frozen=True)
class Upstream:
    """Where generation happens: an OpenAI-compatible base URL (ending in /v1), its key, the time allowed."""

    url: str
    key: str | None = None
    timeout: float = 300.0  # seconds without a byte from the engine (it may queue requests before answering)
    connect_timeout: float = 10.0

    def __post_init__(self):
        problems = []
        if not self.url.startswith(("http://", "https://")):
            problems.append(f"`--backend` must be an http:// or https:// URL (e.g. http://127.0.0.1:8001/v1), "
                            f"got {self.url!r}")
        if not self.timeout > 0:
            problems.append(f"`--backend-timeout` must be > 0 seconds, got {self.timeout}")
        if problems:
            raise ModelError("\n".join(problems))
        object.__setattr__(self, "url", self.url.rstrip("/"))


class UpstreamError(Exception):
    """An engine failure, already worded for the client (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.api_error = APIError(status, message, "server_error", None, code)


# --- loading: tokenizers, templates and indexes, no weights ------------------------------------------------

def load_upstream_models(specs: list[str], trust_remote_code: bool = False):
    """The served names for an upstream engine: every run's tokenizer (its chat template) and grounded answerer
    (its index and threshold), and the bare base's tokenizer; no model weights are loaded here."""
    from transformers import AutoConfig

    runs, base = jobs.check_runs(specs, trust_remote_code)
    choice = [name for name, _, cfg in runs if cfg.grounding.mode == "retrieval" and cfg.grounding.choice]
    if choice:
        raise ModelError(f"cannot serve {', '.join(choice)} through --backend: grounding.choice scores the shown "
                         "entries with the model itself, which only the in-process engine can do")
    first_cfg = runs[0][2]
    base_name = jobs.served_base_name(runs)
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    context = jobs.context_length(config)
    entries: dict[str, ServedModel] = {}
    for name, run, cfg in runs:
        tokenizer = run.tokenizer()
        answerer = jobs.build_answerer(None, tokenizer, cfg, run.root)
        watch = IndexWatcher(name, answerer, RunDir(run.root).index_dir) if hasattr(answerer, "index") else None
        entries[name] = ServedModel(name, answerer, name, tokenizer, context, answerer.system_prompt, run.root,
                                    watch)
    tokenizer = load_tokenizer(base, first_cfg.trust_remote_code)
    entries[base_name] = ServedModel(base_name, jobs.build_answerer(None, tokenizer, first_cfg, None), None,
                                     tokenizer, context)
    return ServedModels(entries)


def check_backend(upstream: Upstream, names: list[str]) -> list[str]:
    """At startup: the engine's `/models`, compared with the names served; problems are logged, not raised
    (the engine may start after faqtune, or list models differently), and returned."""
    headers = {"Authorization": f"Bearer {upstream.key}"} if upstream.key else {}
    try:
        response = httpx2.get(f"{upstream.url}/models", headers=headers, timeout=upstream.connect_timeout,
                              trust_env=False)
        response.raise_for_status()
        known = {m.get("id") for m in response.json().get("data", []) if isinstance(m, dict)}
    except (httpx2.HTTPError, ValueError, AttributeError) as e:
        problem = f"the backend {upstream.url} did not list its models ({type(e).__name__}: {printable(str(e), 120)})"
        log.warning("%s; requests fail with 502 until it answers", problem)
        return [problem]
    missing = [name for name in names if name not in known]
    if missing:
        log.warning("the backend %s does not list %s (it serves: %s); `faqtune serve-config` prints a launch "
                    "command that names every run", upstream.url, ", ".join(missing), ", ".join(sorted(map(str, known))))
    return [f"not listed by the backend: {name}" for name in missing]


# --- the engine's stream -----------------------------------------------------------------------------------

def completion_request(model: str, prompt: str, s: GenSettings, gen, n: int) -> dict[str, Any]:
    """The `/completions` body: the run's decoding, spelled for both engines (vLLM reads `repetition_penalty`
    and `top_k`, llama-cpp-python `repeat_penalty` and `top_k`; each ignores the other's), greedy at 0."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": s.max_new_tokens,
                            "temperature": s.temperature, "top_p": s.top_p if s.temperature > 0 else 1.0, "n": n,
                            "stream": True, "repetition_penalty": gen.repetition_penalty,
                            "repeat_penalty": gen.repetition_penalty}
    if s.temperature > 0:
        body["top_k"] = gen.top_k
    if s.stop:
        body["stop"] = list(s.stop)
    return body


def upstream_message(status: int, payload: bytes) -> str:
    """An engine's error answer in one printable line (its own `error.message` when it sent OpenAI's shape)."""
    try:
        data = json.loads(payload)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message", error) if isinstance(error, dict) else error
    except ValueError:
        message = payload.decode("utf-8", "replace")
    return printable(str(message).strip() or f"HTTP {status}", 300)


def parse_chunk(line: str) -> dict | None:
    """One server-sent event line -> its JSON object; None for comments, blank lines and `[DONE]`."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    try:
        chunk = json.loads(data)
    except ValueError:
        raise UpstreamError(502, "the generation backend sent a malformed stream (a chunk that is not JSON)",
                            "backend_bad_response") from None
    if not isinstance(chunk, dict) or "error" in chunk:
        message = chunk.get("error") if isinstance(chunk, dict) else chunk
        if isinstance(message, dict):
            message = message.get("message", message)
        raise UpstreamError(502, f"the generation backend failed mid-answer: {printable(str(message), 300)}",
                            "backend_error")
    if not isinstance(chunk.get("choices", []), list):
        raise UpstreamError(502, "the generation backend sent a malformed stream (`choices` is not a list)",
                            "backend_bad_response")
    return chunk


@dataclass
class _Stream:
    """What the engine sent for one job: each generated choice's text and finish reason, and its usage."""

    texts: list[str]
    finish: list[str | None]
    done: bool = False


class UpstreamWorker:
    """The upstream backend, with the in-process BatchWorker's interface (submit, cancel, snapshot, start, stop).

    Its jobs are tasks on the server's event loop; retrieval and tokenization run in a thread, one at a time (a
    fast tokenizer fails when two threads use it at once, and the runs' indexes share one embedding model)."""

    def __init__(self, models, upstream: Upstream, queue_size: int = 64, max_in_flight: int = 8):
        self.models, self.upstream = models, upstream
        self.queue_size, self.max_in_flight = queue_size, max_in_flight
        self._tasks: dict[int, tuple[Job, asyncio.Task]] = {}  # id(job) ->
        self._slots: asyncio.Semaphore | None = None
        self._client: httpx2.AsyncClient | None = None
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._started = self._stopping = False
        self.stats = {"completed": 0, "cancelled": 0, "errors": 0, "backend_errors": 0, "index_reloads": 0,
                      "largest_in_flight": 0}

    # -- the HTTP side (all on the event loop) --------------------------------------------------------------
    def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.upstream.key}"} if self.upstream.key else {}
        timeout = httpx2.Timeout(self.upstream.timeout, connect=self.upstream.connect_timeout)
        limits = httpx2.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
        self._client = httpx2.AsyncClient(headers=headers, timeout=timeout, limits=limits, trust_env=False)
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._started = True

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job (each gets an error first); called as the app shuts down."""
        self._stopping = True
        for job, task in list(self._tasks.values()):
            job.emit("error", "the server is shutting down")  # nobody waits forever
            task.cancel()

    async def aclose(self) -> None:
        """Close the engine connections (after `stop`, as the app shuts down)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    @property
    def alive(self) -> bool:
        return self._started and not self._stopping

    def submit(self, job: Job) -> None:
        if self._stopping or not self._started:
            raise WorkerStopped()
        if self._waiting + self._running >= self.queue_size + self.max_in_flight:
            raise QueueFull(self.retry_after())
        self._waiting += 1
        self._tasks[id(job)] = (job, asyncio.get_running_loop().create_task(self._run(job)))

    def cancel(self, job: Job) -> None:
        """The client went away: stop waiting, or close the engine's stream (the engine aborts the request)."""
        if job.finished or job.cancelled.is_set():
            return
        job.cancelled.set()
        self.stats["cancelled"] += 1
        if id(job) in self._tasks:
            self._tasks[id(job)][1].cancel()

    def retry_after(self) -> int:
        return max(1, round(self._waiting / max(1, self.max_in_flight)) + 1)

    def snapshot(self) -> dict[str, Any]:
        return {"queued": self._waiting, "busy": self._running > 0, "in_flight": self._running,
                "alive": self.alive, "backend": self.upstream.url, **self.stats}

    # -- one job ------------------------------------------------------------------------------------------
    async def _run(self, job: Job) -> None:
        waiting = True
        try:
            async with self._slots:
                self._waiting, self._running, waiting = self._waiting - 1, self._running + 1, False
                self.stats["largest_in_flight"] = max(self.stats["largest_in_flight"], self._running)
                try:
                    await self._answer(job)
                finally:
                    self._running -= 1
        except asyncio.CancelledError:
            if not job.finished:
                job.emit("error", "the server is shutting down" if self._stopping else "cancelled")
        except UpstreamError as e:
            self.stats["backend_errors"] += 1
            log.warning("%s: %s", job.model, e)
            job.emit("error", e.api_error)
        except Exception:
            self.stats["errors"] += 1
            log.exception("answering a request to %s through %s failed", job.model, self.upstream.url)
            job.emit("error", "generation failed")
        finally:
            if waiting:
                self._waiting -= 1
            self._tasks.pop(id(job), None)
            job.finished = True

    def _prepare(self, name: str, messages: list[dict[str, str]]):
        """Retrieval (a grounded run) and the prompt, off the event loop: (conversation or None, context,
        prompt text, prompt tokens)."""
        entry = self.models.entries[name]
        with self._lock:
            if entry.index_watch is not None and entry.index_watch.check():  # `faqtune index` rebuilt it
                self.stats["index_reloads"] += 1
            conv, ctx = entry.answerer.prepare([messages])[0]
            if conv is None:
                return None, ctx, "", 0
            tokenizer = entry.answerer.tokenizer
            return conv, ctx, render(tokenizer, conv, add_generation_prompt=True), len(encode_prompt(tokenizer, conv))

    async def _answer(self, job: Job) -> None:
        entry = self.models.entries[job.model]
        s = job.settings
        conv, ctx, prompt, prompt_tokens = await asyncio.to_thread(self._prepare, job.model, job.messages)
        if conv is None:  # declined (or answered verbatim) without calling the engine
            answer = entry.answerer.unanswered(ctx)
            choices = await asyncio.to_thread(self._choices, entry, [answer] * s.n, s, [None] * s.n)
            return self._done(job, Result(choices, 0))
        n_gen = s.n if s.temperature > 0 else 1  # greedy: one answer, replicated
        per_row = [list(range(s.n))] if n_gen == 1 else [[k] for k in range(s.n)]
        rows = [Row(job, choices, sent=job.sent.get(choices[0], "")) for choices in per_row]
        body = completion_request(job.model, prompt, s, entry.answerer.gen, n_gen)
        got = await self._stream(body, rows, jobs.replaced_declines(entry.answerer), tuple(TEMPLATE_MARKERS) + s.stop)
        counts = await asyncio.to_thread(self._count, entry.answerer.tokenizer, got.texts)
        answers = []
        for k in range(n_gen):
            raw, tokens, stopped = got.texts[k], counts[k], got.finish[k] == "stop"
            answer = Answer(clean(raw), stopped, tokens + stopped, prompt_tokens, raw)
            answers.append(entry.answerer.finish(answer, ctx))
        one = n_gen == 1
        choices = await asyncio.to_thread(self._choices, entry, [answers[0 if one else k] for k in range(s.n)], s,
                                          [rows[0 if one else k] for k in range(s.n)])
        self._done(job, Result(choices, prompt_tokens))

    def _choices(self, entry, answers: list[Answer], s, rows: list) -> list:
        """The API choices of `answers` (`jobs.finish_choice`, which may count an entry's tokens: the tokenizer is
        used under the lock, as in `_count`)."""
        with self._lock:
            return [jobs.finish_choice(a, k, s, row, entry.answerer.tokenizer)
                    for k, (a, row) in enumerate(zip(answers, rows, strict=True))]

    def _count(self, tokenizer, texts: list[str]) -> list[int]:
        """Generated tokens, counted with the run's tokenizer (as in-process counts them; + 1 for the EOS)."""
        with self._lock:
            return [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]

    def _done(self, job: Job, result: Result) -> None:
        self.stats["completed"] += 1
        job.emit("done", result)

    async def _stream(self, body: dict, rows: list[Row], hold, markers: tuple[str, ...]) -> _Stream:
        """POST the completion and read its stream, sending each row's safe text as it grows."""
        url = f"{self.upstream.url}/completions"
        got = _Stream([""] * len(rows), [None] * len(rows))
        try:
            async with self._client.stream("POST", url, json=body) as response:
                if response.status_code >= 400:
                    payload = await response.aread()
                    raise UpstreamError(502, f"the generation backend answered {response.status_code}: "
                                             f"{upstream_message(response.status_code, payload[:4000])}",
                                        "backend_error")
                async for line in response.aiter_lines():
                    self._read_line(line, got, rows, hold, markers)
        except httpx2.TimeoutException:
            raise UpstreamError(504, f"the generation backend at {self.upstream.url} did not answer within "
                                     f"{self.upstream.timeout:g} s", "backend_timeout") from None
        except httpx2.ConnectError as e:
            raise UpstreamError(502, f"the generation backend at {self.upstream.url} cannot be reached "
                                     f"({printable(str(e), 120) or type(e).__name__})",
                                "backend_unavailable") from None
        except httpx2.HTTPError as e:
            raise UpstreamError(502, f"the connection to the generation backend broke mid-answer "
                                     f"({type(e).__name__})", "backend_bad_response") from None
        if not got.done:
            raise UpstreamError(502, "the generation backend's stream ended before the answer did (no "
                                     "finish_reason)", "backend_bad_response")
        return got

    @staticmethod
    def _read_line(line: str, got: _Stream, rows: list[Row], hold, markers: tuple[str, ...]) -> None:
        chunk = parse_chunk(line)
        if chunk is None:
            return
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0) if isinstance(choice, dict) else None
            text = choice.get("text") if isinstance(choice, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(rows) or not isinstance(text, str | None):
                raise UpstreamError(502, "the generation backend sent a malformed stream (a choice without a "
                                         "valid index or text)", "backend_bad_response")
            got.texts[index] += text or ""
            if choice.get("finish_reason"):
                got.finish[index] = choice["finish_reason"]
            jobs.send_safe(rows[index], got.texts[index], markers, hold)
        got.done = all(f is not None for f in got.finish)
