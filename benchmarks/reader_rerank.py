"""Can the tuned model reorder retrieval's top k better than retrieval? Readings of the same held-out
questions, base (adapter disabled) and tuned side by side, against retrieval's own top 1:

- `choice`: the scored choice step of a `grounding.choice` run (reader.py): which of [0]..[3] the model
  puts first, how often each is first, and how much its scores vary from question to question (a model that
  learned nothing content-based scores every question alike);
- `likelihood`: each of the top-3 entries scored by the mean log-probability of its answer given the
  question alone (no entries shown), fused with retrieval's prior at several weights;
- `query_likelihood` (UPR, Sachan et al. 2022, arXiv:2204.07496): each of the top-k entries scored by the
  mean log-probability of the *customer's question* given the entry (its question and answer, or its
  question alone) and an instruction to write a question it answers, fused with retrieval's prior the same
  way. The entry's prompt is encoded once and its KV cache reused for every question that retrieved it.

    python benchmarks/reader_rerank.py --run runs/reader-shared-choiceonly --faq ../shared/data/ecommerce_faq.json \\
        --rephrased benchmarks/data/shared_ecommerce_rephrased.jsonl --name shared-choice-only
    OMP_NUM_THREADS=1 python benchmarks/reader_rerank.py --run runs/reader-shared-default \\
        --faq ../shared/data/ecommerce_faq.json --rephrased benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --keywords benchmarks/data/shared_ecommerce_keywords.jsonl --readings query_likelihood --k 3 5 \\
        --query-entry qa q --name shared-default-upr

Writes benchmarks/results/<date>-reader-rerank.json (one key per --name, others kept).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from common import ROOT, read_heldout, write_result

from faqtune import data as data_mod
from faqtune.grounding import grounded_question, open_run_index
from faqtune.loading import load_for_inference
from faqtune.metrics import matches_own_answer
from faqtune.prompting import IGNORE_INDEX, encode_conversation, with_system
from faqtune.reader import pick, retrieval_prior, score_choices
from faqtune.run import RunDir

K = 3  # the choice step's and the answer likelihood's number of entries (the choice runs were trained on 3)
WEIGHTS = (0.0, 0.3, 1.0, 3.0)
READINGS = ("likelihood", "choice", "query_likelihood")
QUERY_INSTRUCTION = "Write a question a customer might ask that this entry answers."


def mean_logprob(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean log-probability of the labelled targets; logits (T, V) predict targets (T,)."""
    keep = targets != IGNORE_INDEX
    return torch.log_softmax(logits[keep].float(), -1).gather(-1, targets[keep][:, None]).mean().item()


@torch.inference_mode()
def answer_logprob(model, tokenizer, system: str | None, question: str, answer: str) -> float:
    """Mean log-probability per token of `answer` after `question` alone."""
    msgs = with_system([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], system)
    enc = encode_conversation(tokenizer, msgs, 2048)
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    return mean_logprob(model(input_ids=ids, use_cache=False).logits[0, :-1], labels[0, 1:])


def query_prompt(entry_question: str, entry_answer: str | None) -> str:
    """The user turn of the query-likelihood reading: the entry, then the instruction."""
    shown = f"Q: {entry_question}" + (f"\nA: {entry_answer}" if entry_answer is not None else "")
    return f"FAQ entry:\n{shown}\n\n{QUERY_INSTRUCTION}"


