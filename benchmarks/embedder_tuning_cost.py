"""What tuning the embedder costs as the index is built: wall time and peak RSS per token cap, side by side.

    python benchmarks/embedder_tuning_cost.py --faq ../shared/data/bank_faq.csv --entries 120 --caps 256,128

Each cap tunes the embedder for one epoch on the first `--entries` entries' question forms (grounding's own
`_tuned_embedder`, `embedder_tuning.MAX_TOKENS` set to the cap) in a fresh process, the caps alternating for
`--repeats` rounds, 1 torch thread. 256 is all-MiniLM-L6-v2's own cap (no cut); batches are padded to their
longest text, so long answers set every batch's length. Results: benchmarks/results/<date>-embedder-tuning-cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_line, status_gib, write_result


def child(faq: str, entries: int, cap: int) -> dict:
    from faqtune import data as data_mod
    from faqtune import embedder_tuning
    from faqtune.config import load_config
    from faqtune.grounding import _tuned_embedder

    embedder_tuning.MAX_TOKENS = cap
    faq_entries = data_mod.load_faq(faq).entries[:entries]
    cfg = load_config(None, {"grounding.embedder_epochs": "1"})
    start = time.perf_counter()
    _tuned_embedder(Path(tempfile.mkdtemp()), faq_entries, range(len(faq_entries)), cfg, seed=0)
    return {"cap": cap, "seconds": time.perf_counter() - start, "peak_rss_gib": status_gib("VmHWM")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faq", required=True)
    p.add_argument("--entries", type=int, default=120)
    p.add_argument("--caps", default="256,128")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.faq, args.entries, args.child)))
        return 0
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    runs = []
    for _ in range(args.repeats):
        for cap in [int(c) for c in args.caps.split(",")]:
            done = subprocess.run([sys.executable, __file__, "--faq", args.faq, "--entries", str(args.entries),
                                   "--child", str(cap)], env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    print(machine_line())
    print("written:", write_result({"faq": args.faq, "entries": args.entries, "runs": runs},
                                   "-embedder-tuning-cost"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
