"""The in-process backend of `faqtune serve` (the default; upstream.py is the other): every run's adapter
on one shared base, and one worker that batches.

One base model is loaded (4-bit as trained); each run's LoRA adapter is loaded onto it with PEFT under its own
adapter name, and the bare base is served with the adapters disabled. A single worker thread owns the model:
it takes queued requests, groups those with the same model and generation settings into one left-padded batch
and answers them through `Answerer.answer_batch`, the one answering path of the project. A `StoppingCriteria`
watches every decoding step (several tokens per step under prompt lookup) to stream each row's new text, apply
`stop` strings and stop the rows of clients that went away. A failed batch is answered again one request at a
time, so a bad request fails alone; a grounded run's index is reloaded when rebuilt (index_watch.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria

from faqtune.generate import Answerer
from faqtune.loading import load_adapters
from faqtune.models import load_tokenizer
from faqtune.prompting import TEMPLATE_MARKERS
from faqtune.run import RunDir
from faqtune.serve.index_watch import IndexWatcher
from faqtune.serve.jobs import (
    Job,
    QueueFull,
    Result,
    Row,
    WorkerStopped,
    build_answerer,
    check_runs,
    context_length,
    finish_choice,
    replaced_declines,
    send_safe,
    served_base_name,
)

log = logging.getLogger("faqtune.serve")


# --- the served models -------------------------------------------------------------------------------------

@dataclass
class ServedModel:
    """One name a client can ask for: a run's adapter, or the bare base (adapter None)."""

    name: str
    answerer: Answerer
    adapter: str | None  # PEFT adapter name on the shared model; None = adapters disabled
    count_tokenizer: Any  # what the HTTP side counts prompt tokens with (the answerer's tokenizer, loaded once)
    context_length: int
    system_prompt: str | None = None
    run_dir: Path | None = None
    index_watch: Any = None  # index_watch.IndexWatcher of a grounded run: reloads a rebuilt index


class ServedModels:
    """The name -> model table, and the switch between adapters on the one shared model."""

    def __init__(self, entries: dict[str, ServedModel], peft_model=None):
        self.entries, self.peft_model = entries, peft_model
        self.lock = threading.Lock()  # two workers (e.g. two apps in one process) never interleave batches

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    @contextlib.contextmanager
    def activate(self, entry: ServedModel):
        """Select the entry's adapter (or none), for one batch."""
        with self.lock:
            if self.peft_model is None:
                yield
            elif entry.adapter is None:
                with self.peft_model.disable_adapter():
                    yield
            else:
                self.peft_model.set_adapter(entry.adapter, inference_mode=True)
                yield


def load_served_models(specs: list[str], trust_remote_code: bool = False) -> ServedModels:
    """Load the shared base once, every run's adapter onto it, and an Answerer per name (plus the bare base).

    `trust_remote_code` comes from the command line only (`faqtune serve --trust-remote-code`)."""
    runs, base = check_runs(specs, trust_remote_code)
    first_cfg = runs[0][2]
    base_name = served_base_name(runs)
    # internal adapter names: PEFT keeps adapters in module dicts, where a user's name (dots...) may not fit
    model = load_adapters(base, first_cfg, {f"run{i}": run.adapter_dir for i, (_, run, _) in enumerate(runs)})
    for name, run, _ in runs:
        log.info("adapter %s loaded from %s", name, run.root)
    context = context_length(model.config)

    entries: dict[str, ServedModel] = {}
    for i, (name, run, cfg) in enumerate(runs):
        tokenizer = run.tokenizer()
        answerer = build_answerer(model, tokenizer, cfg, run.root)
        watch = IndexWatcher(name, answerer, RunDir(run.root).index_dir) if hasattr(answerer, "index") else None
        entries[name] = ServedModel(name, answerer, f"run{i}", tokenizer, context,
                                    answerer.system_prompt, run.root, watch)
    tokenizer = load_tokenizer(base, first_cfg.trust_remote_code)
    answerer = build_answerer(model, tokenizer, first_cfg, None)
    entries[base_name] = ServedModel(base_name, answerer, None, tokenizer, context)
    return ServedModels(entries, model)


# --- the batching worker ------------------------------------------------------------------------------

class BatchMonitor(StoppingCriteria):
    """Called by generate() after every decoding step: streams new text, applies stop strings, stops rows of
    cancelled requests (only those rows: the rest of the batch goes on)."""

    def __init__(self, rows: list[Row], tokenizer, stop_ids: list[int], stops: tuple[str, ...],
                 hold: Callable[[str], bool] | None = None, prompt_len: int | None = None):
        self.rows, self.tokenizer, self.stop_ids, self.stops = rows, tokenizer, set(stop_ids), stops
        self.hold = hold  # True for a partial answer not to stream yet (the answerer may still replace it)
        self.markers = tuple(TEMPLATE_MARKERS) + stops
        self.cancelled_rows = 0
        self.prompt_len = prompt_len  # the batch's (left-padded) prompt width: generated tokens start there

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        # input_ids: (rows, prompt + generated so far)
        if input_ids.shape[0] != len(self.rows):  # generate() was called on another batch: only cancel
            stop = all(r.job.cancelled.is_set() for r in self.rows)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
        # a step may add several tokens per row (prompt lookup accepts up to N + 1): read all the new ones
        if self.prompt_len is None:  # generate() was given no input_ids keyword: the first step added one token
            self.prompt_len = input_ids.shape[1] - 1
        generated = input_ids[:, self.prompt_len:].tolist()
        done = []
        for row, ids in zip(self.rows, generated, strict=True):
            if not row.ended and row.job.cancelled.is_set():
                row.ended = True
                self.cancelled_rows += 1
            elif not row.ended:
                new, row.seen = ids[row.seen:], len(ids)
                for token in new:
                    if token in self.stop_ids:
                        row.ended = True
                        break
                    row.tokens.append(token)
                if new and new[0] not in self.stop_ids:
                    self._watch_text(row)
            done.append(row.ended)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _watch_text(self, row: Row) -> None:
        if not (row.job.stream or self.stops):
            return
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if self.stops and any(s in text for s in self.stops):
            row.ended = row.stop_hit = True
        send_safe(row, text, self.markers, self.hold)


