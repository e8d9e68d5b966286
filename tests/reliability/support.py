"""Helpers of the reliability suite: the tiny-Llama training settings and run comparisons."""

from __future__ import annotations

import shutil
from pathlib import Path

from faqtune.checkpoints import MANIFEST

# 10 optimizer steps over 12 examples (3 per epoch): checkpoints at 4 and 8 fall mid-epoch, so a resume has
# to skip into the data; held-out loss at 5 and at the end; LoRA dropout on (the default 0.1) so the RNG
# state matters too.
STEPS, SAVE_STEPS = 10, 4
SETTINGS = ["--train.max_steps", str(STEPS), "--train.save_steps", str(SAVE_STEPS), "--train.eval_steps", "5",
            "--data.eval_fraction", "0.2", "--lora.r", "4", "--quantization.compute_dtype", "fp32",
            "--grounding.mode", "none", "--train.logging_steps", "1"]


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def adapter_difference(run: Path, reference: Path) -> float:
    """Largest absolute difference between two runs' adapters (0.0: bitwise equal); keys must match."""
    a, b = adapter_tensors(run), adapter_tensors(reference)
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_same_adapter(run: Path, reference: Path) -> None:
    import torch

    a, b = adapter_tensors(run), adapter_tensors(reference)
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensor(s) differ, max |diff| {adapter_difference(run, reference)}"


def sealed(run: Path) -> list[str]:
    return sorted((p.name for p in (run / "checkpoints").glob("checkpoint-*") if (p / MANIFEST).exists()),
                  key=lambda n: int(n.split("-")[-1]) if n.split("-")[-1].isdigit() else -1)


def copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target)
    return target


def error_line(err: str) -> str:
    """The CLI's one-line error (progress output shares stderr)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]
