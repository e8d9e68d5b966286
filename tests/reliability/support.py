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


def train_config(argv: list[str]):
    """The config `faqtune ARGV` trains with, for a fresh run (`train_argv`'s): its settings, and --config,
    --base, --data and --output as `faqtune train` maps them. For calls to `faqtune.train.train`, whose
    `callbacks` inject faults."""
    from faqtune.cli import TRAIN_SHORTCUTS, build_parser, parse_overrides
    from faqtune.config import load_config

    args, extra = build_parser().parse_known_args(argv)
    assert args.command == "train" and not args.resume and not args.mix, argv
    overrides = parse_overrides(extra)
    overrides.update({key: getattr(args, flag) for flag, key in TRAIN_SHORTCUTS.items()
                      if getattr(args, flag) is not None})
    return load_config(args.config, overrides)


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def adapter_difference(run: Path, reference: Path) -> float:
    """Largest absolute difference between two runs' adapters (0.0: bitwise equal); keys must match."""
    a, b = adapter_tensors(run), adapter_tensors(reference)
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# A run resumed in another process than the one it started in may differ from the reference in the last
# float bits: MKL's kernels can round differently with the buffers' memory alignment, which changes from
# process to process (MKL's "Conditional Numerical Reproducibility" notes). CI saw 1.8e-5 once. Real resume
# bugs are 100x larger, measured on this suite's run: one step too many 2.1e-3, the learning rate 1% off
# 1.4e-2, another dropout seed 2.7e-1.
ACROSS_PROCESSES = 1e-4


def assert_same_adapter(run: Path, reference: Path, tolerance: float = 0.0) -> None:
    """The run's adapter equals the reference's: bit for bit (tolerance 0), or within `tolerance`."""
    import torch

    a, b = adapter_tensors(run), adapter_tensors(reference)
    assert a.keys() == b.keys()
    difference = adapter_difference(run, reference)
    if tolerance:
        assert difference <= tolerance, f"max |diff| {difference} > {tolerance}"
    else:
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert not unequal, f"{len(unequal)} tensor(s) differ, max |diff| {difference}"


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
