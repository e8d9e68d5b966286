"""The grounded reader on questions it never saw: base / retrieval alone / tuned side by side, per FAQ.

    python benchmarks/reader.py --run runs/reader-shared-default --faq ../shared/data/ecommerce_faq.json \\
        --rephrased benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --keywords benchmarks/data/shared_ecommerce_keywords.jsonl \\
        --conversations benchmarks/data/shared_ecommerce_conversations.jsonl --name shared
    python benchmarks/reader.py --run runs/reader-bundled-default --name bundled      # the bundled FAQ's sets
    python benchmarks/reader.py --faq ../shared/data/bank_faq.csv --rephrased benchmarks/data/bank_rephrased.jsonl \\
        --name bank                                                                  # no --run: retrieval alone

Held-out sets (never trained on; the script counts any that appear among the run's training questions):
rephrasings, keyword queries ("registration", "return policy"), two-turn conversations, and off-topic
questions written for this benchmark (`benchmarks/data/offtopic_heldout.txt`, not the calibration set).
"base" = the untuned base reading the same retrieved entries (adapter disabled), "tuned" = the run.
Each FAQ's figures go under faqs.<name> of benchmarks/results/<date>-reader.json (other FAQs kept).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

from common import ROOT, add_to_result, read_heldout, scratch_index

from faqtune import data as data_mod
from faqtune.data import packaged
from faqtune.evaluate import (
    answer_all,
    follow_up_side,
    read_conversations,
    read_offtopic,
    retrieval_follow_ups,
    text_perplexity,
)
from faqtune.grounding import GroundedAnswerer, is_decline, open_run_index
from faqtune.metrics import matches_own_answer
from faqtune.report import to_dict

OFFTOPIC = ROOT / "benchmarks" / "data" / "offtopic_heldout.txt"
BUNDLED = data_mod.bundled_faq_path()


def read_set(path: str | None, entries) -> tuple[list[str], list[str]]:
    if not path:
        return [], []
    return read_heldout(path, entries)


def retrieval_figures(index, questions, refs, pool, threshold) -> dict:
    """Top-1 verbatim (with and without the threshold), top-3 recall (dense and hybrid), declines."""
    dense = index.search_many(questions, k=3)
    hybrid = index.search_many(questions, k=3, hybrid=True)

    def ok(hit, ref):
        return matches_own_answer(hit.answer, ref, pool)

    n = max(1, len(questions))
    return {
        "top1_accuracy": sum(bool(h) and ok(h[0], r) for h, r in zip(dense, refs, strict=True)) / n,
        "top1_accuracy_with_threshold": sum(bool(h) and h[0].score >= threshold and ok(h[0], r)
                                            for h, r in zip(dense, refs, strict=True)) / n,
        "declined_below_threshold": sum(not h or h[0].score < threshold for h in dense) / n,
        "top3_recall": sum(any(ok(x, r) for x in h) for h, r in zip(dense, refs, strict=True)) / n,
        "hybrid_top1_accuracy": sum(bool(h) and ok(h[0], r) for h, r in zip(hybrid, refs, strict=True)) / n,
        "hybrid_top3_recall": sum(any(ok(x, r) for x in h) for h, r in zip(hybrid, refs, strict=True)) / n,
    }


def reader_figures(bot, questions, refs, pool) -> dict:
    answers = bot.ask_many(questions)
    n = max(1, len(questions))
    return {"accuracy": sum(matches_own_answer(a.text, r, pool) for a, r in zip(answers, refs, strict=True)) / n,
            "declined": sum(a.declined or is_decline(a.text) for a in answers) / n,
            "answers": [a.text for a in answers]}


def in_training(run: Path, questions: list[str]) -> int:
    path = run / "data" / "train_grounded.jsonl"
    if not path.exists():
        return 0
    seen = {r["question"].rsplit("Question: ", 1)[-1].strip().lower()
            for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    return sum(q.strip().lower() in seen for q in questions)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a grounded run trained on --faq (omit: retrieval alone)")
    p.add_argument("--faq", default=str(BUNDLED))
    p.add_argument("--rephrased", default=None)
    p.add_argument("--keywords", default=None)
    p.add_argument("--conversations", default=None)
    p.add_argument("--offtopic", default=str(OFFTOPIC), help="off-topic questions, one a line (held out)")
    p.add_argument("--name", required=True, help="key of this FAQ in the result file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="without --run: a config override for the index built (e.g. grounding.embedder_epochs=1)")
    p.add_argument("--latency-questions", type=int, default=10)
    p.add_argument("--base-max-new-tokens", type=int, default=64, help="cap of the base's answers (it rambles)")
    p.add_argument("--base-follow-ups", action="store_true", help="also ask the base the conversations (slow)")
    p.add_argument("--priors", default="0,1,2", help="a choice run: also score the tuned reader with these "
                                                      "grounding.retrieval_prior weights (no retraining)")
    args = p.parse_args()
    if Path(args.faq).resolve() == BUNDLED.resolve():  # the bundled FAQ's own held-out sets by default
        for key in ("rephrased", "keywords", "conversations"):
            if getattr(args, key) is None:  # '' skips a set
                setattr(args, key, str(packaged(f"ecommerce_faq_{key}.jsonl")))

    entries = data_mod.load_faq(args.faq).entries
    pool = list(dict.fromkeys(e.answer for e in entries))
    sets = {"rephrased": read_set(args.rephrased, entries), "keywords": read_set(args.keywords, entries)}
    sets = {k: v for k, v in sets.items() if v[0]}
    offtopic = read_offtopic(args.offtopic)
    convs = read_conversations(args.conversations, entries) if args.conversations else None
    if args.run:
        index = open_run_index(args.run)
    else:
        overrides = dict(kv.split("=", 1) for kv in args.set)
        index = scratch_index(entries, overrides)
    threshold = index.threshold
    print(f"index ready ({len(entries)} entries, threshold {threshold:.3f})", flush=True)
    out: dict = {"faq": args.faq, "entries": len(entries), "threshold": threshold, "run": args.run,
                 "sets": {k: len(v[0]) for k, v in sets.items()}, "offtopic": len(offtopic)}
    out["retrieval_only"] = {k: retrieval_figures(index, q, r, pool, threshold) for k, (q, r) in sets.items()}
    off_hits = index.search_many(offtopic, k=1)
    out["retrieval_only"]["offtopic_decline_rate"] = sum(not h or h[0].score < threshold for h in off_hits) / len(
        offtopic)
    if convs:
        out["retrieval_only"]["followup_accuracy"] = retrieval_follow_ups(index, *convs, pool, None)
        out["retrieval_only"]["followup_accuracy_with_threshold"] = retrieval_follow_ups(index, *convs, pool,
                                                                                         threshold)
    if args.run:
        out.update(measure_run(Path(args.run), index, sets, pool, offtopic, convs, args.latency_questions,
                               args.base_max_new_tokens, args.base_follow_ups,
                               [float(w) for w in args.priors.split(",") if w.strip()]))
    out.update(headline(out))
    print_table(args.name, out)
    save(args.name, out)
    return 0


def measure_run(run: Path, index, sets, pool, offtopic, convs, latency_questions: int, base_max_new_tokens: int,
                base_follow_ups: bool, priors: list[float]) -> dict:
    from faqtune.loading import load_for_inference
    from faqtune.run import RunDir

    cfg = RunDir(run).load_config()
    out: dict = {"held_out_in_training": {k: in_training(run, q) for k, (q, _) in sets.items()},
                 "run_config": {"grounding": cfg.to_dict()["grounding"], "train": cfg.to_dict()["train"],
                                "lora_r": cfg.lora.r, "mix": cfg.data.mix}}
    model, tok, cfg = load_for_inference(run, cfg=cfg)
    bot = GroundedAnswerer(model, tok, cfg.generation, cfg.data.system_prompt, index, cfg)
    for side in ("tuned", "base"):
        if side == "base":  # the base rambles to the token limit: capped (answer accuracy needs no more)
            ctx = model.disable_adapter()
            ctx.__enter__()
            bot.gen = replace(cfg.generation, max_new_tokens=base_max_new_tokens)
        f = {}
        for k, (q, r) in sets.items():
            f[k] = reader_figures(bot, q, r, pool)
            print(f"{side} {k}: accuracy {f[k]['accuracy']:.3f}", flush=True)
        off = bot.ask_many(offtopic)
        f["offtopic_decline_rate"] = sum(a.declined or is_decline(a.text) for a in off) / len(offtopic)
        if convs and (side == "tuned" or base_follow_ups):
            f["followup"] = to_dict(follow_up_side(bot, *convs, pool))  # this benchmark's JSON: accuracy, rows
            print(f"{side} follow-ups: {f['followup']['accuracy']:.3f}", flush=True)
        f["general_text_perplexity"] = text_perplexity(model, tok, packaged("general_text.txt").read_text())
        if side == "tuned" and cfg.grounding.choice:
            f["by_retrieval_prior"] = prior_sweep(bot, sets, pool, priors)
        if side == "base":
            ctx.__exit__(None, None, None)
            f["max_new_tokens"] = base_max_new_tokens
        out[side] = f
    del model, bot
    if latency_questions > 0:
        model, tok, cfg = load_for_inference(run, cfg=cfg, merged=cfg.generation.merged)  # as `faqtune ask` loads
        bot = GroundedAnswerer(model, tok, cfg.generation, cfg.data.system_prompt, index, cfg)
        questions = next(iter(sets.values()))[0][:latency_questions]
        _, seconds = answer_all(bot, questions)
        out["latency_p50_s"] = sorted(seconds)[len(seconds) // 2]
        out["latency_merged"] = cfg.generation.merged
    return out


def prior_sweep(bot, sets, pool, priors: list[float]) -> dict:
    """The tuned choice step's accuracy under other `grounding.retrieval_prior` weights (then restored)."""
    kept, out = bot.grounding, {}
    for w in priors:
        bot.grounding = replace(kept, retrieval_prior=w)
        out[str(w)] = {k: reader_figures(bot, q, r, pool)["accuracy"] for k, (q, r) in sets.items()}
        print(f"tuned, retrieval_prior {w}: {out[str(w)]}", flush=True)
    bot.grounding = kept
    return out