class BatchWorker:
    """The one thread that generates: a bounded queue in, batches of same-model same-settings requests out."""

    def __init__(self, models: ServedModels, queue_size: int = 64, max_batch_size: int = 8):
        self.models, self.queue_size, self.max_batch_size = models, queue_size, max_batch_size
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running: list[Job] = []
        self._batch_seconds = 1.0  # moving average, for Retry-After
        self.stats = {"batches": 0, "completed": 0, "cancelled": 0, "stopped_mid_generation": 0,
                      "largest_batch": 0, "errors": 0, "index_reloads": 0}

    # -- the HTTP side --------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="faqtune-generate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in [*self._queue, *self._running]:
                job.cancelled.set()
                job.emit("error", "the server is shutting down")  # nobody waits forever
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise WorkerStopped()
            if len(self._queue) >= self.queue_size:
                raise QueueFull(self.retry_after())
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if queued, else its rows stop at the next decoding step."""
        with self._cond:
            if job.finished or job.cancelled.is_set():
                return
            job.cancelled.set()
            self.stats["cancelled"] += 1
            if job in self._queue:
                self._queue.remove(job)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained by one batch's worth (a hint, at least 1)."""
        batches = len(self._queue) / max(1, self.max_batch_size) + 1
        return max(1, math.ceil(self._batch_seconds * batches))

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            return {"queued": len(self._queue), "busy": bool(self._running), "alive": self.alive, **self.stats}

    # -- the worker thread ----------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue.popleft()
            batch = [first] + [j for j in self._queue if j.key == first.key][: self.max_batch_size - 1]
            for job in batch[1:]:
                self._queue.remove(job)
            self._running = batch
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            start = time.perf_counter()
            try:
                self._run_isolated(batch)
            finally:
                seconds = time.perf_counter() - start
                with self._cond:
                    for job in batch:
                        job.finished = True
                    self._running = []
                    self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
                    self.stats["batches"] += 1
                    self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))

    def _run_isolated(self, batch: list[Job]) -> None:
        """Run a batch; when it fails, answer each of its requests alone, so one bad request (or a batch too
        large for memory) fails only itself. A request that fails alone gets an error; the worker goes on."""
        try:
            return self._run_batch(batch)
        except Exception:
            watch = self.models.entries[batch[0].model].index_watch
            reloaded = watch is not None and watch.check()  # the index was swapped under the batch: retry
            if reloaded:
                self.stats["index_reloads"] += 1
            if len(batch) == 1 and not reloaded:
                log.exception("generation failed for a request to %s", batch[0].model)
                return self._fail(batch[0])
            log.exception("a batch of %d request(s) failed; answering each alone", len(batch))
        for job in batch:
            try:
                self._run_batch([job])
            except Exception:
                log.exception("generation failed for a request to %s", job.model)
                self._fail(job)

    def _fail(self, job: Job) -> None:
        if not job.finished:
            self.stats["errors"] += 1
            job.emit("error", "generation failed")

    def _answer(self, job: Job, result: Result) -> None:
        self.stats["completed"] += 1
        job.emit("done", result)

    def _run_batch(self, batch: list[Job]) -> None:
        batch = [job for job in batch if not job.cancelled.is_set() and not job.finished]
        if not batch:
            return
        entry = self.models.entries[batch[0].model]
        s = batch[0].settings
        if entry.index_watch is not None and entry.index_watch.check():  # `faqtune index` rebuilt it
            self.stats["index_reloads"] += 1
        # greedy decoding gives n equal answers: generate one and replicate it
        n_gen = s.n if s.temperature > 0 else 1
        gen = replace(entry.answerer.gen, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                      top_p=s.top_p, num_return_sequences=n_gen)
        per_row = [list(range(s.n))] if n_gen == 1 else [[k] for k in range(s.n)]
        rows: dict[int, list[Row]] = {}  # job index -> its rows, for the jobs generated for
        monitors: list[BatchMonitor] = []

        def stopping(generated: list[int], width: int) -> BatchMonitor:
            for i in generated:
                rows[i] = [Row(batch[i], choices, sent=batch[i].sent.get(choices[0], "")) for choices in per_row]
            monitors.append(BatchMonitor([r for i in generated for r in rows[i]], entry.answerer.tokenizer,
                                         entry.answerer.stop_ids, s.stop, replaced_declines(entry.answerer), width))
            return monitors[-1]

        # the one answering path: grounding answers some questions without generating (declines, no rows)
        with self.models.activate(entry):
            groups = entry.answerer.answer_batch([job.messages for job in batch], gen, stopping)
        self.stats["stopped_mid_generation"] += sum(m.cancelled_rows for m in monitors)
        for i, (job, answers) in enumerate(zip(batch, groups, strict=True)):
            if job.cancelled.is_set():
                continue
            job_rows = rows.get(i)
            choices = [finish_choice(answers[k if n_gen > 1 else 0], k, s, job_rows[k if n_gen > 1 else 0]
                                     if job_rows else None, entry.answerer.tokenizer) for k in range(s.n)]
            self._answer(job, Result(choices, answers[0].prompt_tokens if job_rows else 0))
