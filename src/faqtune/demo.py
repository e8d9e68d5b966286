"""The demo: train on the bundled FAQ (or reuse the run), then show base vs tuned answers side by side."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from importlib import resources

from faqtune.config import load_config
from faqtune.data import load_faq
from faqtune.generate import Answerer
from faqtune.grounding import cite, make_answerer
from faqtune.loading import load_for_inference
from faqtune.run import RunDir
from faqtune.train import train


def _demo_questions(run: RunDir) -> list[tuple[str, str, str]]:
    """(kind, question, reference) to show: trained questions, held-out ones, a rephrasing, an off-topic one."""
    picks: list[tuple[str, str, str]] = []
    trained = load_faq(run.train_split).entries
    picks += [("trained", e.question, e.answer) for e in trained[1:40:12]]
    if run.eval_split.exists() and run.eval_split.stat().st_size:
        e = load_faq(run.eval_split).entries[0]
        picks.append(("held out", e.question, e.answer))
    rephrased = resources.files("faqtune") / "data" / "ecommerce_faq_rephrased.jsonl"
    faq = {e.question: e.answer for e in trained}
    bundled = load_faq(resources.files("faqtune") / "data" / "ecommerce_faq.json").entries
    for line in rephrased.read_text(encoding="utf-8").splitlines()[:40]:
        row = json.loads(line)
        entry = bundled[row["id"]]
        if entry.question in faq:
            picks.append(("rephrased", row["question"], entry.answer))
            break
    picks.append(("off-topic", "How many moons does Jupiter have?", "(a polite decline)"))
    return picks


def side_by_side(left: str, right: str, width: int) -> str:
    col = (width - 3) // 2
    a = textwrap.wrap(left, col) or [""]
    b = textwrap.wrap(right, col) or [""]
    rows = max(len(a), len(b))
    a += [""] * (rows - len(a))
    b += [""] * (rows - len(b))
    return "\n".join(f"{x:<{col}} | {y}" for x, y in zip(a, b, strict=True))


def run_demo(output: str, overrides: dict, retrain: bool = False, out=sys.stdout) -> int:
    run = RunDir(output)
    if retrain and run.root.exists():
        shutil.rmtree(run.root)
    if run.has_adapter():
        print(f"reusing the trained run in {run.root} (pass --retrain to train again)", file=sys.stderr)
    else:
        train(load_config(None, {"output_dir": output, **overrides}))
    model, tokenizer, cfg = load_for_inference(run.root)
    bot = make_answerer(run.root, model, tokenizer, cfg)  # grounded when the run was trained so
    plain = Answerer(model, tokenizer, cfg.generation, cfg.data.system_prompt)
    picks = _demo_questions(run)
    questions = [q for _, q, _ in picks]
    tuned = bot.ask_many(questions)
    with model.disable_adapter():
        base = plain.ask_many(questions)  # the untuned base as the guide starts: no retrieval
    width = min(shutil.get_terminal_size((120, 24)).columns, 160)
    rule = "=" * width
    print(rule, file=out)
    print(side_by_side("BASE (untuned)", "TUNED (faqtune)", width), file=out)
    for (kind, q, ref), b, t in zip(picks, base, tuned, strict=True):
        print(rule, file=out)
        print(f"Q ({kind}): {q}", file=out)
        print(textwrap.fill(f"reference: {ref}", width, subsequent_indent="  "), file=out)
        print("-" * width, file=out)
        print(side_by_side(b.text, t.text + (f"  [{cite(t)}]" if cite(t) else ""), width), file=out)
    print(rule, file=out)
    print(f"run directory: {run.root}   try: faqtune ask {run.root} \"How do I return an item?\"", file=out)
    return 0