def headline(out: dict) -> dict:
    """The issue's named figures (None where not measured)."""
    r = out["retrieval_only"]
    t = out.get("tuned", {})
    h = {
        "retrieval_top1_accuracy": r.get("rephrased", {}).get("top1_accuracy"),
        "retrieval_top1_accuracy_with_threshold": r.get("rephrased", {}).get("top1_accuracy_with_threshold"),
        "retrieval_topk_recall": r.get("rephrased", {}).get("top3_recall"),
        "keyword_retrieval_top1_accuracy": r.get("keywords", {}).get("top1_accuracy"),
        "keyword_retrieval_top1_accuracy_with_threshold": r.get("keywords", {}).get("top1_accuracy_with_threshold"),
        "keyword_retrieval_topk_recall": r.get("keywords", {}).get("top3_recall"),
        "reader_accuracy": t.get("rephrased", {}).get("accuracy"),
        "keyword_reader_accuracy": t.get("keywords", {}).get("accuracy"),
        "base_reader_accuracy": out.get("base", {}).get("rephrased", {}).get("accuracy"),
        "keyword_base_reader_accuracy": out.get("base", {}).get("keywords", {}).get("accuracy"),
        "offtopic_decline_rate": t.get("offtopic_decline_rate", r.get("offtopic_decline_rate")),
        "followup_accuracy": t.get("followup", {}).get("accuracy"),
        "retrieval_followup_accuracy": r.get("followup_accuracy"),
        "latency_p50_s": out.get("latency_p50_s"),
    }
    if t:
        n = sum(out["sets"].values())
        h["false_decline_rate"] = sum(t[k]["declined"] * out["sets"][k] for k in out["sets"]) / max(1, n)
        h["perplexity_ratio"] = t["general_text_perplexity"] / out["base"]["general_text_perplexity"]
    else:
        n = sum(out["sets"].values())
        h["false_decline_rate"] = sum(r[k]["declined_below_threshold"] * out["sets"][k] for k in out["sets"]) / max(
            1, n)
        h["perplexity_ratio"] = None
    return h


