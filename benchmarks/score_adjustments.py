"""Training-free changes to retrieval's dense scores: held-out top 1 of each, side by side with the index's own.

    OMP_NUM_THREADS=1 python benchmarks/score_adjustments.py --name shared --faq ../shared/data/ecommerce_faq.json \\
        --in-scope benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_keywords.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_validation.jsonl

The index is the product's own (`grounding.build_index`, stock embedder); its score of an entry is
w x cos(query, question) + (1 - w) x cos(query, answer), or with `--joint-weight j` (the default since session 17
is 0.6) w x cos(query, question) + (1 - w) x [j x cos(query, question and answer as one text) + (1 - j) x
cos(query, answer)]; the centring and feedback variants use the question and answer vectors alone. Each adjustment reranks every entry and leaves the
decline on the index's own top-1 score, so only top 1 moves:
- `center` / `abtt<D>`: query and entry vectors centred on the FAQ's mean vector (questions and answers), then
  the top D principal directions removed ("all-but-the-top", Mu & Viswanath 2018, arXiv:1702.01417);
- `csls<k>_<g>`: hubness correction, score - g x r_e, where r_e is entry e's mean of its k highest scores for
  the other entries' questions (CSLS, Conneau et al. 2018, arXiv:1710.04087);
- `kw<a>`: (1 - a) x the score + a x the score of the query's keyword form (`grounding.keywords`, the form
  the training questions' noise uses);
- `prf<m>_<b>`: the query vector moved b x toward the mean of its top-m entries' vectors and re-scored
  (pseudo-relevance feedback, Rocchio).
Figures go under faqs.<name> of benchmarks/results/<date>-score-adjustments.json.
"""

from __future__ import annotations

import json

import numpy as np
from common import DenseScores, add_to_result, heldout_parser, ranked_figures, read_sets, scratch_index

from faqtune.grounding import keywords
from faqtune.retrieval import embed


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main() -> int:
    p = heldout_parser(__doc__)
    p.add_argument("--joint-weight", type=float, default=0.0,
                   help="the index's grounding.joint_weight (0: as measured in session 16, before joint vectors)")
    args = p.parse_args()
    entries, pool, held_in = read_sets(args)
    index = scratch_index(entries, {"grounding.joint_weight": args.joint_weight})
    dense = DenseScores(index, entries)
    w, questions, answers = dense.weight, np.asarray(dense.questions), np.asarray(dense.answers)
    both = np.vstack([questions, answers])
    mean = both.mean(0)
    directions = np.linalg.svd(both - mean, full_matrices=False)[2]
    own = np.asarray(dense(questions))
    np.fill_diagonal(own, -np.inf)  # an entry's score for its own question is not a hub's
    entry_vecs = unit(w * questions + (1 - w) * answers)

    def projected(d: int):
        def f(x: np.ndarray) -> np.ndarray:
            x = x - mean
            if d:
                x = x - (x @ directions[:d].T) @ directions[:d]
            return unit(x)
        qs, ans = f(questions), f(answers)
        return lambda v: w * f(v) @ qs.T + (1 - w) * f(v) @ ans.T

    # each: (query vectors, the index's scores, the scores of the queries' keyword forms) -> adjusted scores
    variants = {"index": lambda v, s, sk: s}
    for name, d in (("center", 0), ("abtt1", 1), ("abtt3", 3)):
        score = projected(d)
        variants[name] = lambda v, s, sk, score=score: score(v)
    for k, g in ((3, 0.25), (3, 0.5), (10, 0.25), (10, 0.5)):
        hub = np.sort(own, 0)[-k:].mean(0)
        variants[f"csls{k}_{g}"] = lambda v, s, sk, hub=hub, g=g: s - g * hub
    for a in (0.15, 0.3, 0.5):
        variants[f"kw{a}"] = lambda v, s, sk, a=a: (1 - a) * s + a * sk
    for m, b in ((1, 0.3), (3, 0.3), (3, 0.6)):
        variants[f"prf{m}_{b}"] = lambda v, s, sk, m=m, b=b: np.asarray(
            dense(unit(v + b * entry_vecs[(-s).argsort(1)[:, :m]].mean(1))))
    out = {"faq": args.faq, "entries": len(entries), "question_weight": w, "joint_weight": args.joint_weight, "threshold": round(index.threshold, 4),
           "top1": {}}
    for name, (qs, refs) in held_in.items():
        vecs = np.asarray(embed(index.embedder, qs))
        scores = np.asarray(dense(vecs))
        keyword_scores = np.asarray(dense(np.asarray(embed(index.embedder, [keywords(q) for q in qs]))))
        kept = scores.max(1) >= index.threshold
        row = {variant: ranked_figures(adjust(vecs, scores, keyword_scores), entries, refs, kept, pool)["top1"]
               for variant, adjust in variants.items()}
        out["top1"][name] = {"questions": len(qs), **row}
        print(f"{args.name} {name}: " + json.dumps(out["top1"][name]), flush=True)
    add_to_result("-score-adjustments", args.name, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
