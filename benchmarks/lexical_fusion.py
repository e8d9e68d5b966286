"""A lexical score added to retrieval's dense score to rank the top candidates: held-out accuracy at each weight.

    python benchmarks/lexical_fusion.py --name shared --faq ../shared/data/ecommerce_faq.json \\
        --in-scope benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_keywords.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_validation.jsonl

The index is built once (`grounding.build_index`, the product's own). For each query its top `--depth` entries
by the dense score are reranked by dense + lq x lexical(query, question) + la x lexical(query, answer), where
lexical is the cosine of TF-IDF vectors of character 3-5-grams taken inside words (each word padded with spaces;
IDF over the FAQ's questions and answers), robust to typos and word endings. The decline decision is left on
the dense top-1 score, so declines and off-topic figures are the index's own at every weight. Figures go under
faqs.<name> of benchmarks/results/<date>-lexical-fusion.json.
"""

from __future__ import annotations

import json
import math
from collections import Counter

from common import add_to_result, heldout_parser, read_sets, scratch_index

from faqtune.metrics import matches_own_answer


def grams(text: str) -> Counter:
    words = "".join(c.lower() if c.isalnum() else " " for c in text).split()
    out: Counter = Counter()
    for w in words:
        padded = f" {w} "
        for n in (3, 4, 5):
            out.update(padded[i:i + n] for i in range(max(1, len(padded) - n + 1)))
    return out


class CharTfidf:
    def __init__(self, docs: list[str]):
        df: Counter = Counter()
        for d in docs:
            df.update(set(grams(d)))
        self.idf = {g: math.log((1 + len(docs)) / (1 + c)) + 1 for g, c in df.items()}
        self.default_idf = math.log(1 + len(docs)) + 1  # a gram the FAQ never uses

    def vector(self, text: str) -> dict[str, float]:
        v = {g: (1 + math.log(c)) * self.idf.get(g, self.default_idf) for g, c in grams(text).items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {g: x / norm for g, x in v.items()}

    @staticmethod
    def cosine(a: dict[str, float], b: dict[str, float]) -> float:
        if len(a) > len(b):
            a, b = b, a
        return sum(x * b.get(g, 0.0) for g, x in a.items())


def main() -> int:
    p = heldout_parser(__doc__)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    p.add_argument("--depth", type=int, default=20, help="dense candidates reranked per query")
    p.add_argument("--weights", default="0:0,0.1:0,0.2:0,0.3:0,0.5:0,0.2:0.1,0.3:0.1,0.3:0.2",
                   help="lq:la pairs, comma-separated")
    args = p.parse_args()

    entries, pool, held_in = read_sets(args)
    index = scratch_index(entries, dict(kv.split("=", 1) for kv in args.set))
    tfidf = CharTfidf([e.question for e in entries] + [e.answer for e in entries])
    lex_q = {e.question: tfidf.vector(e.question) for e in entries}
    lex_a = {e.answer: tfidf.vector(e.answer) for e in entries}
    cut = index.threshold
    scored = {}  # set -> per query: (dense hits, lexical q and a of each)
    for name, (questions, _) in held_in.items():
        rows = []
        for q, hs in zip(questions, index.search_many(questions, k=args.depth), strict=True):
            vq = tfidf.vector(q)
            rows.append([(h, CharTfidf.cosine(vq, lex_q[h.question]), CharTfidf.cosine(vq, lex_a[h.answer]))
                         for h in hs])
        scored[name] = rows
    out = {"faq": args.faq, "overrides": args.set, "entries": len(entries), "depth": args.depth,
           "threshold": round(cut, 4), "weights": {}}
    for pair in args.weights.split(","):
        lq, la = (float(x) for x in pair.split(":"))
        figures: dict = {}
        for name, (questions, refs) in held_in.items():
            top1 = kept_ok = top3 = 0
            for ref, cands in zip(refs, scored[name], strict=True):
                ranked = sorted(cands, key=lambda c: -(c[0].score + lq * c[1] + la * c[2]))
                ok = [matches_own_answer(c[0].answer, ref, pool) for c in ranked[:3]]
                kept = cands[0][0].score >= cut  # the dense top 1 decides the decline
                top1 += ok[0]
                kept_ok += ok[0] and kept
                top3 += any(ok)
            n = len(questions)
            figures[name] = {"questions": n, "top1": round(top1 / n, 3),
                             "top1_under_threshold": round(kept_ok / n, 3), "top3_recall": round(top3 / n, 3)}
        out["weights"][pair] = figures
        print(f"{args.name} {pair}: " + json.dumps(figures), flush=True)
    print("written:", add_to_result("-lexical-fusion", args.name, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
