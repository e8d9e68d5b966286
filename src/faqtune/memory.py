"""Training memory: how much one micro-batch's activations take, whether to recompute them instead, and how
to keep the CPU heap from growing step after step.

`use_checkpointing` turns `train.gradient_checkpointing` (true | false | auto) into the trainer's switch, from
an estimate of the activations (`activation_bytes`) and the free memory (`available_memory`);
`PACK_MULTIPLE` and `release_freed_memory` bound the heap of a long CPU run (measured in
benchmarks/memory_timeline.py) and `mapped_temporaries` that of a base's load; `in_fresh_process` runs a stage
whose memory should leave with it (indexing).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import multiprocessing
import os
import pickle
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from faqtune.errors import FaqtuneError

# Bytes of saved activations per token, per layer and per unit of hidden size, without gradient checkpointing
# (measured: grounded steps of the embedded default on the shared FAQ, 2.57 GB peak RSS without it vs 1.70 GB
# with it, packed micro-batches of ~640 tokens, 30 layers x 576, bf16 compute; fp32 keeps about twice as much).
ACTIVATION_BYTES = {torch.bfloat16: 80, torch.float16: 80, torch.float32: 160}


def activation_bytes(model_config, tokens: int, dtype: torch.dtype) -> int:
    """Rough peak of the activations kept for the backward pass of one micro-batch of `tokens` tokens."""
    layers = getattr(model_config, "num_hidden_layers", 1)
    hidden = getattr(model_config, "hidden_size", 1)
    return ACTIVATION_BYTES.get(dtype, 128) * tokens * layers * hidden


def available_memory() -> int | None:
    """Bytes of memory this process can still take (Linux: MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# On CPU `auto` checkpoints a micro-batch whose activations would pass this: then they, not the 4-bit base,
# the adapters and their optimizer states (~0.5 GB for the embedded default at r 64), are most of the memory.
ACTIVATION_BUDGET = 512 * 2**20


def use_checkpointing(setting: str, activations: int | None = None, free: int | None = None) -> bool:
    """`auto`: on where accelerator memory is the limit (GPU); on CPU on when the longest micro-batch's
    activations (`activations`, bytes) would pass ACTIVATION_BUDGET or a quarter of the `free` memory (bytes,
    as `available_memory` measures it), else off. Measured on the grounded default, 8 steps side by side
    (benchmarks/README.md): with `lora.dropout` 0, peak RSS 2.60 -> 1.79 GB for 1.24x the step time (1.30x
    with dropout 0.1, whose masks are drawn again in the recomputation)."""
    if setting != "auto":
        return setting == "true"
    if torch.cuda.is_available():
        return True
    if activations is None:
        return False
    return activations > ACTIVATION_BUDGET or (free is not None and activations > free / 4)


# Packed (padding-free) micro-batches on CPU are padded to a multiple of this many tokens. oneDNN compiles and
# caches a kernel per matmul shape; a packed micro-batch has a new length nearly every step, so without
# buckets every step paid for new kernels and the cache grew (+22 MB of heap a step on the grounded default,
# Intel Xeon, bf16). The padding is masked from the loss and, with its own position ids, from attention.
PACK_MULTIPLE = 128


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


# glibc's mallopt parameter, and the size from which allocations get their own mapping (returned on free).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 * 2**20


def bound_heap() -> bool:
    """Give allocations of MMAP_THRESHOLD bytes and more their own mapping for the rest of the process, so
    that freeing them returns the memory at once. glibc raises this threshold on its own up to 32 MiB after
    the first large free, and then serves the LM head's logits (tens of MB a step) from the heap, which
    fragments it. Measured on the grounded default, 20 steps side by side (benchmarks/memory_timeline.py):
    training peak 1.57 -> 1.44 GB, step time unchanged within noise. False where there is no glibc."""
    return _set_mmap_threshold(MMAP_THRESHOLD)


def _set_mmap_threshold(size: int) -> bool:
    libc = _libc()
    return libc is not None and hasattr(libc, "mallopt") and bool(libc.mallopt(_M_MMAP_THRESHOLD, size))


# While a base loads, each layer is quantized through temporaries of a few MB. Served from the heap (under
# MMAP_THRESHOLD) they fragment it, and in about one load in three glibc then keeps 0.2-0.5 GB of freed heap,
# all of it on top of the load's own peak (benchmarks/load_peak.py, 8 fresh processes each: the embedded
# default's load peaked at 0.785-1.301 GiB with 8 MiB, 0.785-0.800 GiB with 1 MiB).
LOAD_MMAP_THRESHOLD = 2**20


@contextlib.contextmanager
def mapped_temporaries(threshold: int | None = None):
    """Inside the block, allocations of `threshold` bytes (default LOAD_MMAP_THRESHOLD) and more that the heap
    cannot serve from a free chunk get their own mapping (returned to the OS when freed) instead of growing
    it; after it, MMAP_THRESHOLD's (`bound_heap`). Does nothing where there is no glibc."""
    bounded = _set_mmap_threshold(LOAD_MMAP_THRESHOLD if threshold is None else threshold)
    try:
        yield
    finally:
        if bounded:
            bound_heap()


# CPU training hands the freed heap back every this many optimizer steps: each release makes the next step fault
# its pages in again (releasing after every step cost +9% step time in one 10-step run and nothing measurable in
# a 20-step one), while the heap creeps by tens of MB a step between releases (20 steps side by side: peak
# 1.54 GB releasing every 10 steps, 1.52 every step, 2.10 never; benchmarks/README.md).
RELEASE_EVERY = 10


def release_freed_memory() -> bool:
    """Hand the pages the heap holds free back to the OS (glibc's `malloc_trim`); False where there is no
    glibc (macOS, musl). CPU training frees and reallocates tensors of many sizes each step, and glibc keeps
    the freed pages: measured on the grounded default, RSS at step end rose 1.20 -> 1.58 GB over 30 steps
    without this, and stayed at 1.02-1.09 GB with it, for ~2% of the step time."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _quiet_on_interrupt() -> None:
    """The child leaves at once and in silence on Ctrl-C: the terminal sends SIGINT to the parent too, which says
    "interrupted"; the child's own KeyboardInterrupt printed a traceback (it comes mostly while the child still
    imports the work's modules, outside any handler of ours)."""
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))


