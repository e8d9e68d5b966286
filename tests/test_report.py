"""The eval report object: report.json's shape kept (round trip, absent sides left out), reports written by older
versions read back (the model card reads them from disk), one summary for report.md and `faqtune eval`."""

from __future__ import annotations

import json
import os

import pytest

from faqtune.report import EvalReport, render_markdown, summary, to_dict, write_report
from faqtune.run import RunDir
from faqtune.ship.hub import _eval_section, eval_figures

FIGURES = dict(answer_accuracy=0.5, mean_rouge_l=0.61, mean_token_f1=0.66, exact_match=0.25, stop_rate=0.75,
               mean_answer_tokens=23.5, template_leaks=1, latency_p50_s=0.12, latency_p95_s=0.3,
               tokens_per_second=88.1, answer_loss=1.25, answer_perplexity=3.49, offtopic_decline_rate=0.8,
               false_decline_rate=0.1)
BASE = {**{k: v / 2 for k, v in FIGURES.items()}, "template_leaks": 3}


def _row(answer: str, match: bool, source: dict | None = None) -> dict:
    return {"answer": answer, "match": match, "rouge_l": 0.5, "token_f1": 0.4, "exact": False, "stopped": True,
            "tokens": 7, "seconds": 0.1, "source": source}


def full_report() -> dict:
    """report.json as `faqtune eval --compare-base --conversations F` writes it for a grounded run."""
    follow_row = {"turns": ["returns?", "and shoes?"], "reference": "R", "answer": "A", "match": True}
    return {
        "source": "runs/x/data/eval.jsonl", "questions_evaluated": 2, "offtopic_questions": 2,
        "tuned": dict(FIGURES), "base": dict(BASE),
        "grounding": {
            "threshold": 0.42, "tuned_without_grounding": {"answer_accuracy": 0.3, "false_decline_rate": 0.0},
            "retrieval_only": {"answer_accuracy": 0.6, "answer_accuracy_with_threshold": 0.55,
                               "offtopic_decline_rate": 0.9, "false_decline_rate": 0.05},
            "retrieval_topk": {"k": 3, "recall": 0.95},
            "tuned_grounded": {"answer_accuracy": 0.5, "offtopic_decline_rate": 0.8, "false_decline_rate": 0.1},
            "citations_right": 0.75,
            "differences": [{"question": "Q1?", "reference": "R1", "retrieval_only": "B1", "retrieval_match": True,
                             "tuned": "T1", "tuned_match": False}],
            "related_reached": 0.875},
        "follow_ups": {"conversations": 1, "tuned": {"accuracy": 1.0, "rows": [follow_row]},
                       "retrieval_only": 0.5, "retrieval_only_with_threshold": 0.25,
                       "base": {"accuracy": 0.0, "rows": [{**follow_row, "answer": "X", "match": False}]}},
        "forgetting": {"base": {"general_text_perplexity": 10.0, "general_instruction_rouge_l": 0.3},
                       "tuned": {"general_text_perplexity": 12.5, "general_instruction_rouge_l": 0.25},
                       "perplexity_ratio": 1.25, "general_instruction_rouge_drop": 0.05, "threshold": 0.2,
                       "flagged": True, "general_answers": [{"question": "gq", "base": "gb", "tuned": "gt"}]},
        "per_question": [
            {"question": "Q1?", "reference": "R1", "tuned": _row("T1", False, {"id": 3, "question": "q", "score": 0.9}),
             "base": _row("b1", False)},
            {"question": "Q2?", "reference": "R2", "tuned": _row("R2", True), "base": _row("b2", True)}],
        "offtopic_answers": [{"question": "o1", "tuned": "no", "base": "sure"},
                             {"question": "o2", "tuned": "no", "base": "ok"}],
        "run_dir": "/runs/x",
    }


def plain_report() -> dict:
    """report.json of a plain `faqtune eval` (no base, no grounding, no follow-ups) called as a library."""
    r = full_report()
    r.update(base=None, grounding=None, follow_ups=None)
    r["forgetting"]["flagged"] = False
    for row in r["per_question"] + r["offtopic_answers"]:
        del row["base"]
    del r["run_dir"]
    return r


def first_version_report() -> dict:
    """report.json as the first faqtune wrote it (60b807a): no grounding, no follow-ups, rows without a source."""
    r = plain_report()
    del r["grounding"], r["follow_ups"]
    for row in r["per_question"]:
        del row["tuned"]["source"]
    r["run_dir"] = "/runs/old"
    return r


@pytest.mark.parametrize("make", [full_report, plain_report])
def test_to_dict_round_trips_report_json_exactly(make):
    data = make()
    report = EvalReport.from_dict(json.loads(json.dumps(data)))
    assert json.dumps(report.to_dict()) == json.dumps(data)  # same keys, same order, nothing added
    assert EvalReport.from_dict(report.to_dict()) == report
    assert report.tuned.answer_accuracy == 0.5 and report.forgetting.general_answers[0].tuned == "gt"


