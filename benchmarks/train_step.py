"""Per-step training time and peak memory of faqtune's defaults under variants, side by side on this machine.

    python benchmarks/train_step.py                       # adapter dtype: TRL's bf16 vs the compute dtype
    python benchmarks/train_step.py --steps 8 --variant "dropout0:lora.dropout=0" --variant "base:"
    python benchmarks/train_step.py --variant "before:src=/tmp/before/src" --variant "after:"   # two trees

Each variant trains the defaults (grounded, on ../shared/data/ecommerce_faq.json) for `--steps` optimizer
steps in its own subprocess, so that its peak RSS (the kernel's high-water mark, `ru_maxrss`) is its own (its
largest child's, the process that builds the index, is reported beside it).
Step times come from a callback (`faqtune.train.train(callbacks=...)`); the first step (warm-up) is left out
of the median. Losses are printed so that variants meant to compute the same thing can be compared. The
pseudo-setting `src=DIR` runs that variant on another faqtune source tree (DIR holds the `faqtune` package,
e.g. `git archive REV src | tar -x -C /tmp/before`), so that two versions of the code are compared side by
side in one run. Writes benchmarks/results/<date>-train-step.json with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, machine_line, status_gib, write_result
from transformers import TrainerCallback

DEFAULT_VARIANTS = [
    # What an AVX2-only CPU got before: fp32 compute (measured fastest there), adapters cast to bf16 by TRL.
    "fp32 compute, bf16 adapters (TRL's cast):quantization.compute_dtype=fp32,quantization.adapter_dtype=bf16",
    "fp32 compute, fp32 adapters (auto):quantization.compute_dtype=fp32",
    "bf16 compute, bf16 adapters (auto):quantization.compute_dtype=bf16",
    "bf16 compute, fp32 adapters:quantization.compute_dtype=bf16,quantization.adapter_dtype=fp32",
]


class StepClock(TrainerCallback):
    """Each optimizer step's wall time."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class SetupMemory(TrainerCallback):
    """RSS and its high-water mark when training starts (imports, model, index and data are all in memory
    then): what the steps add is the training peak minus this."""

    def __init__(self):
        self.rss_gb = self.peak_gb = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.rss_gb, self.peak_gb = round(status_gib("VmRSS"), 3), round(status_gib("VmHWM"), 3)


def _child(spec: dict) -> dict:
    """Train in this process and report step times, losses and the adapter's dtype."""
    import faqtune
    from faqtune.config import load_config
    from faqtune.train import train

    clock, setup = StepClock(), SetupMemory()
    summary = train(load_config(None, spec["overrides"]), callbacks=(clock, setup))
    losses = [row["loss"] for row in map(json.loads, (Path(spec["overrides"]["output_dir"]) / "metrics.jsonl")
                                          .read_text().splitlines()) if "loss" in row]
    return {"step_seconds": [round(t, 3) for t in clock.times], "losses": losses,
            "compute_dtype": summary["compute_dtype"], "adapter_dtype": summary["adapter_dtype"],
            "faqtune_package": str(Path(faqtune.__file__).parent),
            "rss_at_train_begin_gb": setup.rss_gb, "peak_rss_before_train_gb": setup.peak_gb,
            "gradient_checkpointing": summary.get("gradient_checkpointing"),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            # the largest child process (the one that built the index), 0 where the index was built here
            "child_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3)}


def _parse_variant(text: str) -> tuple[str, dict]:
    name, _, sets = text.partition(":")
    overrides = dict(item.split("=", 1) for item in sets.split(",") if item)
    return name, overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ecommerce_faq.json"))
    ap.add_argument("--variant", action="append", help="NAME:key=value,key=value (repeatable)")
    ap.add_argument("--suffix", default="-train-step")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(json.loads(args.child))))
        return
    print(machine_line())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(args.variant or DEFAULT_VARIANTS):
            name, overrides = _parse_variant(text)
            src = overrides.pop("src", None)
            overrides = {"data.path": args.data, "data.eval_fraction": "0", "train.max_steps": str(args.steps),
                         "train.eval_steps": "0", "train.save_steps": "1000",
                         "output_dir": f"{tmp}/run{i}", **overrides}
            started = time.time()
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps({"overrides": overrides})],
                                  capture_output=True, text=True, cwd=ROOT, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stderr[-3000:])
                raise SystemExit(f"variant {name!r} failed")
            row = {"variant": name, "overrides": overrides, "src": src, **json.loads(line[7:]),
                   "wall_seconds": round(time.time() - started, 1)}
            row["median_step_s"] = round(statistics.median(row["step_seconds"][1:] or row["step_seconds"]), 3)
            rows.append(row)
            print(f"{name:50s} median step {row['median_step_s']:6.2f} s  peak RSS {row['peak_rss_gb']:.2f} GB  "
                  f"(at start {row['rss_at_train_begin_gb']:.2f}; largest child {row.get('child_peak_rss_gb', 0):.2f})  adapter {row['adapter_dtype']}  losses {' '.join(f'{v:.4f}' for v in row['losses'][:4])}")
    write_result({"steps": args.steps, "data": args.data, "machine": machine(), "variants": rows}, args.suffix)


if __name__ == "__main__":
    main()
