"""Answer accuracy and stop rate of a tuned bot on the FAQ it was trained on.

    python benchmarks/answer_accuracy.py                       # train on ../shared/data/ecommerce_faq.json, then measure
    python benchmarks/answer_accuracy.py --run-dir runs/x      # measure an existing run on its training FAQ
    python benchmarks/answer_accuracy.py --set train.epochs=4  # any config override

Answer accuracy: the share of questions whose generated answer is closer (ROUGE-L) to its own reference
answer than to any other answer in the FAQ. Stop rate: the share of answers that end with EOS before
max_new_tokens. The base model (no adapter) is measured too, side by side, with --compare-base.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from faqtune.config import load_config
from faqtune.data import load_faq
from faqtune.generate import Answerer
from faqtune.loading import load_for_inference
from faqtune.metrics import answer_accuracy, rouge_l
from faqtune.train import train

ROOT = Path(__file__).resolve().parents[1]


def measure(run_dir: str, faq_path: str, base_only: bool, batch_size: int) -> dict:
    model, tokenizer, cfg = load_for_inference(run_dir, base_only=base_only)
    bot = Answerer(model, tokenizer, cfg.generation, cfg.data.system_prompt)
    entries = load_faq(faq_path).entries
    questions = [e.question for e in entries]
    refs = [e.answer for e in entries]
    started = time.time()
    answers = bot.ask_many(questions, batch_size=batch_size)
    seconds = time.time() - started
    texts = [a.text for a in answers]
    return {
        "model": "base" if base_only else "tuned",
        "questions": len(questions),
        "answer_accuracy": round(answer_accuracy(texts, refs, refs), 4),
        "stop_rate": round(sum(a.stopped for a in answers) / len(answers), 4),
        "mean_rouge_l": round(statistics.mean(rouge_l(t, r) for t, r in zip(texts, refs, strict=True)), 4),
        "mean_answer_tokens": round(statistics.mean(a.new_tokens for a in answers), 1),
        "generation_seconds": round(seconds, 1),
        "samples": [{"q": q, "ref": r, "answer": t} for q, r, t in list(zip(questions, refs, texts, strict=True))[:3]],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ecommerce_faq.json"))
    p.add_argument("--run-dir", default=None, help="measure this run instead of training a new one")
    p.add_argument("--output", default=str(ROOT / "runs" / "bench-accuracy"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--compare-base", action="store_true")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    run_dir = args.run_dir
    result: dict = {"data": args.data}
    if run_dir is None:
        overrides = {"data.path": args.data, "data.eval_fraction": 0, "output_dir": args.output}
        overrides.update(kv.split("=", 1) for kv in args.set)
        cfg = load_config(None, overrides)
        result["train"] = train(cfg)
        run_dir = args.output
    rows = [measure(run_dir, args.data, False, args.batch_size)]
    if args.compare_base:
        rows.insert(0, measure(run_dir, args.data, True, args.batch_size))
    result["results"] = rows
    print(f"{'model':6s} {'accuracy':>9s} {'stop_rate':>9s} {'rougeL':>7s} {'tokens':>7s} {'gen_s':>6s}")
    for r in rows:
        print(f"{r['model']:6s} {r['answer_accuracy']:9.3f} {r['stop_rate']:9.3f} {r['mean_rouge_l']:7.3f} "
              f"{r['mean_answer_tokens']:7.1f} {r['generation_seconds']:6.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
