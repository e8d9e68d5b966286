"""Does fine-tuning the embedder on the FAQ's own question forms raise retrieval's top 1 on held-out questions?

    OMP_NUM_THREADS=1 python benchmarks/embedder_finetune.py --faq ../shared/data/ecommerce_faq.json \\
        benchmarks/data/shared_ecommerce_rephrased.jsonl benchmarks/data/shared_ecommerce_keywords.jsonl

A probe for issue #13 (make the fine-tuning earn its place), not a faqtune feature. all-MiniLM-L6-v2 is tuned
with an in-batch contrastive loss (MultipleNegativesRanking, scale 20) from each entry's training forms -- the
question, two noisy spellings, the answer's key words and the question's key words (faqtune.grounding's
generators, never the held-out sets) -- to that entry's question and to its answer, batches holding one form
per entry. Held-out top 1 is scored as `FaqIndex.search` ranks: the mean cosine to an entry's question and
answer vectors. With `--alpha`, each epoch is also scored with the weights interpolated between the tuned and
the original ones (alpha x tuned + (1 - alpha) x original: WiSE-FT, Wortsman et al. 2022, which keeps a tuned
model's gains while it keeps more of the original's robustness). Writes
benchmarks/results/<date>-embedder-finetune<suffix>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from common import write_result
from sentence_transformers import SentenceTransformer

from faqtune.data import load_faq
from faqtune.embedder_tuning import batches_one_form_per_entry
from faqtune.grounding import answer_words, keywords, noisy
from faqtune.retrieval import embedder_path


def top1(model, entries, sets: dict[str, list[dict]]) -> dict[str, float]:
    qv = model.encode([e.question for e in entries], normalize_embeddings=True)
    av = model.encode([e.answer for e in entries], normalize_embeddings=True)
    out = {}
    for name, rows in sets.items():
        v = model.encode([r["question"] for r in rows], normalize_embeddings=True)
        best = ((v @ qv.T + v @ av.T) / 2).argmax(1)
        out[name] = round(float(np.mean(best == np.array([r["id"] for r in rows]))), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faq", required=True)
    ap.add_argument("sets", nargs="+", help="held-out JSONL files of {id, question}")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--alpha", type=float, action="append", default=[],
                    help="also score alpha x tuned + (1 - alpha) x original weights (repeatable)")
    ap.add_argument("--suffix", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    entries = load_faq(args.faq).entries
    sets = {Path(s).stem: [json.loads(line) for line in open(s, encoding="utf-8")] for s in args.sets}
    model = SentenceTransformer(embedder_path("all-MiniLM-L6-v2"), device="cpu")
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    curve = [{"epoch": 0, **top1(model, entries, sets)}]
    print(curve[-1], flush=True)
    anchors = [(form, i) for i, e in enumerate(entries)
               for form in (e.question, noisy(e.question, rng), noisy(e.question, rng),
                            answer_words(e.answer) or keywords(e.question), keywords(e.question))]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def encode(texts):
        return torch.nn.functional.normalize(model(model.tokenize(texts))["sentence_embedding"], dim=-1)

    started = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        rng.shuffle(anchors)
        for batch in batches_one_form_per_entry(anchors, 32):
            ids = [i for _, i in batch]
            a = encode([f for f, _ in batch])
            target = torch.arange(len(batch))
            loss = sum(torch.nn.functional.cross_entropy(20 * a @ encode(texts).T, target)
                       for texts in ([entries[i].question for i in ids], [entries[i].answer for i in ids]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        curve.append({"epoch": epoch, "seconds": round(time.time() - started, 1), **top1(model, entries, sets)})
        print(curve[-1], flush=True)
        tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for alpha in args.alpha:
            model.load_state_dict({k: alpha * v + (1 - alpha) * original[k] if v.is_floating_point() else v
                                   for k, v in tuned.items()})
            curve.append({"epoch": epoch, "alpha": alpha, **top1(model, entries, sets)})
            print(curve[-1], flush=True)
        model.load_state_dict(tuned)
    write_result({"faq": args.faq, "training_forms": len(anchors), "lr": args.lr, "curve": curve},
                 f"-embedder-finetune{args.suffix}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
