"""Near-ties only: does the base model's query likelihood pick better than retrieval among entries that score
within a margin of the top one?

Zero-shot query likelihood (UPR: log p(question | entry), the question written as the assistant's turn after the
entry and "Write a question a customer might ask that this entry answers", `reader_ranking.py`'s prompt, the
answer cut to 40 words) fused with retrieval's prior fixed 5 of 8 bundled keyword misses in session 12 but broke
questions elsewhere (benchmarks/README.md). Retrieval's misses are mostly near-ties between paraphrased entries,
so here the rerank is confined to them: among retrieval's top k, only the entries whose index score is within
`margin` of the top one compete, by mean log p + weight x retrieval's prior (`reader.retrieval_prior`); a clear
top 1 is never overturned. Each question's scores are computed once and every (margin, weight) is read from them.

    OMP_NUM_THREADS=1 python benchmarks/selective_rerank.py --name shared --faq ../shared/data/ecommerce_faq.json \\
        --in-scope benchmarks/data/shared_ecommerce_rephrased.jsonl --in-scope benchmarks/data/shared_ecommerce_keywords.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_validation.jsonl

Figures go under faqs.<name> of benchmarks/results/<date>-selective-rerank.json.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import DenseScores, add_to_result, heldout_parser, machine_line, read_sets, scratch_index
from reader_ranking import batch, logprobs

from faqtune.config import load_config
from faqtune.metrics import matches_own_answer
from faqtune.models import load_tokenizer, resolve_base
from faqtune.reader import retrieval_prior
from faqtune.retrieval import Hit, embed

MARGINS = (0.0, 0.02, 0.03, 0.05, 0.08, 1.0)  # 0: retrieval alone; 1.0: every top-k entry competes
WEIGHTS = (0.0, 0.3, 1.0, 3.0)


def choose(sims: list[float], logp: list[float], margin: float, weight: float) -> int:
    """The position among the top k: the entries within `margin` of the top score compete by log p + weight x
    retrieval's prior."""
    near = [n for n, s in enumerate(sims) if s >= sims[0] - margin]
    if len(near) == 1:
        return 0
    prior = retrieval_prior([sims[n] for n in near])
    return near[max(range(len(near)), key=lambda j: logp[near[j]] + weight * prior[j])]


def main() -> int:
    p = heldout_parser(__doc__)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--answer-words", type=int, default=40)
    args = p.parse_args()
    entries, pool, held_in = read_sets(args)
    index = scratch_index(entries)
    dense_of = DenseScores(index, entries)
    cfg = load_config(None, {})
    from transformers import AutoModelForCausalLM

    ident = resolve_base(cfg.base_model)
    tok = load_tokenizer(ident)
    model = AutoModelForCausalLM.from_pretrained(ident, dtype=torch.bfloat16).eval()
    system = cfg.data.system_prompt
    out = {"machine": machine_line(), "faq": args.faq, "threshold": round(index.threshold, 4), "k": args.k,
           "answer_words": args.answer_words, "sets": {}}
    for name, (questions, refs) in held_in.items():
        t0 = time.perf_counter()
        scores = dense_of(np.asarray(embed(index.embedder, questions)))
        rows = []
        for q, ref, s in zip(questions, refs, scores, strict=True):
            top = (-s).argsort()[:args.k]
            hits = [Hit(int(i), entries[i].question, entries[i].answer, float(s[i])) for i in top]
            with torch.inference_mode():
                _, mean = logprobs(model, *batch(tok, system, q, hits, "qa", args.answer_words))
            rows.append({"sims": [h.score for h in hits], "logp": mean.tolist(),
                         "ok": [matches_own_answer(h.answer, ref, pool) for h in hits],
                         "kept": hits[0].score >= index.threshold})
        n = len(rows)
        grid = {}
        for m in MARGINS:
            for w in WEIGHTS if m else (0.0,):
                picks = [choose(r["sims"], r["logp"], m, w) for r in rows]
                grid[f"m{m}-w{w}"] = {
                    "top1": round(sum(r["ok"][c] for r, c in zip(rows, picks, strict=True)) / n, 3),
                    "under_threshold": round(sum(r["ok"][c] and r["kept"] for r, c in zip(rows, picks, strict=True)) / n, 3),
                    "fixed": sum(r["ok"][c] and not r["ok"][0] for r, c in zip(rows, picks, strict=True)),
                    "broken": sum(r["ok"][0] and not r["ok"][c] for r, c in zip(rows, picks, strict=True))}
        out["sets"][name] = {"questions": n, "seconds": round(time.perf_counter() - t0, 1),
                             "topk_recall": round(sum(any(r["ok"]) for r in rows) / n, 3), "grid": grid}
        print(name, n, out["sets"][name]["topk_recall"],
              {k: (v["top1"], v["fixed"], v["broken"]) for k, v in grid.items()}, flush=True)
    add_to_result("-selective-rerank", args.name, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
