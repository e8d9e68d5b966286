"""Where `faqtune train`'s peak RSS goes: the process's RSS sampled every 10 ms, stage by stage, on this machine.

    python benchmarks/memory_timeline.py --steps 20
    python benchmarks/memory_timeline.py --steps 20 --set train.gradient_checkpointing=false --suffix=-nockpt

Trains the defaults (grounded, on ../shared/data/ecommerce_faq.json) for `--steps` optimizer steps in this
process, with a thread reading VmRSS from /proc every 10 ms. Each stage of `faqtune.train.train` (indexing,
model load, LoRA, trainer build, each step, save) is timed by wrapping the functions `train` calls, and the
result gives, per stage, RSS at its start and end and its own peak, and the peaks of the process tree (this
process and its children, which build the index: summed RSS, an upper bound, and summed PSS, the physical
memory, shared library pages counted once), every 50 ms. Writes
benchmarks/results/<date>-memory-timeline<suffix>.json with the machine named.
"""

from __future__ import annotations

import argparse
import ctypes
import threading
import time
from pathlib import Path

from common import ROOT, machine, machine_line, status_gib, tree_gib, write_result

SHARED_FAQ = ROOT.parent / "shared" / "data" / "ecommerce_faq.json"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_gb() -> dict[str, float]:
    """glibc's heap: bytes in use, free inside the heap (held, not returned), and mmapped (GB; {} elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"heap_used_gb": round(info.uordblks / 2**30, 3), "heap_free_gb": round(info.fordblks / 2**30, 3),
            "mmapped_gb": round(info.hblkhd / 2**30, 3)}


class Sampler(threading.Thread):
    """RSS every `period` seconds; `stage(name)` starts a new stage."""

    def __init__(self, period: float = 0.01):
        super().__init__(daemon=True)
        self.period, self.stages, self._halt = period, [], threading.Event()
        self.stage("imports")

    def stage(self, name: str) -> None:
        now = status_gib("VmRSS")
        if self.stages:
            self.stages[-1]["end_gb"] = now
            self.stages[-1]["malloc_end"] = malloc_gb()
        self.stages.append({"stage": name, "start_gb": now, "peak_gb": now, "tree_peak_gb": now,
                            "tree_pss_peak_gb": 0.0, "t": time.perf_counter()})

    def run(self) -> None:
        tick = 0
        while not self._halt.wait(self.period):
            cur, tick = self.stages[-1], tick + 1
            cur["peak_gb"] = max(cur["peak_gb"], status_gib("VmRSS"))
            if tick % 5 == 0:  # the tree every 50 ms: reading PSS walks each process's page tables
                rss, pss = tree_gib()
                cur["tree_peak_gb"] = max(cur["tree_peak_gb"], rss)
                cur["tree_pss_peak_gb"] = max(cur["tree_pss_peak_gb"], pss)

    def finish(self) -> list[dict]:
        self._halt.set()
        self.join()
        self.stage("end")
        out = []
        for a, b in zip(self.stages, self.stages[1:], strict=False):
            out.append({"stage": a["stage"], "seconds": round(b["t"] - a["t"], 2), "start_gb": round(a["start_gb"], 3),
                        "peak_gb": round(max(a["peak_gb"], a.get("end_gb", 0)), 3),
                        "end_gb": round(a.get("end_gb", 0), 3), "tree_peak_gb": round(a["tree_peak_gb"], 3),
                        "tree_pss_peak_gb": round(a["tree_pss_peak_gb"], 3),
                        **a.get("malloc_end", {})})
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()

    sampler = Sampler()
    sampler.start()
    import tempfile  # the imports below are the first stage measured

    from transformers import TrainerCallback

    import faqtune.train as ft
    from faqtune.config import load_config

    def wrap(name: str, label: str) -> None:
        fn = getattr(ft, name)

        def staged(*a, **kw):
            sampler.stage(label)
            out = fn(*a, **kw)
            sampler.stage(f"after {label}")
            return out
        setattr(ft, name, staged)

    for name, label in [("_ground", "index + ground"), ("load_base_model", "load model"),
                        ("attach_lora", "attach LoRA"), ("build_trainer", "build trainer"), ("save", "save")]:
        wrap(name, label)

    class Steps(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sampler.stage(f"step {state.global_step + 1}")

        def on_pre_optimizer_step(self, a, state, control, **kw):
            sampler.stage(f"optimizer {state.global_step + 1}")

        def on_optimizer_step(self, a, state, control, **kw):
            sampler.stage(f"after optimizer {state.global_step + 1}")

        def on_train_end(self, a, state, control, **kw):
            sampler.stage("train end")

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"data.path": str(SHARED_FAQ), "data.eval_fraction": "0", "train.eval_steps": "0",
                     "train.max_steps": str(args.steps), "output_dir": str(Path(tmp) / "run")}
        overrides.update(s.split("=", 1) for s in args.set)
        cfg = load_config(None, overrides)
        sampler.stage("setup")
        summary = ft.train(cfg, callbacks=(Steps(),))
    stages = sampler.finish()
    peak = max(stages, key=lambda s: s["peak_gb"])
    steps = [s for s in stages if s["stage"].startswith("step ")]
    for kind in ("step ", "optimizer ", "after optimizer "):
        mine = [s for s in stages if s["stage"].startswith(kind)]
        if mine:
            print(f"{kind:>17}: peak above start, median over steps "
                  f"{sorted(s['peak_gb'] - s['start_gb'] for s in mine)[len(mine) // 2]:.3f} GB")
    for s in stages:
        if not s["stage"].startswith("step ") or s in (steps[0], steps[-1], peak):
            print(f"{s['stage']:>22} {s['seconds']:7.2f}s  start {s['start_gb']:.3f}  peak {s['peak_gb']:.3f}  "
                  f"end {s['end_gb']:.3f} GB  (with children: RSS {s['tree_peak_gb']:.3f}, PSS {s['tree_pss_peak_gb']:.3f})")
    tree = max(stages, key=lambda s: s["tree_peak_gb"])
    pss = max(stages, key=lambda s: s["tree_pss_peak_gb"])
    info = machine()  # after the run: its matmul timing allocates
    print(f"peak {peak['peak_gb']:.3f} GB in '{peak['stage']}'; with children RSS {tree['tree_peak_gb']:.3f} GB in "
          f"'{tree['stage']}', PSS {pss['tree_pss_peak_gb']:.3f} GB in '{pss['stage']}'; on {machine_line(info)}")
    path = write_result({"steps": args.steps, "overrides": overrides, "machine": info,
                         "gradient_checkpointing": summary.get("gradient_checkpointing"),
                         "peak_gb": peak["peak_gb"], "peak_stage": peak["stage"],
                         "tree_peak_gb": tree["tree_peak_gb"], "tree_peak_stage": tree["stage"],
                         "tree_pss_peak_gb": pss["tree_pss_peak_gb"], "tree_pss_peak_stage": pss["stage"],
                         "stages": stages},
                        f"-memory-timeline{args.suffix}")
    return 0 if path else 1


if __name__ == "__main__":
    raise SystemExit(main())
