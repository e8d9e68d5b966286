"""Entries expanded with questions the LLM writes for them (doc2query, Nogueira et al. 2019, arXiv:1904.08375):
held-out accuracy of retrieval when each entry is also matched by its generated rephrasings.

    OMP_NUM_THREADS=1 python benchmarks/doc2query.py --name shared --faq ../shared/data/ecommerce_faq.json \\
        --in-scope benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_keywords.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_validation.jsonl

For every FAQ entry the embedded base model samples `--n` rephrasings of its question (batched, left-padded).
An entry's score is retrieval's dense score (w x cos question + (1 - w) x cos answer) plus nu x the best cosine
of the query to one of its rephrasings (`add`), or the larger of the two (`max`). The decline is left on the
dense top-1 score. Figures go under faqs.<name> of benchmarks/results/<date>-doc2query.json.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from common import DenseScores, add_to_result, heldout_parser, ranked_figures, read_sets, scratch_index

from faqtune.generate import clean
from faqtune.models import ensure_embedded_model, load_tokenizer
from faqtune.retrieval import embed

PROMPT = ("Rewrite this customer question to an online store in different words, as another customer "
          "might ask it. Reply with the new question only.\n\nQuestion: {q}")


@torch.inference_mode()
def rephrasings(model, tokenizer, questions: list[str], n: int, tokens: int, batch: int = 16) -> list[list[str]]:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for lo in range(0, len(questions), batch):
        chunk = questions[lo:lo + batch]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPT.format(q=q)}], tokenize=False,
                                               add_generation_prompt=True) for q in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        gen = model.generate(**enc, max_new_tokens=tokens, do_sample=True, temperature=0.8, top_p=0.95,
                             num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)
        decoded = [clean(t).split("\n")[0].strip() for t in
                   tokenizer.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)]
        out += [[t for t in decoded[i * n:(i + 1) * n] if t] for i in range(len(chunk))]
    return out


def main() -> int:
    p = heldout_parser(__doc__)
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--nus", default="0,0.1,0.2,0.3,0.5")
    args = p.parse_args()

    torch.manual_seed(0)
    entries, pool, held_in = read_sets(args)
    index = scratch_index(entries)
    cut = index.threshold
    dense_of = DenseScores(index, entries)
    from transformers import AutoModelForCausalLM

    folder = ensure_embedded_model()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(str(folder))
    t0 = time.perf_counter()
    forms = rephrasings(model, tokenizer, [e.question for e in entries], args.n, args.tokens)
    seconds = time.perf_counter() - t0
    flat = [(i, f) for i, fs in enumerate(forms) for f in fs]
    fv = embed(index.embedder, [f for _, f in flat])
    owner = np.array([i for i, _ in flat])
    out = {"faq": args.faq, "n": args.n, "generation_seconds": round(seconds, 1), "threshold": round(cut, 4),
           "examples": [{"question": entries[i].question, "rephrasings": forms[i]} for i in range(0, len(entries), 10)],
           "sets": {}}
    print(json.dumps(out["examples"][:4], indent=1), flush=True)
    for name, (questions, refs) in held_in.items():
        q_vec = embed(index.embedder, questions)
        dense = dense_of(q_vec)
        kept = dense.max(1) >= cut
        best = np.full_like(dense, -1.0)
        sims = q_vec @ fv.T
        for j, i in enumerate(owner):
            best[:, i] = np.maximum(best[:, i], sims[:, j])


        res = {"questions": len(questions), "max": ranked_figures(np.maximum(dense, best), entries, refs, kept, pool)}
        for nu in (float(x) for x in args.nus.split(",")):
            res[f"add nu={nu}"] = ranked_figures(dense + nu * best, entries, refs, kept, pool)
        out["sets"][name] = res
        print(f"{args.name} {name}: " + json.dumps(res), flush=True)
    print("written:", add_to_result("-doc2query", args.name, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
