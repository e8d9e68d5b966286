"""Where in the calibration gap the decline threshold goes: false declines and off-topic declines, held out.

    python benchmarks/threshold_placement.py --name shared --faq ../shared/data/ecommerce_faq.json \\
        --in-scope benchmarks/data/shared_ecommerce_rephrased.jsonl \\
        --in-scope benchmarks/data/shared_ecommerce_keywords.jsonl [--set grounding.embedder_epochs=1]

`retrieval.calibrate_threshold` picks the gap between two calibration scores (the FAQ's own questions, noisily
spelled, against a bundled off-topic set) that best separates them, and cuts it at `cut_in_gap` (default
`CUT_IN_GAP`) of the way up from its lower end. Each index is built once; the top-1 scores of the calibration
sets and of held-out questions (in-scope sets, off-topic ones never used for calibration) are kept, and the cut
is recomputed for each fraction (`--fractions`) through the product's own `calibration_questions` and
`calibrate_threshold`. Figures go under faqs.<name> of benchmarks/results/<date>-threshold-placement.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import DATA, add_to_result, heldout_parser, read_heldout, scratch_index

from faqtune import data as data_mod
from faqtune.evaluate import read_offtopic
from faqtune.grounding import calibration_questions
from faqtune.retrieval import Hit, calibrate_threshold


class Scored:
    """The top-1 scores already measured, served as an index would (calibrate_threshold's only call)."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def search_many(self, questions, k=1):
        return [[Hit(0, q, "", self.scores[q])] for q in questions]


def main() -> int:
    p = heldout_parser(__doc__)
    p.add_argument("--offtopic", action="append", help="held-out off-topic questions, one a line (repeatable; "
                                                       "default benchmarks/data/offtopic_heldout.txt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    p.add_argument("--fractions", default="0.5,0.25,0.1")
    args = p.parse_args()

    entries = data_mod.load_faq(args.faq).entries
    held_in = {Path(path).stem: read_heldout(path, entries)[0] for path in args.in_scope}
    held_off = {Path(path).stem: read_offtopic(path)
                for path in args.offtopic or [DATA / "offtopic_heldout.txt"]}
    index = scratch_index(entries, dict(kv.split("=", 1) for kv in args.set))
    cal_in, cal_off = calibration_questions(entries, seed=0)  # build_index's own (its default seed)

    def top(questions):
        return [h[0].score if h else -1.0 for h in index.search_many(questions, k=1)]

    scores = {"cal_in": top(cal_in), "cal_off": top(cal_off)}
    scores |= {f"in:{name}": top(qs) for name, qs in held_in.items()}
    scores |= {f"off:{name}": top(qs) for name, qs in held_off.items()}
    stub = Scored({q: s for qs, key in ((cal_in, "cal_in"), (cal_off, "cal_off"))
                   for q, s in zip(qs, scores[key], strict=True)})
    out = {"faq": args.faq, "overrides": args.set, "stored_threshold": index.threshold, "cuts": {}}
    for fraction in [float(f) for f in args.fractions.split(",")]:
        cut = calibrate_threshold(stub, cal_in, cal_off, cut_in_gap=fraction)
        figures = {"threshold": cut}
        for key, values in scores.items():
            if key.startswith(("in:", "off:")):  # in scope: declines are false ones; off topic: the right ones
                figures[f"{key} declined"] = f"{sum(s < cut for s in values)}/{len(values)}"
        out["cuts"][str(fraction)] = figures
        print(f"{args.name} {args.set} fraction {fraction}: " + json.dumps(out["cuts"][str(fraction)]), flush=True)
    out["scores"] = scores
    print("written:", add_to_result("-threshold-placement", args.name, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
