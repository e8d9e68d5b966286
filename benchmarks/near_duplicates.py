"""How many of retrieval's misses answer with a near-copy of the right answer: held-out top 1 scored strictly
(the issue's yardstick, `metrics.matches_own_answer`) and with near-identical FAQ answers counted as the same.

    OMP_NUM_THREADS=1 python benchmarks/near_duplicates.py --name shared --faq ../shared/data/ecommerce_faq.json \\
        --in-scope benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_keywords.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_validation.jsonl

Some FAQs say one thing twice: "Can I return a product if it was purchased with a (promotional) gift card?"
has two entries whose answers differ by one word (ROUGE-L 0.98). Strict scoring counts the twin's answer as
wrong, since it is closer to itself than to the reference. Here an answer also counts when it matches (as
`matches_own_answer` does) an FAQ answer whose ROUGE-L to the reference is at least `--near` (default 0.8).
The index is the product's own (`grounding.build_index`, stock embedder; `--set KEY=VALUE` for overrides);
the decline is its threshold. Figures go under faqs.<name> of benchmarks/results/<date>-near-duplicates.json.
"""

from __future__ import annotations

import json

import numpy as np
from common import DenseScores, add_to_result, heldout_parser, read_sets, scratch_index

from faqtune.metrics import matches_own_answer, rouge_l
from faqtune.retrieval import embed


def main() -> int:
    p = heldout_parser(__doc__)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    p.add_argument("--near", type=float, default=0.8,
                   help="ROUGE-L to the reference from which an FAQ answer counts as the same")
    args = p.parse_args()
    entries, pool, held_in = read_sets(args)
    index = scratch_index(entries, dict(kv.split("=", 1) for kv in args.set))
    dense = DenseScores(index, entries)
    pairs = None  # all pairs of a large FAQ's answers take too long in Python
    if len(pool) <= 200:
        pairs = sum(rouge_l(a, b) >= args.near for i, a in enumerate(pool) for b in pool[i + 1:])
    out = {"faq": args.faq, "overrides": args.set, "entries": len(entries), "answers": len(pool), "near": args.near,
           "near_duplicate_answer_pairs": pairs, "question_weight": index.question_weight, "sets": {}}
    for name, (questions, refs) in held_in.items():
        scores = np.asarray(dense(np.asarray(embed(index.embedder, questions))))
        kept = scores.max(1) >= index.threshold
        strict = tolerant = 0
        examples = []
        for top, ref, k in zip(scores.argmax(1), refs, kept, strict=True):
            answer = entries[top].answer
            same = [o for o in pool if o != ref and rouge_l(ref, o) >= args.near]
            right = matches_own_answer(answer, ref, pool)
            near_right = right or any(matches_own_answer(answer, o, pool) for o in same)
            strict += right and k
            tolerant += near_right and k
            if near_right and not right and k:
                examples.append({"answered": answer[:100], "reference": ref[:100]})
        n = len(questions)
        out["sets"][name] = {"questions": n, "strict": round(strict / n, 3),
                             "near_duplicates_same": round(tolerant / n, 3), "examples": examples[:3]}
        print(f"{args.name} {name}: " + json.dumps({k: v for k, v in out["sets"][name].items() if k != "examples"}),
              flush=True)
    add_to_result("-near-duplicates", args.name, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
