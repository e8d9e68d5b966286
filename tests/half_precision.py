"""The detector of tests/test_dtype_audit.py: aten operations on half-precision tensors, counted during a block or
one optimizer step of the real trainer. Its own module, imported inside those tests: its classes subclass torch's
and transformers' (the trainer, ~10 s to import), and `pytest -m unit` collects test_dtype_audit.py too."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

HALF = (torch.bfloat16, torch.float16)


class HalfOps(TorchDispatchMode):
    """Counts the aten operations that read or write a half-precision tensor."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.dtype in HALF for t in tensors):
            self.ops[str(func)] += 1
        return out


class AuditStep(TrainerCallback):
    """Audits one whole optimizer step (forward, backward, optimizer) of the real trainer."""

    def __init__(self):
        self.mode = HalfOps()
        self.audited = False

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:  # the second step: the first has built every lazy state
            self.mode.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            self.mode.__exit__(None, None, None)
            self.audited = True
