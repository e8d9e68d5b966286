"""Training's peak RSS, faqtune against the guide's recipe, repeated and alternated on this machine.

    CPU_SPEED_QUESTIONS=1 python benchmarks/peak_rss.py --repeats 3 --steps 20
    CPU_SPEED_QUESTIONS=1 python benchmarks/peak_rss.py --repeats 3 --set quantization.norm_dtype=fp32 --suffix=-fp32

One peak of the reference moves by 0.2 GB from run to run (1.16-1.35 GB measured in one session), so a single
pair of `cpu_speed.py` runs cannot say which recipe is lighter. This runs `cpu_speed.py`'s two workers (each in
its own process, training's own high-water mark, the probes' answering left out) `--repeats` times each,
alternating reference, faqtune, reference, ..., and reports each run and the ratio of the medians. Use
CPU_SPEED_QUESTIONS=1 to score one question at the probes (the reference then trains on that one example,
which lowers its peak: the comparison is conservative). Writes benchmarks/results/<date>-peak-rss<suffix>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics

from common import machine, machine_line, write_result
from cpu_speed import run_worker


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of each recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="faqtune override")
    p.add_argument("--suffix", default="")
    args = p.parse_args()

    runs: list[dict] = []
    faqtune_args = ["--set", f"train.max_steps={args.steps}", *(x for s in args.set for x in ("--set", s))]
    for i in range(args.repeats):
        for kind, extra in (("reference", ["--reference-steps", str(args.steps)]), ("faqtune", faqtune_args)):
            result, process_gib = run_worker(kind, extra)
            runs.append({"run": f"{kind} {i + 1}", "training_peak_rss_gib": round(result["training_peak_rss_gib"], 3),
                         "process_peak_rss_gib": round(process_gib, 3), "train_seconds": result["train_seconds"],
                         "child_peak_rss_gib": result.get("child_peak_rss_gib")})
            print(f"{kind:>9} {i + 1}: training peak {result['training_peak_rss_gib']:.3f} GiB "
                  f"(process {process_gib:.3f}), {result['train_seconds']:.1f} s", flush=True)
    median = {k: statistics.median(r["training_peak_rss_gib"] for r in runs if r["run"].startswith(k))
              for k in ("reference", "faqtune")}
    ratio = median["faqtune"] / median["reference"]
    info = machine()
    print(f"medians: reference {median['reference']:.3f}, faqtune {median['faqtune']:.3f} GiB: ratio {ratio:.3f} "
          f"on {machine_line(info)}")
    path = write_result({"repeats": args.repeats, "steps": args.steps, "faqtune_overrides": args.set,
                         "questions_scored": os.environ.get("CPU_SPEED_QUESTIONS") or "all", "machine": info,
                         "runs": runs, "median_training_peak_rss_gib": median, "peak_rss_ratio_of_medians": ratio},
                        f"-peak-rss{args.suffix}")
    return 0 if path else 1


if __name__ == "__main__":
    raise SystemExit(main())
