"""Evaluation: each metric on hand-made cases, eval-set building and its errors, the report, the forgetting flag."""

from __future__ import annotations

import json
import math

import pytest

from faqtune.cli import main
from faqtune.config import load_config
from faqtune.errors import DataError
from faqtune.evaluate import (
    EvalSet,
    build_eval_set,
    forgetting_flagged,
    score_answers,
    text_perplexity,
)
from faqtune.generate import Answer
from faqtune.grounding import is_decline
from faqtune.report import EvalReport, summary
from faqtune.run import RunDir

POOL = ["Returns are accepted within 45 days of delivery.",
        "Standard shipping costs $5.99 and takes 3 to 5 business days.",
        "You can reset your password from the login page."]


def _answer(text, stopped=True, n=10):
    return Answer(text, stopped, n, 20, raw=text)


def test_score_answers_known_values():
    es = EvalSet(["q1", "q2", "q3"], POOL, POOL, "hand-made")
    answers = [
        _answer(POOL[0]),                                      # exactly its own reference
        _answer(POOL[2]),                                      # another FAQ entry's answer
        _answer("blah " * 30, stopped=False, n=128),           # never stops
    ]
    figures, rows = score_answers(answers, [0.1, 0.2, 0.3], es)
    assert [r.match for r in rows] == [True, False, False]
    assert figures["answer_accuracy"] == pytest.approx(1 / 3)
    assert figures["exact_match"] == pytest.approx(1 / 3)
    assert rows[0].rouge_l == 1.0 and rows[0].token_f1 == 1.0
    assert rows[2].rouge_l == 0.0
    assert figures["stop_rate"] == pytest.approx(2 / 3)
    assert figures["mean_answer_tokens"] == pytest.approx((10 + 10 + 128) / 3)
    assert figures["latency_p50_s"] == pytest.approx(0.2)
    assert figures["latency_p95_s"] == pytest.approx(0.29)
    assert figures["tokens_per_second"] == pytest.approx(148 / 0.6)
    assert figures["template_leaks"] == 0


def test_template_leaks_are_counted():
    es = EvalSet(["q"], POOL[:1], POOL, "x")
    figures, _ = score_answers([Answer("Fine.", True, 5, 5, raw="Fine.\n<human>: more?")], [0.1], es)
    assert figures["template_leaks"] == 1


@pytest.mark.parametrize("text,expected", [
    ("I'm sorry, I can only help with questions about Northwind Outfitters orders.", True),
    ("Sorry, but I can't help with that request.", True),
    ("I am unable to answer questions outside of our store.", True),
    ("Returns are accepted within 45 days.", False),
    ("Our sorry-free guarantee covers all shoes.", False),
])
def test_is_decline(text, expected):
    assert is_decline(text) is expected


def test_forgetting_flag():
    assert forgetting_flagged(10.0, 12.5, 0.2) is True
    assert forgetting_flagged(10.0, 11.5, 0.2) is False
    assert forgetting_flagged(10.0, 9.0, 0.0) is False


def _run(tmp_path, faq_rows, eval_rows):
    run = RunDir(tmp_path / "run")
    (run.root / "data").mkdir(parents=True)
    faq = tmp_path / "faq.json"
    faq.write_text(json.dumps({"questions": faq_rows}))
    for path, rows in ((run.train_split, faq_rows), (run.eval_split, eval_rows)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, {"data.path": str(faq), "output_dir": str(run.root)})
    return run, cfg


ROWS = [{"question": f"Question {i}?", "answer": a} for i, a in enumerate(POOL)]


def test_default_eval_set_is_the_held_out_split(tmp_path):
    run, cfg = _run(tmp_path, ROWS, ROWS[1:2])
    es = build_eval_set(run, cfg)
    assert es.questions == ["Question 1?"] and es.references == [POOL[1]]
    assert set(POOL) <= set(es.pool)


