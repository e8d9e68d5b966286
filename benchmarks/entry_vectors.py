"""What an entry's vectors are: held-out top 1 of other ways to embed an FAQ entry, side by side with the index's own.

    OMP_NUM_THREADS=1 python benchmarks/entry_vectors.py --name shared --faq ../shared/data/ecommerce_faq.json \\
        --in-scope benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_keywords.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_validation.jsonl

The index is the product's (`grounding.build_index`, stock embedder) without its joint vector (`joint_weight` 0,
the score before it): w x cos(query, question) + (1 - w) x cos(query, answer), each text embedded alone. The variants, each ranking
every entry (the decline stays on the index's own top-1 score, so only top 1 moves):
- `joint`: cos(query, the question and answer embedded as one text, `retrieval.entry_text`), the usual
  single-vector FAQ document;
- `q_joint<b>`: (1 - b) x cos to the question + b x cos to the joint text;
- `qaj`: the three cosines (question, answer, joint) averaged; `qaj<q>_<a>_<j>`: weighted by q, a and j;
- `sentences`: w x cos to the question + (1 - w) x the best cosine to one sentence of the answer (long answers
  say several things; one vector for all of them blurs each);
- `rrf`: reciprocal-rank fusion (k 60) of the ranking by the question and the ranking by the answer, instead of
  the mean of their scores.
Figures go under faqs.<name> of benchmarks/results/<date>-entry-vectors.json.
"""

from __future__ import annotations

import json
import re

import numpy as np
from common import DenseScores, add_to_result, heldout_parser, ranked_figures, read_sets, scratch_index

from faqtune.retrieval import embed, entry_text

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def sentences(text: str) -> list[str]:
    return [s for s in SENTENCE_END.split(text.strip()) if s.strip()] or [text]


def ranks(scores: np.ndarray) -> np.ndarray:
    """Each entry's rank (0 = best) in each row of a (queries x entries) score matrix."""
    order = (-scores).argsort(1)
    out = np.empty_like(order)
    np.put_along_axis(out, order, np.arange(scores.shape[1])[None, :].repeat(len(scores), 0), 1)
    return out


def main() -> int:
    args = heldout_parser(__doc__).parse_args()
    entries, pool, held_in = read_sets(args)
    index = scratch_index(entries, {"grounding.joint_weight": 0})
    dense = DenseScores(index, entries)
    w, questions, answers = dense.weight, np.asarray(dense.questions), np.asarray(dense.answers)
    joint = np.asarray(embed(index.embedder, [entry_text(e) for e in entries]))
    pieces = [sentences(e.answer) for e in entries]
    owner = np.repeat(np.arange(len(entries)), [len(p) for p in pieces])
    sentence_vecs = np.asarray(embed(index.embedder, [s for p in pieces for s in p]))
    print(f"{args.name}: {len(entries)} entries, {len(owner)} answer sentences", flush=True)

    def best_sentence(v: np.ndarray) -> np.ndarray:
        sims = v @ sentence_vecs.T
        out = np.full((len(v), len(entries)), -np.inf)
        for j, e in enumerate(owner):  # fine at FAQ sizes (a few thousand sentences)
            out[:, e] = np.maximum(out[:, e], sims[:, j])
        return out

    variants = {
        "index": lambda v, s: s,
        "joint": lambda v, s: v @ joint.T,
        **{f"q_joint{b}": lambda v, s, b=b: (1 - b) * v @ questions.T + b * v @ joint.T for b in (0.3, 0.5, 0.7)},
        **{f"qaj{q}_{a}_{j}": lambda v, s, q=q, a=a, j=j: q * v @ questions.T + a * v @ answers.T + j * v @ joint.T
           for q, a, j in ((0.4, 0.2, 0.4), (0.4, 0.1, 0.5), (0.5, 0.2, 0.3))},
        "qaj": lambda v, s: (v @ questions.T + v @ answers.T + v @ joint.T) / 3,
        "sentences": lambda v, s: w * v @ questions.T + (1 - w) * best_sentence(v),
        "rrf": lambda v, s: 1 / (60 + ranks(v @ questions.T)) + 1 / (60 + ranks(v @ answers.T)),
    }
    out = {"faq": args.faq, "entries": len(entries), "answer_sentences": len(owner), "question_weight": w,
           "threshold": round(index.threshold, 4), "top1": {}}
    for name, (qs, refs) in held_in.items():
        vecs = np.asarray(embed(index.embedder, qs))
        scores = np.asarray(dense(vecs))
        kept = scores.max(1) >= index.threshold
        out["top1"][name] = {"questions": len(qs), **{
            variant: ranked_figures(adjust(vecs, scores), entries, refs, kept, pool)["top1"]
            for variant, adjust in variants.items()}}
        print(f"{args.name} {name}: " + json.dumps(out["top1"][name]), flush=True)
    add_to_result("-entry-vectors", args.name, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
