"""Follow-up accuracy of a grounded run with the conversation's earlier turns shown to the model or not
(`grounding.history`), side by side in one process on the same retrieved entries.

    python benchmarks/followup_history.py --run runs/reader-shared-v7 --faq ../shared/data/ecommerce_faq.json \\
        --conversations benchmarks/data/shared_ecommerce_conversations.jsonl --name shared
    python benchmarks/followup_history.py --run runs/reader-bundled-v7 --name bundled   # the bundled FAQ's set

Both readings search the same way (the follow-up alone and with the previous question, `retrieve_turns`);
they differ only in what the model reads. Writes faqs.<name> of benchmarks/results/<date>-followup-history.json
(other FAQs kept) with the machine named.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from common import add_to_result

from faqtune import data as data_mod
from faqtune.data import packaged
from faqtune.evaluate import follow_up_side, read_conversations
from faqtune.grounding import GroundedAnswerer, open_run_index
from faqtune.loading import load_for_inference
from faqtune.report import to_dict


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a grounded run trained on --faq")
    p.add_argument("--faq", default=str(data_mod.bundled_faq_path()))
    p.add_argument("--conversations", default=None, help="JSONL {turns, id} (default: the bundled FAQ's set)")
    p.add_argument("--name", required=True)
    args = p.parse_args()
    convs_path = args.conversations or str(packaged("ecommerce_faq_conversations.jsonl"))
    entries = data_mod.load_faq(args.faq).entries
    pool = list(dict.fromkeys(e.answer for e in entries))
    convs = read_conversations(convs_path, entries)
    index = open_run_index(args.run)
    model, tok, cfg = load_for_inference(args.run)
    out: dict = {"run": args.run, "faq": args.faq, "conversations": convs_path, "n": len(convs[0])}
    for history in (True, False):
        c = replace(cfg, grounding=replace(cfg.grounding, history=history))
        bot = GroundedAnswerer(model, tok, c.generation, c.data.system_prompt, index, c)
        side = to_dict(follow_up_side(bot, *convs, pool))
        out[f"history_{str(history).lower()}"] = side
        print(f"{args.name}: history {history}: follow-up accuracy {side['accuracy']:.3f}", flush=True)
    add_to_result("-followup-history", args.name, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
