"""One answer's latency on CPU: the 4-bit base + adapter as trained vs the adapter merged into the dequantized
weights (fp32 and bf16), without and with prompt-lookup decoding (`generation.prompt_lookup`), side by side in
one process on the same run and questions.

    python benchmarks/latency.py RUN_DIR [--questions 20] [--faq FAQ]

For each way of loading: p50 / mean seconds for one grounded answer (asked one at a time, as a user waits),
mean answer tokens, load seconds, and answer accuracy over every FAQ question (the merge must not change the
answers). Writes benchmarks/results/<date>-latency.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import write_result

from faqtune.data import bundled_faq_path, load_faq
from faqtune.grounding import make_answerer
from faqtune.loading import load_for_inference
from faqtune.metrics import answer_accuracy


def measure(run: str, mode: str, lookup: int, questions: list[str], refs: list[str], n: int) -> dict:
    started = time.perf_counter()
    model, tok, cfg = load_for_inference(run, merged=mode)
    loaded = time.perf_counter() - started
    cfg.generation.prompt_lookup = lookup
    bot = make_answerer(run, model, tok, cfg)
    bot.ask(questions[0])  # warm-up
    seconds, tokens = [], []
    for q in questions[:n]:
        t = time.perf_counter()
        a = bot.ask(q)[0]
        seconds.append(time.perf_counter() - t)
        tokens.append(a.new_tokens)
    answers = [a.text for a in bot.ask_many(questions, batch_size=16)]
    return {"load_s": loaded, "p50_s": statistics.median(seconds), "mean_s": statistics.fmean(seconds),
            "mean_answer_tokens": statistics.fmean(tokens), "answer_accuracy": answer_accuracy(answers, refs, refs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--faq", help="questions and references (default: the run's FAQ)")
    p.add_argument("--questions", type=int, default=20, help="answered one at a time for the latency")
    args = p.parse_args()
    from faqtune.run import RunDir

    faq = args.faq or RunDir(args.run).load_config().data.path or bundled_faq_path()  # None: the bundled FAQ
    entries = load_faq(faq).entries
    questions, refs = [e.question for e in entries], [e.answer for e in entries]
    ways = {"4-bit + adapter": ("none", 0), "merged, fp32": ("fp32", 0), "merged, bf16": ("bf16", 0),
            "defaults (merged auto, prompt lookup 10)": ("auto", 10)}
    rows = {name: measure(args.run, mode, lookup, questions, refs, args.questions)
            for name, (mode, lookup) in ways.items()}
    print(f"{'loading':42s} {'load s':>7s} {'p50 s':>6s} {'mean s':>7s} {'tokens':>7s} {'accuracy':>9s}")
    for name, r in rows.items():
        print(f"{name:42s} {r['load_s']:7.1f} {r['p50_s']:6.2f} {r['mean_s']:7.2f} {r['mean_answer_tokens']:7.1f} "
              f"{r['answer_accuracy']:9.3f}")
    speedup = rows["4-bit + adapter"]["p50_s"] / rows["defaults (merged auto, prompt lookup 10)"]["p50_s"]
    print(f"p50 speedup of the defaults over the model as trained: {speedup:.2f}x")
    write_result({"run": args.run, "faq": str(faq), "rows": rows, "p50_speedup": speedup}, "-latency")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