def test_questions_paired_by_id_and_by_order(tmp_path):
    run, cfg = _run(tmp_path, ROWS, [])
    by_id = tmp_path / "rephrased.jsonl"
    by_id.write_text('{"id": 2, "question": "forgot pasword"}\n{"id": 0, "question": "send stuff back?"}\n')
    es = build_eval_set(run, cfg, by_id)
    assert es.references == [POOL[2], POOL[0]]
    by_order = tmp_path / "qs.txt"
    by_order.write_text("first?\nsecond?\n")
    assert build_eval_set(run, cfg, by_order).references == POOL[:2]
    with_answers = tmp_path / "qa.csv"
    with_answers.write_text("Question,Answer\nWhat?,Own answer here.\n")
    es = build_eval_set(run, cfg, with_answers)
    assert es.references == ["Own answer here."] and "Own answer here." in es.pool
    chat = tmp_path / "chat.jsonl"  # the chat format training takes: its question and its answer
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Where is it?"},
                                             {"role": "assistant", "content": "Chat answer."}]}) + "\n")
    es = build_eval_set(run, cfg, chat)
    assert (es.questions, es.references) == (["Where is it?"], ["Chat answer."])
    csv_ids = tmp_path / "ids.csv"  # every CSV value is text: its ids are strings of digits
    csv_ids.write_text("id,question\n2,forgot pasword\n 0 ,send stuff back?\n")
    assert build_eval_set(run, cfg, csv_ids).references == [POOL[2], POOL[0]]
    csv_ids.write_text("Question,ID\nforgot pasword,2\nsend stuff back?,0\n")  # paired by order before
    assert build_eval_set(run, cfg, csv_ids).references == [POOL[2], POOL[0]]
    csv_ids.write_text("id,question\nx,forgot pasword\n")
    with pytest.raises(DataError, match=r"ids.csv line 2: field 'id': must be an FAQ index in \[0, 3\), got 'x'"):
        build_eval_set(run, cfg, csv_ids)
    mixed = tmp_path / "mixed.jsonl"  # by order, its second question paired with entry 1, a guess
    mixed.write_text('{"id": 2, "question": "forgot pasword"}\n{"question": "send stuff back?"}\n')
    with pytest.raises(DataError, match=r"mixed.jsonl line 2: has no 'id' or 'answer' field, but line 1 pairs"):
        build_eval_set(run, cfg, mixed)
    twice = tmp_path / "twice.jsonl"  # json.loads kept the last id: paired with entry 0, silently
    twice.write_text('{"id": 2, "question": "forgot pasword", "id": 0}\n')
    with pytest.raises(DataError, match=r"twice.jsonl line 1: field 'id': is given more than once"):
        build_eval_set(run, cfg, twice)


def test_offtopic_records_are_read_by_their_question_field(tmp_path):
    """A JSONL or CSV off-topic file was read line by line: the JSON objects and the CSV header were questions."""
    from faqtune.evaluate import read_offtopic

    (tmp_path / "off.jsonl").write_text('{"question": "What is the capital of France?"}\n{"Question": "Who won?"}\n')
    (tmp_path / "off.csv").write_text("question,topic\nWhat is the capital of France?,geo\n")
    (tmp_path / "off.txt").write_text("What is the capital of France?\n\n{not json}\n")
    assert read_offtopic(tmp_path / "off.jsonl") == ["What is the capital of France?", "Who won?"]
    assert read_offtopic(tmp_path / "off.csv") == ["What is the capital of France?"]
    assert read_offtopic(tmp_path / "off.txt") == ["What is the capital of France?", "{not json}"]
    (tmp_path / "bad.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 1: field 'question': missing"):
        read_offtopic(tmp_path / "bad.jsonl")


