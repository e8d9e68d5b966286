"""Peak RSS of loading the 4-bit base, in fresh processes, under two glibc mmap thresholds, side by side.

    python benchmarks/load_peak.py --runs 6

Each run is a new process that imports faqtune, then loads the configured base (`faqtune.models.load_base_model`,
the defaults: 4-bit NF4, the compute dtype measured here) with `memory.LOAD_MMAP_THRESHOLD` set to the variant's
value, and reports its high-water mark (VmHWM) and RSS before and after, and the RSS that `malloc_trim` gives
back after the load. Variants alternate run by run. Writes benchmarks/results/<date>-load-peak<suffix>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import machine, machine_line, write_result

CHILD = r"""
import ctypes, json, sys
from common import status_gib
import faqtune.memory as memory
from faqtune.config import load_config
from faqtune.models import load_base_model, resolve_base
memory.LOAD_MMAP_THRESHOLD = int(sys.argv[1])
cfg = load_config(None, {})
before = status_gib("VmRSS")
model = load_base_model(resolve_base(cfg.base_model), cfg)
out = {"rss_before_gib": before, "peak_gib": status_gib("VmHWM"), "rss_after_gib": status_gib("VmRSS")}
ctypes.CDLL("libc.so.6").malloc_trim(0)
out["rss_after_trim_gib"] = status_gib("VmRSS")
print("RESULT " + json.dumps(out))
"""

VARIANTS = {"8 MiB (bound_heap's, before)": 8 * 2**20, "1 MiB (LOAD_MMAP_THRESHOLD)": 2**20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=6, help="processes per variant")
    p.add_argument("--suffix", default="")
    args = p.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for i in range(args.runs):
        for name, threshold in VARIANTS.items():
            proc = subprocess.run([sys.executable, "-c", CHILD, str(threshold)], capture_output=True, text=True,
                                  cwd=sys.path[0], check=True)
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            r = {k: round(v, 3) for k, v in json.loads(line[7:]).items()}
            runs[name].append(r)
            print(f"{name:>30} run {i + 1}: peak {r['peak_gib']:.3f} GiB (before {r['rss_before_gib']:.3f}, "
                  f"after {r['rss_after_gib']:.3f}, after trim {r['rss_after_trim_gib']:.3f})", flush=True)
    summary = {name: {"median_peak_gib": statistics.median(r["peak_gib"] for r in rs),
                      "max_peak_gib": max(r["peak_gib"] for r in rs), "min_peak_gib": min(r["peak_gib"] for r in rs)}
               for name, rs in runs.items()}
    info = machine()
    for name, s in summary.items():
        print(f"{name:>30}: peak median {s['median_peak_gib']:.3f}, range {s['min_peak_gib']:.3f}-"
              f"{s['max_peak_gib']:.3f} GiB")
    print(f"on {machine_line(info)}")
    return 0 if write_result({"runs_per_variant": args.runs, "machine": info, "variants": VARIANTS, "runs": runs,
                              "summary": summary}, f"-load-peak{args.suffix}") else 1


if __name__ == "__main__":
    raise SystemExit(main())
