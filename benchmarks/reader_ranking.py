"""Can the 135M model learn to rerank retrieval's top k? A probe of a trained ranking loss (UPR-style).

Each of retrieval's top k entries is scored by log p(question | entry): the customer's question written as
the assistant's turn after the entry and an instruction to write a question it answers (UPR, Sachan et al.
2022, arXiv:2204.07496; zero-shot it gained one question, benchmarks/README.md). Here a fresh LoRA adapter on
the 4-bit base (the product's defaults) is trained for that reading with a listwise loss: for each training
question, the softmax of log p(question | entry) over its retrieved entries, cross-entropy on the right one
(the entries ranked by the question's likelihood, as in RankGPT-style listwise training). Training questions are
the product's own forms of each entry (`grounding.question_forms`: its question, noisy spellings, the answer's
key words); the held-out sets are never trained on. After each epoch the held-out sets are reranked: the
entry maximising mean log p + weight x retrieval's prior (`reader.retrieval_prior`), top 3, against retrieval's
top 1.

    OMP_NUM_THREADS=1 python benchmarks/reader_ranking.py --faq ../shared/data/ecommerce_faq.json \\
        --heldout benchmarks/data/shared_ecommerce_rephrased.jsonl benchmarks/data/shared_ecommerce_keywords.jsonl \\
        benchmarks/data/shared_ecommerce_validation.jsonl --name shared

Writes benchmarks/results/<date>-reader-ranking.json (one key per --name).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from common import add_to_result, machine_line, read_heldout

from faqtune import data as data_mod
from faqtune.config import load_config
from faqtune.grounding import question_forms
from faqtune.metrics import matches_own_answer
from faqtune.models import attach_lora, load_base_model, load_tokenizer, resolve_base
from faqtune.prompting import IGNORE_INDEX, encode_conversation, with_system
from faqtune.reader import retrieval_prior
from faqtune.retrieval import FaqIndex, Hit

INSTRUCTION = "Write a question a customer might ask that this entry answers."
WEIGHTS = (0.0, 0.3, 1.0, 3.0)


def entry_prompt(hit: Hit, shown: str, answer_words: int) -> str:
    """The user turn: the entry (its question and answer, or its answer alone; the answer cut to its first
    `answer_words` words to keep the sequences short) and the instruction."""
    answer = " ".join(hit.answer.split()[:answer_words])
    text = f"A: {answer}" if shown == "a" else f"Q: {hit.question}\nA: {answer}"
    return f"FAQ entry:\n{text}\n\n{INSTRUCTION}"


def batch(tok, system, question: str, hits: list[Hit], shown: str, answer_words: int):
    encs = [encode_conversation(tok, with_system([{"role": "user", "content": entry_prompt(h, shown, answer_words)},
                                                  {"role": "assistant", "content": question}], system), 1024)
            for h in hits]
    width = max(len(e.input_ids) for e in encs)
    pad = tok.pad_token_id
    ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in encs])
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in encs])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in encs])
    return ids, labels, mask


def logprobs(model, ids, labels, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) log-probability of each row's labelled tokens."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * keep
    total = lp.sum(-1)
    return total, total / keep.sum(-1)


def training_lists(index: FaqIndex, entries, forms: int, k: int, seed: int) -> list[tuple[str, list[Hit], int]]:
    """(question form, k retrieved entries with the right one among them, its position) for each entry's forms."""
    rng = random.Random(seed)
    asked = [(i, q) for i, e in enumerate(entries) for q in question_forms(e, forms, 0.5, rng)]
    found = index.search_many([q for _, q in asked], k=k)
    out = []
    for (own, q), hits in zip(asked, found, strict=True):
        others = [h for h in hits if h.id != own][:k - 1]
        e = entries[own]
        shown = others + [Hit(own, e.question, e.answer, 1.0)]
        rng.shuffle(shown)
        out.append((q, shown, next(n for n, h in enumerate(shown) if h.id == own)))
    return out