def test_unmeasured_sides_are_left_out_or_null_as_before():
    data = EvalReport.from_dict(plain_report()).to_dict()
    assert data["base"] is None and data["grounding"] is None and data["follow_ups"] is None
    assert "run_dir" not in data and all("base" not in r for r in data["per_question"] + data["offtopic_answers"])
    report = EvalReport.from_dict(full_report())
    assert list(report.to_dict()["follow_ups"]) == ["conversations", "tuned", "retrieval_only",
                                                     "retrieval_only_with_threshold", "base"]
    report.follow_ups.base = report.follow_ups.retrieval_only = report.follow_ups.retrieval_only_with_threshold = None
    assert list(to_dict(report.follow_ups)) == ["conversations", "tuned"]


def test_summary_holds_the_headline_figures_and_opens_report_md():
    report = EvalReport.from_dict(full_report())
    text = summary(report)
    assert text.startswith("# faqtune evaluation\n\nRun: `/runs/x`\n")
    for needle in ("Answer accuracy 0.50** (base 0.25) on 2 questions from `runs/x/data/eval.jsonl`",
                   "Stops on its own in 75% of answers (mean 24 tokens); 1 leak", "Declines 80% of 2 off-topic",
                   "declines 10% of in-scope", "perplexity 10.0 -> 12.5 (x1.25, threshold +20%): **FORGETTING FLAGGED**"):
        assert needle in text
    report.base, report.forgetting.flagged = None, False
    assert "(base" not in summary(report) and "no forgetting flagged" in summary(report)
    md = render_markdown(report, {"comparison": "comparison.png"})
    assert md.startswith(summary(report) + "\n\n![Base vs tuned](comparison.png)\n\n## Figures\n")


def test_report_md_tables_read_the_object():
    md = render_markdown(EvalReport.from_dict(full_report()), {})
    assert "| answer accuracy | 0.250 | 0.500 | +0.250 |" in md
    assert "| answers leaking template markers | 3 | 1 | -2 |" in md
    assert "| retrieval top-3 recall (ceiling of a reader shown 3) | 0.950 | - | - |" in md
    assert "| tuned reader, right entry answered or offered as a related question | 0.875 | - | - |" in md
    assert "| base | 0.000 |" in md and "| retrieval alone, with the threshold | 0.250 |" in md
    assert "| 1 | Q1? | R1 | b1 | T1 | ❌ (base ❌) |" in md and "| o2 | no |" in md


def test_write_report_writes_the_object_as_report_json(tmp_path):
    data = full_report()
    md = write_report(EvalReport.from_dict(data), tmp_path)
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8")) == data
    assert EvalReport.load(tmp_path / "report.json") == EvalReport.from_dict(data)
    assert md.read_text(encoding="utf-8").startswith(summary(EvalReport.from_dict(data)))


def test_a_report_written_by_an_older_version_reads():
    report = EvalReport.from_dict(first_version_report())
    assert report.grounding is None and report.follow_ups is None
    assert report.per_question[0].tuned.source is None and report.run_dir == "/runs/old"
    md = render_markdown(report, {})
    assert "## Per question" in md and "## Retrieval alone" not in md and "Run: `/runs/old`" in md
    before_topk = full_report()  # grounding as 6e147ff wrote it: no top-k recall, no differences, no offers
    for key in ("retrieval_topk", "differences", "related_reached"):
        del before_topk["grounding"][key]
    grounding = EvalReport.from_dict(before_topk).grounding
    assert grounding.retrieval_topk is None and grounding.differences == [] and grounding.related_reached is None
    md = render_markdown(EvalReport.from_dict(before_topk), {}).split("## Follow-ups")[0]
    assert "recall" not in md and "related question" not in md


@pytest.mark.parametrize("data", [["not", "a", "report"], {"tuned": "high"}, {"tuned": {}, "per_question": {}},
                                  {"tuned": {}, "forgetting": {"general_answers": [3]}}])
def test_what_is_not_a_report_is_a_value_error(data):
    with pytest.raises(ValueError):
        EvalReport.from_dict(data)


def test_model_card_reads_the_newest_report_old_or_partial(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "eval").mkdir()
    assert eval_figures(run) is None
    old = tmp_path / "eval" / "report.json"
    old.write_text(json.dumps(first_version_report()))
    os.utime(old, (1, 1))
    for name, text in (("notes.json", '{"comment": "no figures"}'), ("list.json", "[1, 2]"), ("cut.json", '{"tu')):
        (tmp_path / "eval" / name).write_text(text)
    report = eval_figures(run)
    assert report is not None and report.run_dir == "/runs/old"
    card = "\n".join(_eval_section(report))
    assert "`faqtune eval` on 2 questions (eval.jsonl)." in card and "| answer accuracy | 0.500 |" in card
    assert "| measure | tuned |\n" in card and "ratio tuned/base: 1.25." in card
    partial = tmp_path / "eval" / "partial.json"  # a hand-written report: only some figures
    partial.write_text(json.dumps({"tuned": {"answer_accuracy": 0.5}, "base": {"answer_accuracy": 0.0},
                                   "forgetting": {"perplexity_ratio": 1.3, "flagged": True}}))
    card = _eval_section(eval_figures(run))
    assert card[2] == "`faqtune eval` on ? questions ()." and "| answer accuracy | 0.500 | 0.000 |" in card
    assert "| answer loss" not in "\n".join(card) and card[-2].endswith("1.30 (flagged as forgetting).")
