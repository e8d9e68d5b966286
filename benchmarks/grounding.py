"""Grounded answers on rephrased questions the model never saw: (a) tuned without grounding, (b) retrieval
alone (top-1 entry's answer verbatim), (c) tuned + grounded; off-topic declines and false declines.

    python benchmarks/grounding.py                     # the bundled Northwind FAQ + its 88 rephrasings
    python benchmarks/grounding.py --faq ../shared/data/ecommerce_faq.json \\
        --rephrased benchmarks/data/shared_ecommerce_rephrased.jsonl
    python benchmarks/grounding.py --none-run runs/x   # reuse a trained --grounding none run for (a)

Both runs train on every FAQ entry (the rephrasings are the held-out set; they are never trained on).
Off-topic questions: the bundled evaluation set (the decline threshold is calibrated on a separate set).
Writes benchmarks/results/<date>-grounding-<faq>.json (<faq>: `bundled` or the FAQ file's stem).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from common import commit, write_result

from faqtune import data as data_mod
from faqtune.config import load_config
from faqtune.evaluate import build_eval_set, eval_accuracy, read_offtopic
from faqtune.generate import Answerer
from faqtune.grounding import GroundedAnswerer, is_decline, open_run_index, retrieval_only
from faqtune.loading import load_for_inference
from faqtune.run import RunDir
from faqtune.train import train

ROOT = Path(__file__).resolve().parents[1]



def trained(run_dir: Path, faq: str, mode: str, sets: list[str]) -> float:
    if (run_dir / "adapter" / "adapter_config.json").exists():
        return json.loads((run_dir / "summary.json").read_text())["train_seconds"]
    overrides = {"data.path": faq, "output_dir": str(run_dir), "data.eval_fraction": "0", "grounding.mode": mode}
    overrides.update(s.split("=", 1) for s in sets)
    return train(load_config(None, overrides))["train_seconds"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faq", default=str(data_mod.bundled_faq_path()))
    p.add_argument("--rephrased", default=str(data_mod.bundled_faq_path().parent / "ecommerce_faq_rephrased.jsonl"))
    p.add_argument("--runs", default=str(ROOT / "runs"), help="folder for the two runs (reused when present)")
    p.add_argument("--none-run", help="an existing --grounding none run on the same FAQ, for (a)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both runs")
    p.add_argument("--grounded-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the grounded run only (e.g. train.epochs=3)")
    args = p.parse_args()

    name = "bundled" if Path(args.faq).resolve() == data_mod.bundled_faq_path().resolve() else Path(args.faq).stem
    grounded_dir = Path(args.runs) / f"grounding-{name}-retrieval"
    none_dir = Path(args.none_run) if args.none_run else Path(args.runs) / f"grounding-{name}-none"
    seconds = {"retrieval": trained(grounded_dir, args.faq, "retrieval", args.set + args.grounded_set),
               "none": trained(none_dir, args.faq, "none", args.set)}

    cfg = RunDir(grounded_dir).load_config()
    es = build_eval_set(RunDir(grounded_dir), cfg, args.rephrased, args.faq)
    offtopic = read_offtopic(None)
    index = open_run_index(grounded_dir)
    figures: dict[str, dict] = {}

    model, tok, cfg = load_for_inference(grounded_dir)
    bot = GroundedAnswerer(model, tok, cfg.generation, cfg.data.system_prompt, index, cfg)
    started = time.time()
    answers = bot.ask_many(es.questions)
    per_answer = (time.time() - started) / len(es.questions)
    off = bot.ask_many(offtopic)
    cited = [a for a in answers if a.source]
    texts = index.answers([a.source["id"] for a in cited])
    figures["c_tuned_grounded"] = {
        "answer_accuracy": eval_accuracy(answers, es),
        "offtopic_decline_rate": sum(a.declined or is_decline(a.text) for a in off) / len(off),
        "false_decline_rate": sum(a.declined or is_decline(a.text) for a in answers) / len(answers),
        "citation_right": sum(texts[a.source["id"]] == r for a, r in zip(answers, es.references, strict=True)
                              if a.source) / max(1, len(cited)),
        "stop_rate": sum(a.stopped for a in answers) / len(answers),
        "seconds_per_answer_batched": per_answer,
    }
    bot.grounding = replace(bot.grounding, fallback=False)
    alone = bot.ask_many(es.questions)
    figures["c_without_fallback"] = {
        "answer_accuracy": eval_accuracy(alone, es),
        "offtopic_decline_rate": figures["c_tuned_grounded"]["offtopic_decline_rate"],
        "false_decline_rate": sum(a.declined or is_decline(a.text) for a in alone) / len(alone),
    }
    gated = retrieval_only(index, es.questions, bot.threshold, cfg.grounding.decline_message)
    gated_off = retrieval_only(index, offtopic, bot.threshold, cfg.grounding.decline_message)
    figures["b_retrieval_only"] = {
        "answer_accuracy": eval_accuracy(retrieval_only(index, es.questions), es),
        "answer_accuracy_with_threshold": eval_accuracy(gated, es),
        "offtopic_decline_rate": sum(a.declined for a in gated_off) / len(gated_off),
        "false_decline_rate": sum(a.declined for a in gated) / len(gated),
    }
    threshold = bot.threshold
    del model, bot
    model, tok, ncfg = load_for_inference(none_dir)
    plain = Answerer(model, tok, ncfg.generation, ncfg.data.system_prompt)
    answers = plain.ask_many(es.questions)
    off = plain.ask_many(offtopic)
    figures["a_tuned_without_grounding"] = {
        "answer_accuracy": eval_accuracy(answers, es),
        "offtopic_decline_rate": sum(is_decline(a.text) for a in off) / len(off),
        "false_decline_rate": sum(is_decline(a.text) for a in answers) / len(answers),
        "stop_rate": sum(a.stopped for a in answers) / len(answers),
    }

    result = {
        "faq": args.faq, "rephrased": args.rephrased, "questions": len(es.questions), "offtopic": len(offtopic),
        "threshold": threshold, "train_seconds": seconds, "figures": figures,
        "commit": commit(),
        "grounded_overrides": args.set + args.grounded_set,
    }
    print(f"\n{len(es.questions)} rephrased questions, {len(offtopic)} off-topic; threshold {threshold:.3f}")
    print(f"{'':28s} {'accuracy':>9s} {'off-topic declined':>19s} {'false declines':>15s}")
    for key, f in figures.items():
        print(f"{key:28s} {f['answer_accuracy']:9.3f} {f['offtopic_decline_rate']:19.3f} {f['false_decline_rate']:15.3f}")
    print(f"{'b_retrieval_only, threshold':28s} {figures['b_retrieval_only']['answer_accuracy_with_threshold']:9.3f}"
          "  (the like-for-like (b): (c) declines below the same threshold)")
    write_result(result, f"-grounding-{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
