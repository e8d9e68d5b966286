"""Generation-augmented retrieval (GAR, Mao et al. 2021, arXiv:2009.08553; HyDE, Gao et al. 2022,
arXiv:2212.10496): the LLM answers the customer's question closed-book, and that draft answer helps rank the FAQ.

    OMP_NUM_THREADS=1 python benchmarks/generation_augmented.py --name shared --faq ../shared/data/ecommerce_faq.json \\
        --in-scope benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_keywords.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_validation.jsonl [--run runs/closed-book]

The index is built once (`grounding.build_index`). Each held-out question gets a greedy draft answer (at most
`--tokens` tokens) from the base model, or, with `--run`, from a tuned run's model without any entry shown.
Every entry is then scored by retrieval's dense score plus mu x cos(draft, entry's answer) (`draft`), or by
the dense score of the question and the draft embedded as one text (`joint`, HyDE's form). The decline is left
on the dense top-1 score, so declines are the index's own. Figures go under faqs.<name> of
benchmarks/results/<date>-generation-augmented.json.
"""

from __future__ import annotations

import json
import time

import torch
from common import DenseScores, add_to_result, heldout_parser, ranked_figures, read_sets, scratch_index

from faqtune.generate import clean
from faqtune.loading import load_for_inference
from faqtune.metrics import matches_own_answer
from faqtune.models import ensure_embedded_model, load_tokenizer
from faqtune.prompting import with_system
from faqtune.retrieval import embed

SYSTEM = "You are a customer support assistant for an online store. Answer the customer's question in one or two sentences."


@torch.inference_mode()
def drafts(model, tokenizer, questions: list[str], tokens: int, system: str | None) -> list[str]:
    out = []
    for q in questions:
        text = tokenizer.apply_chat_template(with_system([{"role": "user", "content": q}], system),
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        out.append(clean(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)))
    return out


def main() -> int:
    p = heldout_parser(__doc__)
    p.add_argument("--run", help="a tuned run whose model drafts the answers (default: the embedded base)")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--mus", default="0,0.1,0.2,0.3,0.5,1")
    args = p.parse_args()

    entries, pool, held_in = read_sets(args)
    index = scratch_index(entries)
    cut = index.threshold
    dense_of = DenseScores(index, entries)
    if args.run:
        model, tokenizer, run_cfg = load_for_inference(args.run)
        system = run_cfg.data.system_prompt  # as it was trained
    else:
        from transformers import AutoModelForCausalLM

        folder = ensure_embedded_model()
        model, tokenizer, system = AutoModelForCausalLM.from_pretrained(folder), load_tokenizer(str(folder)), SYSTEM
    model.eval()
    out = {"faq": args.faq, "run": args.run, "tokens": args.tokens, "threshold": round(cut, 4), "sets": {}}
    for name, (questions, refs) in held_in.items():
        t0 = time.perf_counter()
        texts = drafts(model, tokenizer, questions, args.tokens, system)
        seconds = (time.perf_counter() - t0) / len(questions)
        q_vec, d_vec = embed(index.embedder, questions), embed(index.embedder, texts)
        j_vec = embed(index.embedder, [f"{q}\n{d}" for q, d in zip(questions, texts, strict=True)])
        dense = dense_of(q_vec)
        kept = dense.max(1) >= cut
        draft_cos, joint = d_vec @ dense_of.answers.T, dense_of(j_vec)


        res = {"questions": len(questions), "draft_seconds": round(seconds, 2),
               "draft_closed_book": round(sum(matches_own_answer(t, r, pool) for t, r in zip(texts, refs, strict=True))
                                          / len(questions), 3),
               "joint": ranked_figures(joint, entries, refs, kept, pool),
               "examples": [{"q": q, "draft": t} for q, t in zip(questions[:5], texts, strict=False)]}
        for mu in (float(m) for m in args.mus.split(",")):
            res[f"draft mu={mu}"] = ranked_figures(dense + mu * draft_cos, entries, refs, kept, pool)
        out["sets"][name] = res
        print(f"{args.name} {name}: " + json.dumps({k: v for k, v in res.items() if k != "examples"}), flush=True)
    print("written:", add_to_result("-generation-augmented", args.name, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
