"""Unit tests for faqtune.data: every reader, every DataError, dedup, split and the reference files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from faqtune.data import FaqEntry, bundled_faq_path, detect_format, load_faq, split, write_jsonl
from faqtune.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
QA = {"question": "q", "answer": "a"}
QA2 = {"question": "q2", "answer": "a2"}


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _pairs(data) -> list[tuple[str, str]]:
    return [(e.question, e.answer) for e in data.entries]


def _msgs(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# --- readers -----------------------------------------------------------------------------------


def test_guide_json_shape(tmp_path):
    doc = {"questions": [{"question": "How do I pay?", "answer": "By card."},
                         {"question": "Do you ship abroad?", "answer": "Yes, to 30 countries."}]}
    data = load_faq(_write(tmp_path, "faq.json", json.dumps(doc, indent=2)))
    assert _pairs(data) == [("How do I pay?", "By card."), ("Do you ship abroad?", "Yes, to 30 countries.")]
    assert [e.record for e in data.entries] == ["questions[0]", "questions[1]"]
    assert data.entries[0].messages == (("user", "How do I pay?"), ("assistant", "By card."))
    assert data.duplicates_dropped == 0 and data.notes == []


def test_plain_json_list_strips_whitespace(tmp_path):
    doc = [{"question": "  q1 ", "answer": "a1\n"}, {"Question": "q2", "ANSWER": "a2"}]
    data = load_faq(_write(tmp_path, "faq.json", json.dumps(doc)))
    assert _pairs(data) == [("q1", "a1"), ("q2", "a2")]
    assert [e.record for e in data.entries] == ["record 0", "record 1"]


def test_jsonl_skips_blank_lines_but_keeps_line_numbers(tmp_path):
    data = load_faq(_write(tmp_path, "faq.jsonl", _jsonl(QA) + "\n" + _jsonl(QA2)))
    assert _pairs(data) == [("q", "a"), ("q2", "a2")]
    assert [e.record for e in data.entries] == ["line 1", "line 3"]


HEADERS = ["Question,Answer,Class", "question,answer,class", "QUESTION,ANSWER,CLASS",
           " Question , Answer ,Class"]


@pytest.mark.parametrize("header", HEADERS)
def test_csv_header_is_case_insensitive(tmp_path, header):
    text = f'{header}\nWhat is IVR?,"Phone banking, by voice.",security\nq2,a2,other\n'
    data = load_faq(_write(tmp_path, "faq.csv", text))
    assert _pairs(data) == [("What is IVR?", "Phone banking, by voice."), ("q2", "a2")]
    assert [e.record for e in data.entries] == ["line 2", "line 3"]


def test_csv_quoted_multiline_field_and_crlf(tmp_path):
    text = 'Question,Answer\r\n"two\r\nlines?",yes\r\nq2,a2\r\n'
    data = load_faq(_write(tmp_path, "faq.csv", text.encode("utf-8")))
    assert _pairs(data) == [("two\r\nlines?", "yes"), ("q2", "a2")]
    assert data.entries[1].record == "line 4"  # the quoted field spans physical lines 2-3


def test_custom_field_names_csv(tmp_path):
    path = _write(tmp_path, "faq.csv", "Frage,Antwort\nWo?,Hier.\n")
    data = load_faq(path, question_field="frage", answer_field="ANTWORT")
    assert _pairs(data) == [("Wo?", "Hier.")]


def test_custom_field_names_json(tmp_path):
    doc = [{"q": "Where?", "a": "Here.", "question": "decoy", "answer": "decoy"}]
    data = load_faq(_write(tmp_path, "faq.json", json.dumps(doc)), question_field="q", answer_field="a")
    assert _pairs(data) == [("Where?", "Here.")]


def test_mapped_fields_read_a_record_that_also_holds_a_conversation(tmp_path):
    doc = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
            "question": "Where?", "answer": "Here."}]
    data = load_faq(_write(tmp_path, "faq.json", json.dumps(doc)), question_field="question", answer_field="answer")
    assert _pairs(data) == [("Where?", "Here.")]


ALT_KEYS = [("prompt", "completion"), ("instruction", "output"), ("query", "response")]


@pytest.mark.parametrize("qkey,akey", ALT_KEYS)
def test_known_alternative_keys(tmp_path, qkey, akey):
    data = load_faq(_write(tmp_path, "faq.jsonl", _jsonl({qkey: "q", akey: "a"})))
    assert _pairs(data) == [("q", "a")]


def test_chat_messages_system_and_multi_turn(tmp_path):
    single = _msgs(("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."))
    multi = _msgs(("user", "Do you ship?"), ("assistant", "Yes."), ("user", "To Peru?"), ("assistant", "No."))
    data = load_faq(_write(tmp_path, "chat.jsonl", _jsonl(single, multi)))
    first, second = data.entries
    assert first.messages == (("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."))
    assert (first.question, first.answer) == ("Hi?", "Hello.")
    assert len(second.messages) == 4
    assert (second.question, second.answer) == ("To Peru?", "No.")  # the last user turn
    assert second.as_messages()[2] == {"role": "user", "content": "To Peru?"}


@pytest.mark.parametrize("name,text,fmt", [
    ("a.json", "[]", "json"), ("a.JSONL", "{}", "jsonl"), ("a.csv", "x", "csv"), ("a.ndjson", "{}", "jsonl"),
    ("a.txt", _jsonl(QA, QA2), "jsonl"),
    ("a.txt", '[\n  {"question": "q", "answer": "a"}\n]\n', "json"),
    ("a.txt", '{\n  "questions": []\n}\n', "json"),
    ("a.txt", "Question,Answer\nq,a\n", "csv"),
])
def test_detect_format(name, text, fmt):
    assert detect_format(Path(name), text) == fmt


def test_auto_detects_jsonl_in_txt_file(tmp_path):
    path = _write(tmp_path, "faq.txt", _jsonl(QA, QA2))
    assert _pairs(load_faq(path)) == [("q", "a"), ("q2", "a2")]


def test_explicit_format_overrides_suffix(tmp_path):
    path = _write(tmp_path, "faq.data", "question,answer\nq,a\n")
    assert _pairs(load_faq(path, fmt="csv")) == [("q", "a")]
    with pytest.raises(DataError, match="unknown format 'xml'"):
        load_faq(path, fmt="xml")


@pytest.mark.parametrize(
    "name,text",
    [
        ("faq.csv", "Question,Answer\nq,a\n"),
        ("faq.json", '{"questions": [{"question": "q", "answer": "a"}]}'),
    ],
)
def test_utf8_bom_is_accepted(tmp_path, name, text):
    data = load_faq(_write(tmp_path, name, "\ufeff".encode() + text.encode("utf-8")))
    assert _pairs(data) == [("q", "a")]


def test_exact_duplicates_dropped_and_counted(tmp_path):
    path = _write(tmp_path, "faq.jsonl", _jsonl(QA, QA2, QA, dict(QA)))
    data = load_faq(path)
    assert _pairs(data) == [("q", "a"), ("q2", "a2")]
    assert data.duplicates_dropped == 2
    assert len(data.notes) == 1 and "dropped 2" in data.notes[0] and str(path) in data.notes[0]


def test_near_duplicates_are_kept(tmp_path):
    recs = [QA, {"question": "Q", "answer": "a"}, {"question": "q", "answer": "a."},
            _msgs(("system", "s"), ("user", "q"), ("assistant", "a"))]
    data = load_faq(_write(tmp_path, "faq.jsonl", _jsonl(*recs)))
    assert len(data) == 4 and data.duplicates_dropped == 0 and data.notes == []


def test_a_question_asked_again_with_another_answer_is_noted(tmp_path):
    """Both are kept (which is right is the user's call), but retrieval cannot tell them apart: say so."""
    recs = [QA, QA2, {"question": "Q ", "answer": "b"}, {"question": "q2", "answer": "A2."}]
    path = _write(tmp_path, "faq.jsonl", _jsonl(*recs))
    data = load_faq(path)
    assert len(data) == 4 and data.notes == [
        f"{path}: 1 question(s) asked again with another answer, all kept (e.g. 'q', line 1 and line 3); merge "
        "or remove one"]
    again = load_faq(_write(tmp_path, "thrice.jsonl", _jsonl(QA, {"question": "q", "answer": "b"},
                                                               {"question": "q", "answer": "c"})))
    assert again.notes[0].split(": ", 1)[1].startswith("1 question(s) asked again")  # one question, asked 3 times


def test_alpaca_input_follows_the_instruction(tmp_path):
    recs = [{"instruction": "Translate to French.", "input": "hello", "output": "bonjour"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Say bye.", "input": " \u200b", "output": "bye"},  # blank: no input, as before
            {"instruction": "Say it.", "input": None, "output": "it"}]  # null: no input
    data = load_faq(_write(tmp_path, "faq.jsonl", _jsonl(*recs)))
    assert _pairs(data) == [("Translate to French.\n\nhello", "bonjour"), ("Say hi.", "hi"), ("Say bye.", "bye"),
                            ("Say it.", "it")]
    for value in (5, ["1", "2"]):  # was dropped: six records with inputs 1..6 trained as one question
        bad = {"instruction": "Double it.", "input": value, "output": "10"}
        with pytest.raises(DataError, match=r"faq.jsonl line 1: field 'input': must be text, got"):
            load_faq(_write(tmp_path, "faq.jsonl", _jsonl(bad)))


def test_a_column_without_a_name_that_holds_text_is_refused(tmp_path):
    """The rest of an answer after an unquoted comma, or a column whose header was left blank, was dropped."""
    path = _write(tmp_path, "faq.csv", "question,answer,\nq1,a1,\nq2,a2, and more\n")
    with pytest.raises(DataError, match=r"faq.csv line 3: column 3 holds 'and more' but has no name in the header"):
        load_faq(path)
    assert len(load_faq(_write(tmp_path, "ok.csv", "question,answer,\nq1,a1,\nq2,a2, \n"))) == 2  # trailing commas
    assert len(load_faq(_write(tmp_path, "pandas.csv", ",question,answer\n0,q1,a1\n1,q2,a2\n"))) == 2  # to_csv()


def test_an_instruction_mapped_by_name_keeps_its_input(tmp_path):
    """--data.question_field instruction dropped the Alpaca input silently (it was read only when detected)."""
    path = _write(tmp_path, "faq.jsonl", _jsonl({"instruction": "Translate to French.", "input": "hello",
                                                 "output": "bonjour"}))
    assert _pairs(load_faq(path, question_field="instruction")) == [("Translate to French.\n\nhello", "bonjour")]


@pytest.mark.parametrize("record,kind,fields", [
    ({"question": "q", "answer": "a", "response": "r"}, "answer", "answer, response; answer"),
    ({"question": "q", "Query": "qq", "answer": "a"}, "question", "question, Query; question")])
def test_two_fields_that_could_each_be_the_one_are_refused(tmp_path, record, kind, fields):
    """One was read and the other dropped unannounced; a mapping picks one, and an empty twin is no rival."""
    path = _write(tmp_path, "faq.csv", ",".join(record) + "\n" + ",".join(record.values()) + "\n")
    with pytest.raises(DataError, match=rf"faq.csv line 2: holds 2 {kind} fields \({fields} would be read, the rest "
                                        rf"lost\): set data.{kind}_field to the one to read"):
        load_faq(path)
    other = [k for k in record if k not in ("question", "answer")][0]
    assert _pairs(load_faq(path, **{f"{kind}_field": other}))[0] == (record.get("Query", "q"), record.get("response", "a"))
    empty = _write(tmp_path, "empty.jsonl", _jsonl({**record, other: " "}))
    assert _pairs(load_faq(empty)) == [("q", "a")]


def test_several_lists_of_records_are_refused(tmp_path):
    """Reading one of them dropped the others unannounced."""
    doc = {"questions": [QA], "faq": [QA2], "tags": ["shipping"]}
    with pytest.raises(DataError, match=r"faq.json: holds several lists of records \('questions', 'faq'\)"):
        load_faq(_write(tmp_path, "faq.json", json.dumps(doc)))
    metadata = {"questions": [QA], "tags": ["x"], "categories": [{"id": 1, "name": "Billing"}]}
    assert len(load_faq(_write(tmp_path, "one.json", json.dumps(metadata)))) == 1


# --- errors: each names the file, the record and the field ------------------------------------

LATIN1 = "Question,Answer\nq,a\nCaf\xe9 open?,Oui\n".encode("latin-1")
UTF16 = b"\xff\xfe" + '[{"question": "q"}]'.encode("utf-16-le")
# id: (file name, content, fragments the message must hold besides the path)
ERROR_CASES = {
    "missing answer": ("faq.jsonl", _jsonl(QA, QA2, {"question": "q3"}), ["line 3", "'answer'", "missing"]),
    "missing question": ("faq.json", json.dumps([QA, {"answer": "a2"}]),
                         ["record 1", "'question'", "missing"]),
    "blank answer": ("faq.json", json.dumps({"questions": [QA, {"question": "q2", "answer": " \t"}]}),
                     ["questions[1]", "'answer'", "empty"]),
    "null answer": ("faq.json", json.dumps([QA, {"question": "q2", "answer": None}]),
                    ["record 1", "'answer'", "null"]),
    "number answer": ("faq.jsonl", _jsonl(QA, {"question": "q2", "answer": 42}),
                      ["line 2", "'answer'", "int"]),
    "record not object": ("faq.jsonl", _jsonl(QA, 42), ["line 2", "int"]),
    "bad jsonl line": ("faq.jsonl", _jsonl(QA) + '{"question": "q2", answer}\n', ["line 2", "invalid JSON"]),
    "bad json doc": ("faq.json", '[\n {"question": "q", "answer": "a"},\n {"question": "q2" "answer": ""}\n]',
                     ["line 3", "invalid JSON"]),
    "latin-1 csv": ("faq.csv", LATIN1, ["line 3", "UTF-8"]),
    "utf-16 bytes": ("faq.json", UTF16, ["line 1", "UTF-8"]),
    "empty file": ("faq.json", "", ["is empty"]),
    "blank file": ("faq.csv", "  \n\n", ["is empty"]),
    "NUL bytes": ("faq.csv", b"Question,Answer\nq,a\x00\n", ["NUL"]),
    "too many columns": ("faq.csv", "Question,Answer,Class\nq1,a1,c\nq2,a2,c,extra\n",
                         ["line 3", "4 columns", "header has 3"]),
    "csv empty answer": ("faq.csv", "Question,Answer\nq1,a1\nq2,\n", ["line 3", "'Answer'", "empty"]),
    "csv no answer column": ("faq.csv", "Question,Class\nq1,c\n", ["line 2", "'answer'", "missing"]),
    "unknown role": ("faq.jsonl", _jsonl(_msgs(("user", "q"), ("bot", "a"))),
                     ["line 1", "'messages[1].role'", "'bot'"]),
    "ends with user": ("faq.jsonl", _jsonl(QA, _msgs(("assistant", "hi"), ("user", "q"))),
                       ["line 2", "'messages'", "end with an assistant"]),
    "late system": ("faq.jsonl", _jsonl(_msgs(("user", "q"), ("system", "s"), ("assistant", "a"))),
                    ["line 1", "'messages[1].role'", "system"]),
    "empty content": ("faq.json", json.dumps([_msgs(("user", "q"), ("assistant", ""))]),
                      ["record 0", "'messages[1].content'", "empty"]),
    "conversation and question": ("faq.jsonl", _jsonl(QA, _msgs(("user", "q"), ("assistant", "a")) | QA),
                                  ["line 2", "'messages'", "both a conversation", "question, answer"]),
    "top-level string": ("faq.json", '"just a string"', ["expected a list of records", "str"]),
    "top-level number": ("faq.json", "42", ["expected a list of records", "int"]),
    "no records": ("faq.json", "[]", ["holds no records"]),
    "header only": ("faq.csv", "Question,Answer\n", ["holds no records"]),
}


@pytest.mark.parametrize("name,content,fragments", list(ERROR_CASES.values()), ids=list(ERROR_CASES))
def test_invalid_input_raises_data_error(tmp_path, name, content, fragments):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        load_faq(path)
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_custom_field_missing_names_that_field(tmp_path):
    path = _write(tmp_path, "faq.csv", "Frage,Text\nq,a\n")
    with pytest.raises(DataError) as info:
        load_faq(path, question_field="Frage", answer_field="Antwort")
    assert (info.value.record, info.value.field) == ("line 2", "Antwort")
    assert str(path) in str(info.value) and "found: Frage, Text" in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(DataError, match="no such file") as info:
        load_faq(path)
    assert info.value.file == str(path) and str(path) in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(DataError, match="directory") as info:
        load_faq(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero here")
def test_a_device_is_refused_before_reading():
    """/dev/zero never ends: reading it filled memory."""
    with pytest.raises(DataError, match="/dev/zero: is a device, expected a file"):
        load_faq("/dev/zero")


# --- split -------------------------------------------------------------------------------------


def _entries(n: int) -> list[FaqEntry]:
    return [FaqEntry((("user", f"q{i}"), ("assistant", f"a{i}")), f"record {i}") for i in range(n)]


def test_split_sizes_disjoint_and_complete():
    entries = _entries(79)
    train, evals = split(entries, 0.1, seed=42)
    assert (len(train), len(evals)) == (71, 8)  # round(79 * 0.1) = 8
    assert not set(train) & set(evals)
    assert sorted(train + evals, key=entries.index) == entries
    assert train == [e for e in entries if e in train]  # input order is kept


def test_split_is_deterministic_per_seed():
    entries = _entries(79)
    assert split(entries, 0.1, seed=1) == split(list(entries), 0.1, seed=1)
    assert split(entries, 0.1, seed=1)[1] != split(entries, 0.1, seed=2)[1]


SPLIT_SIZES = [(79, 0.0, 0), (10, 0.5, 5), (3, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0)]


@pytest.mark.parametrize("n,fraction,n_eval", SPLIT_SIZES)
def test_split_edge_sizes(n, fraction, n_eval):
    train, evals = split(_entries(n), fraction, seed=0)
    assert len(evals) == n_eval and len(train) == n - n_eval


# --- bundled and shared reference data ---------------------------------------------------------


def test_bundled_faq():
    path = bundled_faq_path()
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert set(raw) == {"questions"}
    assert all(set(r) == {"question", "answer"} for r in raw["questions"])
    data = load_faq(path)
    assert len(data) >= 80
    assert len(data) == len({(r["question"].strip(), r["answer"].strip()) for r in raw["questions"]})


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"shared reference file {path} not present")
    return path


def test_shared_ecommerce_faq():
    path = _shared("ecommerce_faq.json")
    raw = json.loads(path.read_text(encoding="utf-8"))["questions"]
    data = load_faq(path)
    assert len(raw) == 79
    assert len(data) + data.duplicates_dropped == 79
    assert len(data) == len({(r["question"].strip(), r["answer"].strip()) for r in raw})


def test_shared_bank_faq_csv():
    path = _shared("bank_faq.csv")
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"Question", "Answer", "Class"}
    assert len(rows) == 1499  # as documented in shared/data/README.md
    unique = {(r["Question"].strip(), r["Answer"].strip()) for r in rows}
    data = load_faq(path)
    assert len(data) == len(unique)
    assert data.duplicates_dropped == len(rows) - len(unique) > 0
    assert data.entries[0].question == rows[0]["Question"].strip()


# --- write_jsonl ---------------------------------------------------------------------------------


def test_write_jsonl_round_trip(tmp_path):
    entries = [
        FaqEntry((("user", 'Is "Café" open?'), ("assistant", "Yes,\nuntil 9 p.m. ✓"))),
        FaqEntry((("system", "Be brief."), ("user", "q"), ("assistant", "a"))),
        FaqEntry((("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))),
    ]
    path = tmp_path / "out" / "nested" / "faq.jsonl"
    write_jsonl(entries, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0]) == {"question": 'Is "Café" open?', "answer": "Yes,\nuntil 9 p.m. ✓"}
    assert set(json.loads(lines[1])) == {"messages"}
    assert [e.messages for e in load_faq(path).entries] == [e.messages for e in entries]


@pytest.mark.parametrize("header, message", [
    ("Question,Answer,Class,Answer", "duplicate column 'Answer' (columns 2 and 4)"),
    ("question,Answer,answer", "duplicate columns 'Answer' and 'answer' (names match case-insensitively) "
                               "(columns 2 and 3)"),
])
def test_duplicate_csv_columns_are_refused(tmp_path, header, message):
    _assert_csv_error(tmp_path, f"{header}\nq?,a,b,c\n", 1, message)


def _assert_csv_error(tmp_path, text: str, line: int, message: str) -> None:
    path = _write(tmp_path, "faq.csv", text)
    with pytest.raises(DataError) as e:
        load_faq(path)
    assert str(e.value).startswith(f"{path} line {line}: {message}")


def test_unnamed_csv_columns_may_repeat(tmp_path):
    path = _write(tmp_path, "faq.csv", "question,answer,,\nq?,a,,\n")
    assert _pairs(load_faq(path)) == [("q?", "a")]


@pytest.mark.parametrize("invisible", ["\u200b", "\u200c\u200d", "\u2060", "\ufeff\u200b ",
                                       "\x1b[2J\x1b[H"])  # the last: terminal escape sequences only
def test_a_field_of_zero_width_characters_is_empty(tmp_path, invisible):
    path = _write(tmp_path, "faq.jsonl", _jsonl({"question": "q?", "answer": invisible}))
    with pytest.raises(DataError, match="line 1: field 'answer': is empty"):
        load_faq(path)


def test_terminal_escapes_and_bidi_controls_are_removed(tmp_path):
    path = _write(tmp_path, "faq.jsonl", _jsonl(
        {"question": "\x1b[31mRed\x1b[0m?", "answer": "Pay \u202eby card\u202c.\x1b]0;owned\x07"},
        {"question": "plain?", "answer": "\u2066ok\u2069"}))
    data = load_faq(path)
    assert _pairs(data) == [("Red?", "Pay by card."), ("plain?", "ok")]
    assert any("removed 7 terminal escape sequence(s) and bidi control character(s)" in n for n in data.notes)


def test_an_unclosed_csv_quote_names_the_line_it_opened(tmp_path):
    _assert_csv_error(tmp_path, 'question,answer\nHow do I pay?,By card.\n"How do I return,Within 30 days.\n'
                                "Where is my order?,On the tracking page.\nCan I cancel?,Yes.\n",
                      3, "a quoted field opens here and is never closed")


def test_a_quoted_multiline_last_record_is_fine(tmp_path):
    path = _write(tmp_path, "faq.csv", 'question,answer\na?,"one\ntwo ""quoted"""\n')
    assert _pairs(load_faq(path)) == [("a?", 'one\ntwo "quoted"')]


@pytest.mark.parametrize("name, text, where", [
    ("faq.json", '[{"question": "q?", "answer": "a", "answer": "b"}]', "record 0: field 'answer'"),
    ("faq.json", '{"questions": [{"question": "q?", "answer": "a"}], "questions": []}', ": field 'questions'"),
    ("faq.jsonl", '{"question": "q?", "answer": "a"}\n{"Question": "x?", "question": "y?", "answer": "b"}\n',
     "line 2: field 'question'"),
    ("faq.jsonl", '{"messages": [{"role": "user", "content": "q?", "content": "r?"}, '
                  '{"role": "assistant", "content": "a"}]}\n', "line 1: field 'messages[0].content'"),
], ids=["record", "top-level-list", "case-variant", "message"])
def test_a_key_given_twice_in_a_json_object_is_refused(tmp_path, name, text, where):
    """json.loads keeps the last of a repeated key: a record's first answer (or a whole list) was lost unannounced."""
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError) as e:
        load_faq(path)
    assert str(e.value).startswith(f"{path}{'' if where.startswith(':') else ' '}{where}: is given more than once")


@pytest.mark.parametrize("doc", [{"messages": [{"role": "user", "content": "Hi?"},
                                               {"role": "assistant", "content": "Hello."}]},
                                 {"question": "Hi?", "answer": "Hello."}])
def test_a_json_file_of_one_record_is_read_as_one(tmp_path, doc):
    """A conversation alone was read as a list of records (its messages): 'field question: missing'."""
    assert _pairs(load_faq(_write(tmp_path, "one.json", json.dumps(doc)))) == [("Hi?", "Hello.")]