def test_pairing_with_a_runs_faq_that_is_gone_is_refused(tmp_path):
    """The saved splits are shuffled: pairing by id or order with them gave wrong references, silently."""
    from faqtune.evaluate import load_conversations

    run, cfg = _run(tmp_path, ROWS[::-1], ROWS[1:2])  # the splits in another order than the FAQ
    (tmp_path / "faq.json").unlink()
    for name, text in (("ids.jsonl", '{"id": 0, "question": "x?"}\n'), ("order.txt", "x?\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{tmp_path / name} line 1: pairs questions with the run's FAQ by "
                                            f"{'id' if name == 'ids.jsonl' else 'order'}, but "
                                            f"{tmp_path / 'faq.json'} is not found"):
            build_eval_set(run, cfg, tmp_path / name)
    (tmp_path / "convs.jsonl").write_text('{"turns": ["a?", "b?"], "id": 0}\n')
    with pytest.raises(DataError, match="by id, but .* is not found"):
        load_conversations(run, cfg, tmp_path / "convs.jsonl")
    with_answers = tmp_path / "qa.csv"
    with_answers.write_text("Question,Answer\nWhat?,Own answer here.\n")
    assert build_eval_set(run, cfg, with_answers).references == ["Own answer here."]
    assert build_eval_set(run, cfg).references == [POOL[1]] and set(POOL) <= set(build_eval_set(run, cfg).pool)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"questions": ROWS}))
    assert build_eval_set(run, cfg, tmp_path / "ids.jsonl", faq=other).references == [POOL[0]]


@pytest.mark.parametrize("content,needle", [
    ('{"id": 7, "question": "x"}\n', "field 'id'"),
    ('{"id": "zero", "question": "x"}\n', "field 'id'"),
    ('{"answer": "x"}\n', "field 'question'"),
    ('{"question": ""}\n', "field 'question'"),
    ('{"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c?"}, {"role": "assistant", "content": "d"}]}\n', "--conversations"),
    ('{"messages": [{"role": "user", "content": "a?"}]}\n', "must end with an assistant message"),
    ("".join(f'{{"question": "q{i}"}}\n' for i in range(5)), "more questions than the FAQ"),
])
def test_questions_file_errors_name_file_record_field(tmp_path, content, needle):
    run, cfg = _run(tmp_path, ROWS, [])
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        build_eval_set(run, cfg, path)
    assert str(path) in str(e.value) and "line " in str(e.value) and needle in str(e.value)


def test_no_held_out_split_asks_for_questions(tmp_path):
    run, cfg = _run(tmp_path, ROWS, [])
    with pytest.raises(DataError, match="--questions"):
        build_eval_set(run, cfg)


