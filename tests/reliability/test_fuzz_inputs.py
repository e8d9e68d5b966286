"""Bad input never crashes: every FAQ reader (JSON, JSONL, CSV, chat messages) fed random and malformed files
raises only DataError, naming the file (and the record and field where there is one), in one line; the CLI
exits non-zero with one line on stderr."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faqtune.cli import main
from faqtune.data import READERS, load_faq
from faqtune.errors import DataError

EXAMPLES = 150
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORMATS = ["auto", *READERS]
SUFFIXES = [".json", ".jsonl", ".csv", ".ndjson", ".txt", ""]

KEYS = st.sampled_from(["question", "answer", "Question", " ANSWER ", "prompt", "response", "instruction",
                        "output", "messages", "role", "content", "questions", "data", "faq", "id", ""]) \
    | st.text(max_size=8)
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
           | st.sampled_from(["", "  ", "lone \ud800 surrogate", "line\nbreak", "How do I pay?", "By card."]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=12)
ROLE = st.sampled_from(["system", "user", "assistant", "bot", "USER", ""]) | SCALARS
MESSAGES = st.lists(st.fixed_dictionaries({"role": ROLE, "content": SCALARS}) | VALUES, max_size=5)
RECORDS = (st.fixed_dictionaries({"question": SCALARS, "answer": SCALARS}) | st.fixed_dictionaries({"messages": MESSAGES})
           | st.dictionaries(KEYS, VALUES | MESSAGES, max_size=4) | VALUES)
DOCUMENTS = (st.lists(RECORDS, max_size=6)
             | st.dictionaries(st.sampled_from(["questions", "data", "faq", "items", "x"]), st.lists(RECORDS, max_size=5),
                               max_size=2)
             | VALUES)

VALID = {
    ".json": json.dumps({"questions": [{"question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(3)]}),
    ".jsonl": "\n".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                                 {"role": "assistant", "content": f"A{i}."}]}) for i in range(3)),
    ".csv": "question,answer\n\"How, exactly?\",\"Like \"\"this\"\".\"\nWhy?,Because.\n",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check(path: Path, fmt: str = "auto"):
    """load_faq returns clean entries or raises a one-line DataError naming the file; nothing else escapes."""
    try:
        data = load_faq(path, fmt)
    except DataError as e:
        assert e.file == str(path) and str(e).startswith(str(path))
        assert len(str(e).splitlines()) == 1, str(e)
        return e
    assert data.entries
    for entry in data.entries:
        roles = [r for r, _ in entry.messages]
        assert roles[-1] == "assistant" and "user" in roles
        for _, content in entry.messages:
            assert content and content == content.strip()
            content.encode("utf-8")  # no lone surrogates reach tokenization or the run's data/ files
    return data


def write(folder: Path, suffix: str, content: str | bytes) -> Path:
    path = folder / f"faq{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    return path


@FUZZ
@given(content=st.binary(max_size=600), suffix=st.sampled_from(SUFFIXES), fmt=st.sampled_from(FORMATS))
def test_random_bytes(folder, content, suffix, fmt):
    check(write(folder, suffix, content), fmt)


@FUZZ
@given(doc=DOCUMENTS, fmt=st.sampled_from(["auto", "json"]))
def test_json_documents(folder, doc, fmt):
    check(write(folder, ".json", json.dumps(doc)), fmt)


@FUZZ
@given(lines=st.lists(RECORDS.map(json.dumps) | st.text(max_size=30), min_size=1, max_size=8))
def test_jsonl_lines(folder, lines):
    result = check(write(folder, ".jsonl", "\n".join(lines)))
    if isinstance(result, DataError) and "holds no records" not in str(result) and "is empty" not in str(result):
        assert result.record and result.record.startswith("line "), str(result)  # the line is named


@FUZZ
@given(chats=st.lists(MESSAGES, min_size=1, max_size=4))
def test_chat_messages(folder, chats):
    result = check(write(folder, ".jsonl", "\n".join(json.dumps({"messages": m}) for m in chats)))
    if isinstance(result, DataError):
        assert result.record and result.field and result.field.startswith("messages"), str(result)


CELLS = st.lists(st.sampled_from(list('ab ,"\n\r\t;é\x00\u2028') + ["question", "answer", "Q?"]),
                 max_size=8).map("".join)


@FUZZ
@given(rows=st.lists(st.lists(CELLS, max_size=4), min_size=1, max_size=6), raw=st.booleans())
def test_csv_rows(folder, rows, raw):
    if raw:  # hand-joined: broken quoting, ragged rows
        text = "\n".join(",".join(row) for row in rows)
    else:
        out = io.StringIO()
        csv.writer(out).writerows(rows)
        text = out.getvalue()
    check(write(folder, ".csv", text))


@FUZZ
@given(suffix=st.sampled_from(sorted(VALID)),
       edits=st.lists(st.tuples(st.floats(0, 1), st.sampled_from(["delete", "insert", "flip"]),
                                st.binary(min_size=1, max_size=3)), min_size=1, max_size=4))
def test_mutated_valid_files(folder, suffix, edits):
    data = bytearray(VALID[suffix].encode())
    for where, how, blob in edits:
        at = int(where * (len(data) - 1))
        if how == "delete":
            del data[at:at + len(blob)]
        elif how == "insert":
            data[at:at] = blob
        elif data:
            data[at] ^= blob[0] or 1
    check(write(folder, suffix, bytes(data)))


@pytest.mark.parametrize("text,expected", [
    ("[" * 100_000, "nested too deeply"),
    ('[{"question": "q", "answer": ' + "1" * 5000 + "}]", "4300 digits"),
    ('[{"question": "q\\ud800", "answer": "a"}]', "lone UTF-16 surrogate"),
    ('[{"question\\nnew line": "q", "b": "a"}]', "question\\nnew line"),
])
def test_known_crashers_are_data_errors(folder, text, expected):
    error = check(write(folder, ".json", text))
    assert isinstance(error, DataError) and expected in str(error)


def test_a_path_with_a_nul_byte_is_a_data_error():
    with pytest.raises(DataError, match="not a valid file path"):
        load_faq("faq\0.json")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=300) | DOCUMENTS.map(json.dumps).map(str.encode),
       suffix=st.sampled_from([".json", ".jsonl", ".csv"]))
def test_cli_bad_file_is_one_line_on_stderr(folder, tmp_path_factory, content, suffix):
    path = write(folder, suffix, content)
    try:
        load_faq(path)
        bad = False
    except DataError:
        bad = True
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--data", str(path), "--output", str(folder / "run"), "--base", str(folder / "nope"),
                     "--grounding.mode", "none"])
    assert code == 2
    lines = err.getvalue().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err.getvalue()
    if bad:
        assert len(lines) == 1 and str(path) in lines[0], lines
