"""The question's share of an entry's retrieval score (`retrieval.QUESTION_WEIGHT`): held-out accuracy and
declines at each weight, retrieval alone.

    python benchmarks/question_weight.py --name shared --faq ../shared/data/ecommerce_faq.json \\
        --in-scope benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_keywords.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_validation.jsonl

An entry's score is w x the query's cosine to its question + (1 - w) x to its answer. The index is built once
(`grounding.build_index`, the product's own); for each weight the scores are recomputed, the threshold
calibrated again as a build would (`calibration_questions`, `calibrate_threshold`), and the held-out sets scored:
top 1, top 1 under the threshold, top-3 recall and false declines of the in-scope sets (jsonl with the entry's
id), off-topic declined (`--offtopic`, never used for calibration). Figures go under faqs.<name> of
benchmarks/results/<date>-question-weight.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import OFFTOPIC_SETS, add_to_result, heldout_parser, read_sets, scratch_index

from faqtune.evaluate import read_offtopic
from faqtune.grounding import calibration_questions
from faqtune.metrics import matches_own_answer
from faqtune.retrieval import calibrate_threshold


def main() -> int:
    p = heldout_parser(__doc__)
    p.add_argument("--offtopic", action="append", help="held-out off-topic questions, one a line (repeatable; "
                                                       "default both of benchmarks/data/offtopic_*.txt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    p.add_argument("--weights", default="0.5,0.55,0.6,0.65,0.7")
    args = p.parse_args()

    entries, pool, held_in = read_sets(args)
    held_off = {Path(path).stem: read_offtopic(path) for path in
                args.offtopic or OFFTOPIC_SETS}
    index = scratch_index(entries, dict(kv.split("=", 1) for kv in args.set))
    cal_in, cal_off = calibration_questions(entries, seed=0)  # build_index's own (its default seed)
    out = {"faq": args.faq, "overrides": args.set, "entries": len(entries), "weights": {}}
    for weight in [float(w) for w in args.weights.split(",")]:
        index.question_weight = weight
        cut = calibrate_threshold(index, cal_in, cal_off)
        figures: dict = {"threshold": round(cut, 4)}
        for name, (questions, refs) in held_in.items():
            hits = index.search_many(questions, k=3)
            ok = [[matches_own_answer(h.answer, ref, pool) for h in hs] for ref, hs in zip(refs, hits, strict=True)]
            kept = [hs[0].score >= cut for hs in hits]
            n = len(questions)
            figures[name] = {"questions": n, "top1": round(sum(o[0] for o in ok) / n, 3),
                             "top1_under_threshold": round(sum(o[0] and k for o, k in zip(ok, kept, strict=True)) / n, 3),
                             "top3_recall": round(sum(any(o) for o in ok) / n, 3),
                             "false_declines": f"{kept.count(False)}/{n}"}
        for name, questions in held_off.items():
            declined = sum(hs[0].score < cut for hs in index.search_many(questions, k=1))
            figures[f"offtopic:{name}"] = f"{declined}/{len(questions)} declined"
        out["weights"][str(weight)] = figures
        print(f"{args.name} w={weight}: " + json.dumps(figures), flush=True)
    print("written:", add_to_result("-question-weight", args.name, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