@torch.inference_mode()
def rerank_accuracy(model, tok, system, index, heldout: list[tuple[str, str]], pool, args) -> dict:
    """Retrieval's top 1 and top-k recall, and the fused reranking at each prior weight."""
    hits = index.search_many([q for q, _ in heldout], k=args.k)
    ok = [[matches_own_answer(h.answer, ref, pool) for h in hs] for (_, ref), hs in zip(heldout, hits, strict=True)]
    picks: dict[str, list[int]] = {str(w): [] for w in WEIGHTS}
    for (q, _), hs in zip(heldout, hits, strict=True):
        _, mean = logprobs(model, *batch(tok, system, q, hs, args.shown, args.answer_words))
        prior = retrieval_prior([h.score for h in hs])
        for w in WEIGHTS:
            picks[str(w)].append(max(range(len(hs)), key=lambda n: mean[n].item() + w * prior[n]))
    n = len(heldout)
    return {"questions": n, "retrieval_top1": sum(o[0] for o in ok) / n,
            f"retrieval_top{args.k}_recall": sum(any(o) for o in ok) / n,
            "reranked": {w: sum(ok[i][p] for i, p in enumerate(ps)) / n for w, ps in picks.items()},
            "fixed_and_broken": {w: [sum(ok[i][p] and not ok[i][0] for i, p in enumerate(ps)),
                                     sum(ok[i][0] and not ok[i][p] for i, p in enumerate(ps))] for w, ps in picks.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faq", required=True)
    p.add_argument("--heldout", nargs="+", required=True, help="held-out JSONL sets (id, question)")
    p.add_argument("--name", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--forms", type=int, default=3, help="training questions per entry (grounding.question_forms)")
    p.add_argument("--k", type=int, default=3, help="entries reranked (and shown in a training list)")
    p.add_argument("--shown", choices=("qa", "a"), default="qa", help="the entry's question and answer, or its answer")
    p.add_argument("--answer-words", type=int, default=40)
    p.add_argument("--loss", choices=("listwise", "pointwise"), default="listwise",
                   help="softmax over the listed entries, or the plain next-token loss after the right entry")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    entries = data_mod.load_faq(args.faq).entries
    pool = list(dict.fromkeys(e.answer for e in entries))
    cfg = load_config(overrides={"lora.r": args.r, "lora.alpha": 2 * args.r})
    ident = resolve_base(cfg.base_model)
    tok = load_tokenizer(ident)
    model = attach_lora(load_base_model(ident, cfg), cfg)
    system = cfg.data.system_prompt
    heldout = {Path(h).stem: list(zip(*read_heldout(h, entries), strict=True)) for h in args.heldout}
    result: dict = {"machine": machine_line(), "torch_threads": torch.get_num_threads(), "faq": args.faq,
                    "args": {k: v for k, v in vars(args).items() if k != "name"}, "epochs": []}
    with tempfile.TemporaryDirectory() as tmp:
        index = FaqIndex.build(entries, Path(tmp) / "index", threshold=0.0)
        lists = training_lists(index, entries, args.forms, args.k, args.seed)
        result["training_lists"] = len(lists)
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        steps = args.epochs * len(lists)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
        rng = random.Random(args.seed)

        def evaluate(epoch: int, seconds: float) -> None:
            model.eval()
            row = {"epoch": epoch, "train_seconds": round(seconds, 1)}
            if epoch == 0:
                with model.disable_adapter():
                    row["sets"] = {s: rerank_accuracy(model, tok, system, index, h, pool, args) for s, h in heldout.items()}
            else:
                row["sets"] = {s: rerank_accuracy(model, tok, system, index, h, pool, args) for s, h in heldout.items()}
            result["epochs"].append(row)
            print(json.dumps(row), flush=True)
            model.train()

        evaluate(0, 0.0)
        for epoch in range(1, args.epochs + 1):
            t, losses, right = time.perf_counter(), [], 0
            rng.shuffle(lists)
            for q, hits, gold in lists:
                if args.loss == "listwise":
                    total, _ = logprobs(model, *batch(tok, system, q, hits, args.shown, args.answer_words))
                    loss = torch.nn.functional.cross_entropy(total[None], torch.tensor([gold]))
                    right += int(total.argmax().item() == gold)
                else:  # pointwise: the plain next-token loss of the question after its own entry (SFT)
                    _, mean = logprobs(model, *batch(tok, system, q, [hits[gold]], args.shown, args.answer_words))
                    loss = -mean[0]
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad()
                losses.append(loss.item())
            print(f"epoch {epoch}: loss {sum(losses) / len(losses):.3f}, train list accuracy {right / len(lists):.3f}",
                  flush=True)
            result.setdefault("train", []).append({"loss": sum(losses) / len(losses), "list_accuracy": right / len(lists)})
            evaluate(epoch, time.perf_counter() - t)
    add_to_result("-reader-ranking", args.name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
