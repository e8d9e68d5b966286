"""Can the tuned model reorder retrieval's top 3 better than retrieval? Two readings of the same held-out
questions, base (adapter disabled) and tuned side by side, against retrieval's own top 1:

- `choice`: the scored choice step of a `grounding.choice` run (reader.py): which of [0]..[3] the model
  puts first, how often each is first, and how much its scores vary from question to question (a model that
  learned nothing content-based scores every question alike);
- `likelihood`: each of the top-3 entries scored by the mean log-probability of its answer given the
  question alone (no entries shown), fused with retrieval's prior at several weights.

    python benchmarks/reader_rerank.py --run runs/reader-shared-choiceonly --faq ../shared/data/ecommerce_faq.json \\
        --rephrased benchmarks/data/shared_ecommerce_rephrased.jsonl --name shared-choice-only

Writes benchmarks/results/<date>-reader-rerank.json (one key per --name, others kept).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from pathlib import Path

import torch
from common import ROOT, write_result

from faqtune import data as data_mod
from faqtune.grounding import grounded_question, open_run_index
from faqtune.loading import load_for_inference
from faqtune.metrics import matches_own_answer
from faqtune.prompting import encode_conversation, with_system
from faqtune.reader import pick, retrieval_prior, score_choices
from faqtune.run import RunDir

K = 3
WEIGHTS = (0.0, 0.3, 1.0, 3.0)


@torch.inference_mode()
def answer_logprob(model, tokenizer, system: str | None, question: str, answer: str) -> float:
    """Mean log-probability per token of `answer` after `question` alone."""
    msgs = with_system([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], system)
    enc = encode_conversation(tokenizer, msgs, 2048)
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    targets = labels[0, 1:]
    keep = targets != -100
    return torch.log_softmax(logits[keep], -1).gather(-1, targets[keep][:, None]).mean().item()


def side(model, tok, cfg, questions, hits, ok, choice: bool) -> dict:
    """Accuracies of both readings for the model as it is now (adapter on or off)."""
    out: dict = {}
    lik = [[answer_logprob(model, tok, cfg.data.system_prompt, q, h.answer) for h in hs]
           for q, hs in zip(questions, hits, strict=True)]
    out["likelihood"] = {}
    priors = [retrieval_prior([h.score for h in hs]) for hs in hits]
    for w in WEIGHTS:
        picks = [max(range(len(s)), key=lambda i: s[i] + w * prior[i]) for s, prior in zip(lik, priors, strict=True)]
        out["likelihood"][str(w)] = sum(ok(i, p) for i, p in enumerate(picks)) / len(questions)
    if choice:
        convs = [with_system([{"role": "user", "content": grounded_question(q, hs)}], cfg.data.system_prompt)
                 for q, hs in zip(questions, hits, strict=True)]
        logp = score_choices(model, tok, convs, K)
        first = collections.Counter(max(range(K + 1), key=lambda n: lp[n]) for lp in logp)
        out["choice_first_counts"] = {str(n): first.get(n, 0) for n in range(K + 1)}
        out["choice_logp_stdev_across_questions"] = [round(statistics.pstdev(lp[n] for lp in logp), 4)
                                                     for n in range(K + 1)]
        out["choice"] = {}
        for w in WEIGHTS:
            picks = [pick(lp, [h.score for h in hs], w) for lp, hs in zip(logp, hits, strict=True)]
            out["choice"][str(w)] = sum(p != 0 and ok(i, p - 1) for i, p in enumerate(picks)) / len(questions)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--faq", required=True)
    p.add_argument("--rephrased", required=True)
    p.add_argument("--name", required=True)
    args = p.parse_args()
    entries = data_mod.load_faq(args.faq).entries
    pool = list(dict.fromkeys(e.answer for e in entries))
    rows = [json.loads(line) for line in Path(args.rephrased).read_text(encoding="utf-8").splitlines() if line.strip()]
    questions, refs = [r["question"] for r in rows], [entries[r["id"]].answer for r in rows]
    cfg = RunDir(args.run).load_config()
    model, tok, cfg = load_for_inference(args.run, cfg=cfg)
    hits = open_run_index(args.run).search_many(questions, k=K)

    def ok(i: int, position: int) -> bool:
        return position < len(hits[i]) and matches_own_answer(hits[i][position].answer, refs[i], pool)

    result = {"run": args.run, "faq": args.faq, "questions": len(questions),
              "run_grounding": cfg.to_dict()["grounding"], "run_lora_r": cfg.lora.r,
              "retrieval_top1": sum(ok(i, 0) for i in range(len(questions))) / len(questions),
              "retrieval_top3_recall": sum(any(ok(i, j) for j in range(K)) for i in range(len(questions)))
              / len(questions)}
    result["tuned"] = side(model, tok, cfg, questions, hits, ok, cfg.grounding.choice)
    with model.disable_adapter():
        result["base"] = side(model, tok, cfg, questions, hits, ok, cfg.grounding.choice)
    print(json.dumps(result, indent=1))
    path = ROOT / "benchmarks" / "results"
    files = sorted(path.glob("*-reader-rerank.json"))
    everything = json.loads(files[-1].read_text()) if files else {}
    everything.setdefault("runs", {})[args.name] = result
    everything.pop("date", None)
    everything.pop("commit", None)
    write_result(everything, "-reader-rerank")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
