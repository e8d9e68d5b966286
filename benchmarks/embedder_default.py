"""Should the index's embedder be tuned by default? Retrieval alone under the threshold, stock against tuned, the
tuning done as a run does it (on its training split's forms only) with several seeds, and on every entry.

    OMP_NUM_THREADS=1 python benchmarks/embedder_default.py --name shared --faq ../shared/data/ecommerce_faq.json \\
        --in-scope benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_keywords.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_validation.jsonl

Each variant is the product's index (`grounding.build_index`, defaults, its threshold calibrated), with
`grounding.embedder_epochs` 0 (stock) or 1, tuned on the forms of the training split `faqtune train` makes
(`data.split` with the default `data.eval_fraction` and `data.seed`) with build seeds 42 (what train uses), 1 and 2
(`--seeds`), or on every entry (what `faqtune index` does). Per held-out set: top 1 under the threshold; over all
in-scope sets: false declines; per off-topic set (`common.OFFTOPIC_SETS`): declines. Figures go under faqs.<name>
of benchmarks/results/<date>-embedder-default.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import OFFTOPIC_SETS, add_to_result, heldout_parser, machine_line, read_sets

from faqtune import data as data_mod
from faqtune.config import load_config
from faqtune.evaluate import read_offtopic
from faqtune.grounding import build_index
from faqtune.metrics import matches_own_answer


def figures(index, held_in: dict, pool: list[str], off_topic: dict[str, list[str]]) -> dict:
    out, declined, asked = {}, 0, 0
    for name, (questions, refs) in held_in.items():
        tops = [hits[0] for hits in index.search_many(questions, k=1)]
        kept = [h.score >= index.threshold for h in tops]
        out[name] = round(sum(k and matches_own_answer(h.answer, r, pool)
                              for h, k, r in zip(tops, kept, refs, strict=True)) / len(refs), 3)
        declined, asked = declined + kept.count(False), asked + len(kept)
    out["false_declines"] = f"{declined}/{asked}"
    for name, questions in off_topic.items():
        out[f"declined:{name}"] = f"{sum(h[0].score < index.threshold for h in index.search_many(questions, k=1))}/{len(questions)}"
    out["threshold"] = round(index.threshold, 4)
    return out


def off_topic_sets() -> dict[str, list[str]]:
    """{name: questions} of `common.OFFTOPIC_SETS`, read as `faqtune eval` reads off-topic questions."""
    return {p.stem: read_offtopic(p) for p in OFFTOPIC_SETS}


def train_split_ids(entries: list, cfg) -> list[int]:
    """Positions in `entries` of the training split `faqtune train` makes with `cfg`."""
    train, _ = data_mod.split(entries, cfg.data.eval_fraction, cfg.data.seed)
    position = {id(e): i for i, e in enumerate(entries)}
    return [position[id(e)] for e in train]


def main() -> int:
    p = heldout_parser(__doc__)
    p.add_argument("--seeds", default="42,1,2", help="build seeds of the training-split builds ('' for none: "
                                                     "stock and every entry only, e.g. for the bank FAQ)")
    args = p.parse_args()
    entries, pool, held_in = read_sets(args)
    off_topic = off_topic_sets()
    cfg0 = load_config(None, {"grounding.embedder_epochs": 0})
    cfg1 = load_config(None, {"grounding.embedder_epochs": 1})
    train_ids = train_split_ids(entries, cfg1)
    variants = {"stock": (cfg0, cfg0.data.seed, None)}
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        variants[f"tuned-train-split-seed{seed}"] = (cfg1, seed, train_ids)
    variants["tuned-every-entry"] = (cfg1, 0, None)
    out = {"machine": machine_line(), "faq": args.faq, "entries": len(entries), "train_split": len(train_ids),
           "variants": {}}
    for name, (cfg, seed, tune_on) in variants.items():
        t0 = time.perf_counter()
        index = build_index(Path(tempfile.mkdtemp()) / "index", entries, cfg, seed=seed, tune_on=tune_on)
        row = figures(index, held_in, pool, off_topic)
        row["build_seconds"] = round(time.perf_counter() - t0, 1)
        out["variants"][name] = row
        print(args.name, name, row, flush=True)
    add_to_result("-embedder-default", args.name, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