@torch.inference_mode()
def query_logprobs(model, tokenizer, system: str | None, prompt: str, questions: list[str]) -> list[float]:
    """Mean log-probability per token of each question (as the assistant's turn, EOS included) after `prompt`.

    The prompt runs once; its KV cache is repeated over the batch of questions, right-padded (padding comes
    after every real token, so causal attention never sees it and no mask is needed)."""
    encs = [encode_conversation(tokenizer, with_system([{"role": "user", "content": prompt},
                                                        {"role": "assistant", "content": q}], system), 2048)
            for q in questions]
    n = next(t for t, label in enumerate(encs[0].labels) if label != IGNORE_INDEX)  # prompt length
    prefix = encs[0].input_ids[:n]
    if any(e.input_ids[:n] != prefix or e.labels[n - 1] != IGNORE_INDEX for e in encs):
        raise ValueError("the prompt does not tokenize the same before every question")
    out = model(input_ids=torch.tensor([prefix]), use_cache=True)
    last = out.logits[0, -1:]  # (1, V): predicts the first question token
    width = max(len(e.input_ids) - n for e in encs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([e.input_ids[n:] + [pad] * (width - len(e.input_ids) + n) for e in encs])  # (B, S)
    labels = torch.tensor([e.labels[n:] + [IGNORE_INDEX] * (width - len(e.labels) + n) for e in encs])
    # transformers 5.24 warns that `past_key_values` is renamed `cache` in 5.40; pyproject allows >=5.0
    cache = copy.deepcopy(out.past_key_values)
    cache.batch_repeat_interleave(len(encs))
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits  # (B, S, V)
    return [mean_logprob(torch.cat([last, logits[b, :-1]]), labels[b]) for b in range(len(encs))]


def query_scores(model, tok, system: str | None, questions: list[str], hits, with_answer: bool) -> list[list[float]]:
    """scores[i][j] = mean log p(questions[i] | hits[i][j]), one prompt pass per distinct entry."""
    by_entry: dict[tuple[str, str | None], list[tuple[int, int]]] = collections.defaultdict(list)
    for i, hs in enumerate(hits):
        for j, h in enumerate(hs):
            by_entry[(h.question, h.answer if with_answer else None)].append((i, j))
    scores = [[0.0] * len(hs) for hs in hits]
    for (q, a), pairs in by_entry.items():
        for (i, j), lp in zip(pairs, query_logprobs(model, tok, system, query_prompt(q, a),
                                                    [questions[i] for i, _ in pairs]), strict=True):
            scores[i][j] = lp
    return scores


def fused_accuracy(scores: list[list[float]], hits, k: int, ok) -> dict[str, float]:
    """Accuracy at each prior weight of the top-k entry maximising score + weight * retrieval's prior."""
    priors = [retrieval_prior([h.score for h in hs[:k]]) for hs in hits]
    out = {}
    for w in WEIGHTS:
        picks = [max(range(len(prior)), key=lambda n: s[n] + w * prior[n]) for s, prior in zip(scores, priors, strict=True)]
        out[str(w)] = sum(ok(i, p) for i, p in enumerate(picks)) / len(scores)
    return out


def choice_reading(model, tok, cfg, questions, hits, ok) -> dict:
    convs = [with_system([{"role": "user", "content": grounded_question(q, hs[:K])}], cfg.data.system_prompt)
             for q, hs in zip(questions, hits, strict=True)]
    logp = score_choices(model, tok, convs, K)
    first = collections.Counter(max(range(K + 1), key=lambda n: lp[n]) for lp in logp)
    out: dict = {"choice_first_counts": {str(n): first.get(n, 0) for n in range(K + 1)},
                 "choice_logp_stdev_across_questions": [round(statistics.pstdev(lp[n] for lp in logp), 4)
                                                        for n in range(K + 1)], "choice": {}}
    for w in WEIGHTS:
        picks = [pick(lp, [h.score for h in hs[:K]], w) for lp, hs in zip(logp, hits, strict=True)]
        out["choice"][str(w)] = sum(p != 0 and ok(i, p - 1) for i, p in enumerate(picks)) / len(questions)
    return out


def side(model, tok, cfg, questions, hits, ok, readings, ks, query_entry) -> dict:
    """Accuracies of the chosen readings for the model as it is now (adapter on or off)."""
    out: dict = {"seconds": {}}
    system = cfg.data.system_prompt
    if "likelihood" in readings:
        t = time.perf_counter()
        lik = [[answer_logprob(model, tok, system, q, h.answer) for h in hs[:K]]
               for q, hs in zip(questions, hits, strict=True)]
        out["likelihood"] = fused_accuracy(lik, hits, K, ok)
        out["seconds"]["likelihood"] = round(time.perf_counter() - t, 1)
    if "choice" in readings and cfg.grounding.choice:
        t = time.perf_counter()
        out.update(choice_reading(model, tok, cfg, questions, hits, ok))
        out["seconds"]["choice"] = round(time.perf_counter() - t, 1)
    if "query_likelihood" in readings:
        out["query_likelihood"] = {}
        for entry in query_entry:  # "qa": the entry's question and answer shown; "q": its question alone
            t = time.perf_counter()
            scores = query_scores(model, tok, system, questions, hits, with_answer=entry == "qa")
            out.setdefault("_scores", {})[f"query_likelihood_{entry}"] = scores  # for --scores-out; popped
            out["query_likelihood"][entry] = {f"top{k}": fused_accuracy([s[:k] for s in scores], hits, k, ok)
                                              for k in ks}
            out["seconds"][f"query_likelihood_{entry}"] = round(time.perf_counter() - t, 1)
    return out


def measure(model, tok, cfg, index, path: str, entries, pool, args) -> dict:
    """Retrieval's top 1 and top-k recall, then every reading tuned and base, on one held-out set."""
    questions, refs = read_heldout(path, entries)
    ks = sorted(set(args.k) | {K})
    hits = index.search_many(questions, k=max(ks))

    def ok(i: int, position: int) -> bool:
        return position < len(hits[i]) and matches_own_answer(hits[i][position].answer, refs[i], pool)

    n = len(questions)
    result: dict = {"questions": n, "retrieval_top1": sum(ok(i, 0) for i in range(n)) / n}
    for k in ks:
        result[f"retrieval_top{k}_recall"] = sum(any(ok(i, j) for j in range(k)) for i in range(n)) / n
    result["tuned"] = side(model, tok, cfg, questions, hits, ok, args.readings, args.k, args.query_entry)
    with model.disable_adapter():
        result["base"] = side(model, tok, cfg, questions, hits, ok, args.readings, args.k, args.query_entry)
    raw = {s: result[s].pop("_scores", {}) for s in ("tuned", "base")}
    if args.scores_out:  # one row per question: what a finer weight grid or an error analysis needs
        with open(args.scores_out, "a", encoding="utf-8") as f:
            for i, q in enumerate(questions):
                row = {"set": Path(path).name, "question": q, "hit_ids": [h.id for h in hits[i]],
                       "similarities": [h.score for h in hits[i]], "correct": [ok(i, j) for j in range(len(hits[i]))]}
                row.update({f"{s}_{r}": v[i] for s, readings in raw.items() for r, v in readings.items()})
                f.write(json.dumps(row) + "\n")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--faq", required=True)
    p.add_argument("--rephrased", required=True)
    p.add_argument("--keywords", help="a second held-out set (keyword queries), measured the same way")
    p.add_argument("--name", required=True)
    p.add_argument("--readings", nargs="+", choices=READINGS, default=["likelihood", "choice"],
                   help="choice only applies to a grounding.choice run")
    p.add_argument("--k", type=int, nargs="+", default=[K], help="top-k entries query_likelihood reranks")
    p.add_argument("--query-entry", nargs="+", choices=("qa", "q"), default=["qa"],
                   help="query_likelihood shows the entry's question and answer (qa) or its question alone (q)")
    p.add_argument("--scores-out", help="append each question's per-entry scores to this JSONL (not a result)")
    args = p.parse_args()
    entries = data_mod.load_faq(args.faq).entries
    pool = list(dict.fromkeys(e.answer for e in entries))
    cfg = RunDir(args.run).load_config()
    model, tok, cfg = load_for_inference(args.run, cfg=cfg)
    index = open_run_index(args.run)
    result = {"run": args.run, "faq": args.faq, "run_grounding": cfg.to_dict()["grounding"],
              "run_lora_r": cfg.lora.r, "readings": args.readings, "torch_threads": torch.get_num_threads()}
    if "query_likelihood" in args.readings:
        result.update(query_k=args.k, query_entry=args.query_entry, query_instruction=QUERY_INSTRUCTION)
    result.update(measure(model, tok, cfg, index, args.rephrased, entries, pool, args))
    if args.keywords:
        result["keywords"] = measure(model, tok, cfg, index, args.keywords, entries, pool, args)
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
