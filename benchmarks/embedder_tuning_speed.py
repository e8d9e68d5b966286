"""Cheaper embedder tuning, side by side: build time and retrieval's held-out figures per way of tuning.

    OMP_NUM_THREADS=1 python benchmarks/embedder_tuning_speed.py --name bundled \\
        --in-scope benchmarks/data/bundled_validation.jsonl ... [--variants fp32,fixed-answers] [--seeds 42,1,2]

Variants (`embedder_tuning`'s switches): `fp32` (the answers' vectors trained through, fp32: the recipe before
session 20), `fixed-answers` (the answers' vectors are fixed targets at each step: no backward through the
longest texts), `bf16` (bf16 autocast where `models.cpu_bf16_is_fast`) and `bf16-fixed-answers`. Each builds the
product's index (`grounding.build_index`, defaults, `grounding.embedder_epochs` 1) tuned on the training split
`faqtune train` makes, per build seed in `--seeds`, and on every entry (`faqtune index`) unless `--no-every-entry`
(`--seeds ""`: the every-entry build only). Figures as in `embedder_default.py`, plus the build's wall time. The
variants alternate within each seed, so the machine's load falls on all of them alike. Figures go under
faqs.<name> of benchmarks/results/<date>-embedder-tuning-speed.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import add_to_result, heldout_parser, machine_line, read_sets
from embedder_default import figures, off_topic_sets, train_split_ids

from faqtune import embedder_tuning
from faqtune.config import load_config
from faqtune.grounding import build_index
from faqtune.models import cpu_bf16_is_fast

VARIANTS = {"fp32": (True, "never"), "fixed-answers": (False, "never"), "bf16": (True, "auto"),
            "bf16-fixed-answers": (False, "auto")}


def main() -> int:
    p = heldout_parser(__doc__)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="42,1,2", help="build seeds of the training-split builds ('' for none)")
    p.add_argument("--no-every-entry", action="store_true")
    args = p.parse_args()
    entries, pool, held_in = read_sets(args)
    off_topic = off_topic_sets()
    cfg = load_config(None, {"grounding.embedder_epochs": 1})
    train_ids = train_split_ids(entries, cfg)
    builds = [(f"train-split-seed{s}", int(s), train_ids) for s in args.seeds.split(",") if s]
    if not args.no_every_entry:
        builds.append(("every-entry", 0, None))
    out = {"machine": machine_line(), "cpu_bf16_is_fast": cpu_bf16_is_fast(), "faq": args.faq,
           "entries": len(entries), "train_split": len(train_ids), "builds": {}}
    for build, seed, tune_on in builds:
        for variant in args.variants.split(","):
            embedder_tuning.ANSWER_GRADIENTS, embedder_tuning.BF16 = VARIANTS[variant]
            t0 = time.perf_counter()
            index = build_index(Path(tempfile.mkdtemp()) / "index", entries, cfg, seed=seed, tune_on=tune_on)
            row = {"build_seconds": round(time.perf_counter() - t0, 1)} | figures(index, held_in, pool, off_topic)
            out["builds"].setdefault(build, {})[variant] = row
            print(args.name, build, variant, row, flush=True)
    add_to_result("-embedder-tuning-speed", args.name, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