def test_text_perplexity_matches_manual_loss(tiny_base, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    text = "Returns are accepted within 45 days of delivery. Shipping costs $5.99."
    ids = torch.tensor([tiny_tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert text_perplexity(model, tiny_tokenizer, text, window=512) == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.fixture(scope="module")
def tiny_run(tiny_runs):
    return tiny_runs("--train.max_steps", "2", "--train.eval_steps", "1", "--lora.r", "4", "--mix", "general:0.2",
                     faq="")  # the bundled FAQ


def test_training_logs_eval_loss_and_mixes(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r][:2] == [1, 2]
    mixed = (tiny_run / "data" / "mix.jsonl").read_text().splitlines()
    train = (tiny_run / "data" / "train.jsonl").read_text().splitlines()
    assert len(mixed) == round(len(train) * 0.2 / 0.8)


def test_eval_cli_writes_the_report(tiny_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", str(tiny_run), "--compare-base", "--limit", "2", "--max-new-tokens", "4",
                 "--out", str(out), "--merged", "none"]) == 0
    printed = capsys.readouterr().out
    assert "Answer accuracy" in printed
    head = summary(EvalReport.load(out / "report.json"))  # the summary printed is the one report.md opens with
    assert printed == f"{head}\n\nreport: {out / 'report.md'}\n" and (out / "report.md").read_text().startswith(head)
    report = json.loads((out / "report.json").read_text())
    assert report["questions_evaluated"] == 2 and report["base"] is not None
    for key in ("answer_accuracy", "stop_rate", "answer_perplexity", "offtopic_decline_rate", "latency_p95_s"):
        assert key in report["tuned"] and key in report["base"]
    md = (out / "report.md").read_text()
    assert "| answer accuracy |" in md and "## Per question" in md and "## Forgetting" in md
    for png in ("comparison.png", "loss_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("merged", ["auto", "bf16", "fp32"])
def test_eval_refuses_a_merged_model(tiny_run, tmp_path, capsys, merged):
    """Eval measures the base by turning the adapter off, which a merged model cannot: --merged is refused in one
    line before anything loads (it was once accepted and silently ignored)."""
    out = tmp_path / "r"
    assert main(["eval", str(tiny_run), "--limit", "1", "--max-new-tokens", "2", "--out", str(out),
                 "--merged", merged]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: eval takes no --merged {merged}: ") and err.count("\n") == 1
    assert "adapter off" in err and "ask, chat" in err and "Traceback" not in err
    assert not out.exists()


def test_fail_on_forgetting_exit_code(tiny_run, tmp_path, capsys):
    """The real perplexities, measured twice: a threshold below the measured rise fails the run, one above passes."""
    def run(out: str, threshold: float) -> tuple[int, dict]:
        code = main(["eval", str(tiny_run), "--limit", "1", "--max-new-tokens", "2", "--out", str(tmp_path / out),
                     "--fail-on-forgetting", "--forgetting-threshold", str(threshold)])
        return code, json.loads((tmp_path / out / "report.json").read_text())["forgetting"]

    code, forgetting = run("flagged", -1.0)  # -100%: any finite perplexity ratio rises more than that
    assert code == 1 and forgetting["flagged"] is True
    assert "error: forgetting beyond the threshold" in capsys.readouterr().err
    code, forgetting = run("kept", forgetting["perplexity_ratio"] - 1 + 0.01)
    assert code == 0 and forgetting["flagged"] is False
    assert "forgetting" not in capsys.readouterr().err


@pytest.mark.parametrize("line,field", [('{"turns": ["only one"], "id": 0}', "turns"),
                                        ('{"turns": ["a", ""], "id": 0}', "turns"),
                                        ('{"turns": ["a", "b"], "id": 99}', "id"),
                                        ('{"turns": ["a", "b"]}', "id"),
                                        ('{"turns": ["a", "b"], "id": 0, "ID": 2}', "ID"),
                                        ('{"Turns": ["a", "b"], "turns": ["c", "d"], "id": 0}', "turns")])
def test_conversation_files_name_the_line_and_field(tmp_path, line, field):
    from faqtune.data import FaqEntry
    from faqtune.evaluate import read_conversations

    path = tmp_path / "convs.jsonl"
    path.write_text('{"turns": ["q", "and then?"], "id": 1}\n' + line + "\n")
    faq = [FaqEntry((("user", f"q{i}"), ("assistant", f"a{i}")), f"record {i}") for i in range(3)]
    with pytest.raises(DataError, match=f"convs.jsonl line 2: field '{field}'"):
        read_conversations(path, faq)
    path.write_text('{"turns": ["q", "and then?"], "id": 1}\n{"Turns": ["r", "and now?"], "ID": 2}\n')
    assert read_conversations(path, faq) == ([["q", "and then?"], ["r", "and now?"]], ["a1", "a2"])


@pytest.mark.parametrize("line,fragment", [('{"turns": ' + "[" * 100_000, "nested too deeply"),
                                           ('{"turns": ["a?", "b?"], "id": ' + "9" * 5000 + "}", "4300 digits"),
                                           ('{"turns": ["a?", "b?"], "id": 1', "invalid JSON")])
def test_conversation_lines_that_are_no_json_name_the_line(tmp_path, line, fragment):
    from faqtune.data import FaqEntry
    from faqtune.evaluate import read_conversations

    path = tmp_path / "convs.jsonl"
    path.write_text('{"turns": ["q", "and then?"], "id": 1}\n' + line + "\n")
    faq = [FaqEntry((("user", f"q{i}"), ("assistant", f"a{i}")), f"record {i}") for i in range(3)]
    with pytest.raises(DataError, match="convs.jsonl line 2") as e:
        read_conversations(path, faq)
    assert fragment in str(e.value)
