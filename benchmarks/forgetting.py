"""What the grounded fine-tune forgets, lever by lever: general-text perplexity against the base and the
held-out rephrased accuracy of the grounded bot, for training variants side by side.

    python benchmarks/forgetting.py --steps 20 --variant "defaults:" --variant "r16:lora.r=16" \\
        --variant "lr1e-3:train.learning_rate=0.001" --variant "mix0.2:data.mix=general:0.2"

Each variant trains on --faq (default: the shared e-commerce FAQ) in its own process with --threads torch
threads (variants run --parallel at a time; threads x parallel <= cores avoids oversubscription), then is
measured in that process: perplexity of the bundled general text (`faqtune/data/general_text.txt`) with the
adapter and with it disabled, and the grounded bot's answer accuracy on --rephrased (never trained on).
A variant is NAME:key=value,key=value (faqtune config keys; `data.mix=general:0.2` keeps its colon).
Writes benchmarks/results/<date>-forgetting.json with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, write_result

SHARED = ROOT.parent / "shared" / "data" / "ecommerce_faq.json"
REPHRASED = ROOT / "benchmarks" / "data" / "shared_ecommerce_rephrased.jsonl"


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, settings = text.partition(":")
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = value.strip()
    return name, overrides


def _child(spec: dict) -> dict:
    import torch

    from faqtune import data as data_mod
    from faqtune.config import load_config
    from faqtune.evaluate import text_perplexity
    from faqtune.grounding import make_answerer
    from faqtune.loading import load_for_inference
    from faqtune.metrics import matches_own_answer
    from faqtune.train import train

    torch.set_num_threads(spec["threads"])
    cfg = load_config(None, spec["overrides"])
    summary = train(cfg)
    run = spec["overrides"]["output_dir"]
    model, tok, cfg = load_for_inference(run)
    text = data_mod.packaged("general_text.txt").read_text(encoding="utf-8")
    tuned = text_perplexity(model, tok, text)
    with model.disable_adapter():
        base = text_perplexity(model, tok, text)
    entries = data_mod.load_faq(spec["overrides"]["data.path"]).entries
    pool = list(dict.fromkeys(e.answer for e in entries))
    rows = [json.loads(line) for line in Path(spec["rephrased"]).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    answers = make_answerer(run, model, tok, cfg).ask_many([r["question"] for r in rows])
    accuracy = sum(matches_own_answer(a.text, entries[r["id"]].answer, pool)
                   for a, r in zip(answers, rows, strict=True)) / len(rows)
    return {"perplexity_ratio": tuned / base, "tuned_perplexity": tuned, "base_perplexity": base,
            "rephrased_accuracy": accuracy, "steps": summary["steps"], "train_seconds": summary["train_seconds"],
            "final_loss": summary["final_loss"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--faq", default=str(SHARED))
    p.add_argument("--rephrased", default=str(REPHRASED))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--suffix", default="", help="appended to the result file's name: results/<date>-forgetting"
                                                "<suffix>.json (keeps earlier runs of the day)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
        return 0
    if not args.variant:
        p.error("give at least one --variant")
    work = Path(tempfile.mkdtemp(prefix="faqtune-forgetting-"))
    pending, results = [parse_variant(v) for v in args.variant], {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    while pending:
        batch, pending = pending[:args.parallel], pending[args.parallel:]
        procs = []
        for name, overrides in batch:
            spec = {"threads": args.threads, "rephrased": args.rephrased,
                    "overrides": {"data.path": args.faq, "train.max_steps": str(args.steps),
                                  "output_dir": str(work / name.replace(" ", "_")), **overrides}}
            procs.append((name, overrides, subprocess.Popen(
                [sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                env=env)))
        for name, overrides, proc in procs:
            out, _ = proc.communicate()
            line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
            results[name] = {"overrides": overrides, **(json.loads(line[7:]) if line else
                                                        {"error": f"exit {proc.returncode}"})}
            print(name, results[name], flush=True)
    write_result({"faq": args.faq, "rephrased": args.rephrased, "steps": args.steps, "threads": args.threads,
                  "parallel": args.parallel, "variants": results}, "-forgetting" + args.suffix)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