def _call_in_child(fn: Callable, args: tuple, threads: int) -> tuple[bool, Any]:
    """The child's side of `in_fresh_process`: (True, result), or (False, the FaqtuneError) for a user's mistake.
    An error whose class cannot be rebuilt from its pickle (DataError takes several arguments) travels as a
    plain FaqtuneError with the same message."""
    torch.set_num_threads(threads)
    try:
        return True, fn(*args)
    except FaqtuneError as e:
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:  # noqa: BLE001 - any failure to rebuild it: send the message alone
            e = FaqtuneError(str(e))
        return False, e


def in_fresh_process(fn: Callable, *args: Any) -> Any:
    """`fn(*args)` in a spawned child process (the parent's torch thread count), returning its result or raising
    its FaqtuneError here: what the call imports and allocates leaves with the child instead of staying in this
    process's heap. `fn`, its arguments and its result must pickle. Where no child can be started (no working
    semaphores in some sandboxes), it runs here instead."""
    try:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_quiet_on_interrupt)
    except (OSError, ImportError, NotImplementedError):
        return fn(*args)
    with pool:
        try:
            ok, value = pool.submit(_call_in_child, fn, args, torch.get_num_threads()).result()
        except BrokenProcessPool as e:  # killed (the OOM killer, a signal): nothing of it to keep
            raise FaqtuneError(f"the child process for {getattr(fn, '__name__', fn)} died before it finished: "
                               "killed, out of memory, or started from a script whose top level is not under "
                               "`if __name__ == \"__main__\":` (the child imports that script again)") from e
    if not ok:
        raise value
    return value
