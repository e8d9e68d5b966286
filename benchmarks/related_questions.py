"""Related questions offered with an answer: how often the right entry is reached, answered or offered, and how
many questions an offer comes with, at each score margin.

    python benchmarks/related_questions.py --name shared --faq ../shared/data/ecommerce_faq.json \\
        --in-scope benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_keywords.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_validation.jsonl

The index is built once (`grounding.build_index`). Retrieval answers its top entry above the threshold, else
declines. Offered with it (`grounding.related_hits`, the answerer's own): up to `--related` of the next entries
scoring at least the top score - margin; with a decline, the top entries scoring at least the threshold - margin
("did you mean"). In-scope figures: answered right, reached (answered right or the right entry offered), offers per
question; off-topic: questions with an offer. Figures go under faqs.<name> of
benchmarks/results/<date>-related-questions.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import OFFTOPIC_SETS, add_to_result, heldout_parser, read_sets, scratch_index

from faqtune.evaluate import read_offtopic
from faqtune.grounding import related_hits
from faqtune.metrics import matches_own_answer


def offered(hits, threshold: float, margin: float, n: int) -> tuple[bool, list]:
    """(answered, the hits offered as related) for one question's ranked hits, as the answerer offers them
    (`grounding.related_hits`, less the top entry when it is the answer)."""
    answered = hits[0].score >= threshold
    near = related_hits(hits, threshold, margin)
    return answered, [h for h in near if not (answered and h.id == hits[0].id)][:n]


def main() -> int:
    p = heldout_parser(__doc__)
    p.add_argument("--offtopic", action="append", help="off-topic questions, one a line (default both of "
                                                       "benchmarks/data/offtopic_*.txt)")
    p.add_argument("--related", type=int, default=2)
    p.add_argument("--margins", default="0,0.03,0.05,0.08,0.1,0.15")
    args = p.parse_args()

    entries, pool, held_in = read_sets(args)
    held_off = {Path(path).stem: read_offtopic(path) for path in
                args.offtopic or OFFTOPIC_SETS}
    index = scratch_index(entries)
    cut, k = index.threshold, args.related + 1
    found_in = {name: index.search_many(qs, k=k) for name, (qs, _) in held_in.items()}
    found_off = {name: index.search_many(qs, k=k) for name, qs in held_off.items()}
    out = {"faq": args.faq, "related": args.related, "threshold": round(cut, 4), "margins": {}}
    for margin in (float(m) for m in args.margins.split(",")):
        figures: dict = {}
        for name, (_, refs) in held_in.items():
            right = reached = offers = 0
            for ref, hits in zip(refs, found_in[name], strict=True):
                answered, rel = offered(hits, cut, margin, args.related)
                ok = answered and matches_own_answer(hits[0].answer, ref, pool)
                right += ok
                reached += ok or any(matches_own_answer(h.answer, ref, pool) for h in rel)
                offers += len(rel)
            n = len(refs)
            figures[name] = {"questions": n, "answered_right": round(right / n, 3), "reached": round(reached / n, 3),
                             "offers_per_question": round(offers / n, 2)}
        for name, found in found_off.items():
            with_offer = sum(bool(offered(hits, cut, margin, args.related)[1]) for hits in found)
            figures[f"offtopic:{name}"] = f"{with_offer}/{len(found)} with an offer"
        out["margins"][str(margin)] = figures
        print(f"{args.name} margin={margin}: " + json.dumps(figures), flush=True)
    print("written:", add_to_result("-related-questions", args.name, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