def print_table(name: str, out: dict) -> None:
    r, t, b = out["retrieval_only"], out.get("tuned"), out.get("base")
    print(f"\n{name}: {out['entries']} entries, threshold {out['threshold']:.3f}, sets {out['sets']}, "
          f"{out['offtopic']} off-topic")
    print(f"{'':34s} " + " ".join(f"{k:>10s}" for k in out["sets"]) + f" {'followup':>9s}")
    rows = [("retrieval top-1", [r[k]["top1_accuracy"] for k in out["sets"]], r.get("followup_accuracy")),
            ("retrieval top-1 + threshold", [r[k]["top1_accuracy_with_threshold"] for k in out["sets"]],
             r.get("followup_accuracy_with_threshold")),
            ("retrieval top-3 recall", [r[k]["top3_recall"] for k in out["sets"]], None),
            ("hybrid top-1", [r[k]["hybrid_top1_accuracy"] for k in out["sets"]], None),
            ("hybrid top-3 recall", [r[k]["hybrid_top3_recall"] for k in out["sets"]], None)]
    for label, side in (("base reader", b), ("tuned reader", t)):
        if side:
            rows.append((label, [side[k]["accuracy"] for k in out["sets"]], side.get("followup", {}).get("accuracy")))
    for label, vals, fu in rows:
        print(f"{label:34s} " + " ".join(f"{v:10.3f}" for v in vals) + (f" {fu:9.3f}" if fu is not None else ""))
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()
           if k in ("false_decline_rate", "offtopic_decline_rate", "perplexity_ratio", "latency_p50_s")})


def save(name: str, out: dict) -> None:
    add_to_result("-reader", name, {k: v for k, v in out.items() if not re.match(r"^_", k)})


if __name__ == "__main__":
    raise SystemExit(main())
