"""A cross-encoder trained on the FAQ's own question forms, reranking retrieval's top k: held-out accuracy.

    python benchmarks/cross_reranker.py --name bundled \\
        --in-scope src/faqtune/data/ecommerce_faq_rephrased.jsonl \\
        --in-scope src/faqtune/data/ecommerce_faq_keywords.jsonl \\
        --in-scope benchmarks/data/bundled_validation.jsonl
    python benchmarks/cross_reranker.py --name shared --faq ../shared/data/ecommerce_faq.json \\
        --in-scope benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_keywords.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_validation.jsonl

Most of retrieval's held-out misses have the right entry second; a reranker reading the question and each
candidate entry together (a cross-encoder) is the usual fix, and none ships offline. This one is made here: the
embedded all-MiniLM-L6-v2 with a one-logit head (`AutoModelForSequenceClassification`), trained on the same
kind of question forms the embedder tuning uses (the question, noisy spellings, the question's and the answer's
key words; another seed), each shown with its top `--k` entries from the product's index (hard negatives, its
own entry put in when retrieval missed it), listwise cross-entropy over the k. At evaluation each held-out
question's top k are reranked by cross logit + `weight` x SCALE x the index's score, for each `--weights`
(0: the cross-encoder alone); the decline stays on the index's top-1 score, so false declines do not move.
Figures go under faqs.<name> of benchmarks/results/<date>-cross-reranker.json, with retrieval's own top 1 of
the same index beside them.
"""

from __future__ import annotations

import random
import time

import torch
from common import add_to_result, heldout_parser, read_sets, scratch_index

from faqtune.grounding import answer_words, keywords, noisy
from faqtune.metrics import matches_own_answer
from faqtune.retrieval import embedder_path

SCALE = 20.0  # the index's cosine-like scores x SCALE, on the scale of the cross logits


def pair_text(entry) -> str:
    return f"{entry.question} {entry.answer}"


def forms_of(entries, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(form, i) for i, e in enumerate(entries)
            for form in (e.question, noisy(e.question, rng), noisy(e.question, rng), noisy(e.question, rng),
                         answer_words(e.answer) or keywords(e.question), keywords(e.question))]


def main() -> int:
    p = heldout_parser(__doc__)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--forms-per-step", type=int, default=4)
    p.add_argument("--weights", default="0,0.5,1,2")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(args.seed)
    entries, pool, held_in = read_sets(args)
    t0 = time.perf_counter()
    index = scratch_index(entries)
    t_index = time.perf_counter() - t0

    forms = forms_of(entries, seed=args.seed + 1)
    hits = index.search_many([f for f, _ in forms], k=args.k)
    examples = []
    for (form, own), hs in zip(forms, hits, strict=True):
        ids = [h.id for h in hs]
        if own not in ids:
            ids[-1] = own
        examples.append((form, ids, ids.index(own)))

    path = embedder_path("all-MiniLM-L6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    optimizer = torch.optim.AdamW([{"params": model.bert.parameters(), "lr": args.lr},
                                   {"params": model.classifier.parameters(), "lr": 1e-3}])

    def logits(question: str, ids: list[int]) -> torch.Tensor:
        batch = tok([question] * len(ids), [pair_text(entries[i]) for i in ids], truncation="only_second",
                    max_length=args.max_length, padding=True, return_tensors="pt")
        return model(**batch).logits.squeeze(-1)

    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    model.train()
    losses = []
    for _ in range(args.epochs):
        rng.shuffle(examples)
        for s in range(0, len(examples), args.forms_per_step):
            chunk = examples[s:s + args.forms_per_step]
            loss = sum(torch.nn.functional.cross_entropy(logits(f, ids)[None], torch.tensor([t]))
                       for f, ids, t in chunk) / len(chunk)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    t_train = time.perf_counter() - t0
    model.eval()

    weights = [float(w) for w in args.weights.split(",")]
    figures: dict = {"entries": len(entries), "forms": len(forms), "k": args.k, "epochs": args.epochs,
                     "lr": args.lr, "seed": args.seed, "index_seconds": round(t_index, 1),
                     "train_seconds": round(t_train, 1),
                     "loss_first_last": [round(sum(losses[:20]) / 20, 3), round(sum(losses[-20:]) / 20, 3)]}
    for name, (questions, refs) in held_in.items():
        found = index.search_many(questions, k=args.k)
        right = {"retrieval": 0, **{f"cross+{w:g}": 0 for w in weights}}
        changed = {f"cross+{w:g}": [] for w in weights}
        top_recall = 0
        with torch.inference_mode():
            for q, ref, hs in zip(questions, refs, found, strict=True):
                ok = [matches_own_answer(h.answer, ref, pool) for h in hs]
                top_recall += any(ok)
                right["retrieval"] += ok[0]
                cross = logits(q, [h.id for h in hs])
                dense = torch.tensor([h.score for h in hs])
                for w in weights:
                    pick = int((cross + w * SCALE * dense).argmax())
                    right[f"cross+{w:g}"] += ok[pick]
                    if ok[pick] != ok[0]:
                        changed[f"cross+{w:g}"].append(f"{'+' if ok[pick] else '-'} {q}")
        n = len(questions)
        figures[name] = {"questions": n, f"top{args.k}_recall": round(top_recall / n, 3),
                         **{k: f"{v}/{n}" for k, v in right.items()},
                         "changed_vs_retrieval": {k: v for k, v in changed.items() if v}}
        print(name, figures[name]["questions"], {k: f"{v}/{n}" for k, v in right.items()}, flush=True)
    print(f"index {t_index:.0f} s, cross-encoder training {t_train:.0f} s, loss {figures['loss_first_last']}")
    add_to_result("-cross-reranker", f"{args.name}-seed{args.seed}", figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
