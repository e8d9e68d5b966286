"""FAQ readers (JSON, JSONL, CSV, chat messages), validation with file:record:field errors, dedup and split.

Every reader yields `FaqEntry` objects holding a conversation (`messages`); a Q/A pair is the two-turn
conversation user -> assistant. Invalid input raises `DataError` naming the file, the record and the field.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from faqtune.errors import DataError

QUESTION_KEYS = ("question", "questions", "prompt", "query", "instruction", "input")
ANSWER_KEYS = ("answer", "answers", "response", "completion", "output")
ROLES = ("system", "user", "assistant")
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) would refuse a long answer
# Invisible characters: a field of only these is empty (str.strip() keeps them: they are not whitespace).
ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
# Removed from questions and answers at reading: terminal escape sequences (CSI like "\x1b[31m", OSC like
# "\x1b]0;title\x07", and two-character ones) recolour or retitle a terminal that prints an answer, and bidi
# embedding/override/isolate controls reorder how text is displayed (a "Trojan Source" trick).
CONTROLS = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]|[\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class FaqEntry:
    """One training conversation; `record` says where it came from (e.g. 'line 12')."""

    messages: tuple[tuple[str, str], ...]  # ((role, content), ...), ends with an assistant turn
    record: str = ""

    @property
    def question(self) -> str:
        return next(c for r, c in reversed(self.messages) if r == "user")

    @property
    def answer(self) -> str:
        return self.messages[-1][1]

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def to_json(self) -> dict[str, Any]:
        if len(self.messages) == 2 and self.messages[0][0] == "user":
            return {"question": self.question, "answer": self.answer}
        return {"messages": self.as_messages()}


@dataclass
class FaqData:
    entries: list[FaqEntry]
    source: str
    duplicates_dropped: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)


def packaged(name: str) -> Path:
    """A data file shipped inside the faqtune package (`src/faqtune/data/`)."""
    return Path(str(resources.files("faqtune") / "data" / name))


def bundled_faq_path() -> Path:
    """The e-commerce FAQ shipped with faqtune (used by the demo)."""
    return packaged("ecommerce_faq.json")


def general_instructions_path() -> Path:
    """General instruction data shipped with faqtune (`--mix general`), written for the project."""
    return packaged("general_instructions.jsonl")


def read_text(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):  # /dev/zero never ends
            raise DataError(str(path), "is a device, expected a file")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(str(path), "no such file") from None
    except IsADirectoryError:
        raise DataError(str(path), "is a directory, expected a file") from None
    except OSError as e:
        raise DataError(str(path), f"cannot be read ({e.strerror})") from None
    except ValueError:  # e.g. an embedded NUL byte in the path
        raise DataError(str(path), "is not a valid file path") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(str(path), f"not valid UTF-8 (byte {e.start}); save the file as UTF-8", f"line {line}") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise DataError(str(path), "contains NUL bytes; is it a binary file?", f"line {line}")
    if not text.strip():
        raise DataError(str(path), "is empty")
    return text


def pick_key(keys: list[str], wanted: str | None, candidates: tuple[str, ...]) -> str | None:
    """Case-insensitive key lookup: the mapped name if given, else the first known candidate."""
    lower = {k.lower().strip(): k for k in keys if isinstance(k, str)}
    for name in ([wanted] if wanted else candidates):
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def text_field(value: Any, file: str, record: str, field_name: str) -> str:
    if value is None:
        raise DataError(file, "is empty (null)", record, field_name)
    if not isinstance(value, str):
        raise DataError(file, f"must be text, got {type(value).__name__}", record, field_name)
    value = value.strip()
    if not value.translate(ZERO_WIDTH).strip():
        raise DataError(file, "is empty" if not value else "is empty (only zero-width characters)", record,
                        field_name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. from the JSON escape "\ud800"
        raise DataError(file, f"holds an invalid character {value[e.start]!r} (a lone UTF-16 surrogate)",
                        record, field_name) from None
    return value


def _messages_entry(value: Any, file: str, record: str) -> FaqEntry:
    if not isinstance(value, list) or not value:
        raise DataError(file, "must be a non-empty list of {role, content} objects", record, "messages")
    turns = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(file, "must be an object with 'role' and 'content'", record, where)
        refuse_repeated_keys(m, file, record, where + ".")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(file, f"unknown role {role!r} (expected one of {', '.join(ROLES)})", record, where + ".role")
        if role == "system" and i != 0:
            raise DataError(file, "a system message may only come first", record, where + ".role")
        turns.append((role, text_field(m.get("content"), file, record, where + ".content")))
    roles = [r for r, _ in turns if r != "system"]
    if not roles or roles[-1] != "assistant":
        raise DataError(file, "the conversation must end with an assistant message", record, "messages")
    if "user" not in roles:
        raise DataError(file, "the conversation needs a user message", record, "messages")
    return FaqEntry(tuple(turns), record)


def parse_record(obj: Any, file: str, record: str, question_field: str | None = None,
                 answer_field: str | None = None) -> FaqEntry:
    """One record (a dict) -> FaqEntry, or a DataError naming file, record and field."""
    if not isinstance(obj, dict):
        raise DataError(file, f"must be an object with question and answer, got {type(obj).__name__}", record)
    refuse_repeated_keys(obj, file, record)
    keys = list(obj.keys())
    mkey = pick_key(keys, "messages", ())
    if mkey and not question_field:
        both = [pick_key(keys, None, QUESTION_KEYS), pick_key(keys, None, ANSWER_KEYS)]
        if None not in both:  # two entries in one record: reading either would drop the other unannounced
            raise DataError(file, f"holds both a conversation and a question and answer ({', '.join(both)}): keep "
                                  "one (or set data.question_field and data.answer_field to read the question and "
                                  "answer)", record, mkey)
        return _messages_entry(obj[mkey], file, record)
    qkey = pick_key(keys, question_field, QUESTION_KEYS)
    akey = pick_key(keys, answer_field, ANSWER_KEYS)
    expected = f"expected fields: {question_field or 'question'}, {answer_field or 'answer'} (or messages)"
    if qkey is None:
        raise DataError(file, f"missing ({expected}; found: {', '.join(map(str, keys)) or 'none'})", record,
                        question_field or "question")
    if akey is None:
        raise DataError(file, f"missing ({expected}; found: {', '.join(map(str, keys)) or 'none'})", record,
                        answer_field or "answer")
    context = pick_key(keys, None, ("input",)) if qkey.lower() == "instruction" else None
    for kind, mapped, names, picked in (("question", question_field, QUESTION_KEYS, qkey),
                                        ("answer", answer_field, ANSWER_KEYS, akey)):
        filled = [k for k in keys if k != context and isinstance(k, str) and k.lower().strip() in names
                  and isinstance(obj[k], str) and obj[k].strip()]
        if not mapped and len(filled) > 1:  # reading one would drop the other unannounced
            raise DataError(file, f"holds {len(filled)} {kind} fields ({', '.join(filled)}; {picked} would be "
                                  f"read, the rest lost): set data.{kind}_field to the one to read", record)
    q = text_field(obj[qkey], file, record, qkey)
    a = text_field(obj[akey], file, record, akey)
    extra = obj[context] if context is not None else None
    if extra is not None and not isinstance(extra, str):  # a number or list was dropped: six records, one question
        raise DataError(file, f"must be text, got {type(extra).__name__}", record, context)
    if isinstance(extra, str) and extra.translate(ZERO_WIDTH).strip():  # Alpaca: the input follows the instruction
        q = f"{q}\n\n{text_field(extra, file, record, context)}"
    return FaqEntry((("user", q), ("assistant", a)), record)


class JsonObject(dict):
    """A JSON object that remembers the keys it was given more than once, matched as fields are (case-insensitively):
    json keeps the last silently, and `pick_key` would read one of "Question" and "question"."""

    repeated: tuple[str, ...] = ()


def _json_object(pairs: list[tuple[str, Any]]) -> JsonObject:
    obj = JsonObject(pairs)
    seen: set[str] = set()
    for key, _ in pairs:
        if key.lower().strip() in seen:
            obj.repeated += (key,)
        seen.add(key.lower().strip())
    return obj


def refuse_repeated_keys(obj: Any, file: str, record: str | None, where: str = "") -> None:
    """A DataError for a key given twice in one JSON object: reading the last would lose the others unannounced."""
    repeated = getattr(obj, "repeated", ())
    if repeated:
        raise DataError(file, "is given more than once in one object (JSON keeps only the last; the others "
                              "would be lost): keep one", record, f"{where}{repeated[0]}")


def parse_json(text: str, file: str, record: str | None = None) -> Any:
    """json.loads with every failure as a DataError (syntax, nesting too deep, numbers too long); objects are
    `JsonObject`s, so a key given twice can be refused where the record is known (`refuse_repeated_keys`)."""
    try:
        return json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as e:
        raise DataError(file, f"invalid JSON: {e.msg} (column {e.colno})", record or f"line {e.lineno}") from None
    except RecursionError:
        raise DataError(file, "invalid JSON: nested too deeply", record) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(file, f"invalid JSON: {str(e).split(';')[0]}", record) from None


def _iter_json(text: str, file: str) -> Iterator[tuple[str, Any]]:
    doc = parse_json(text, file)
    if isinstance(doc, dict) and _one_record(doc):  # its messages list was read as a list of records
        doc = [doc]
    if isinstance(doc, dict):
        refuse_repeated_keys(doc, file, None)
        lists = {k: v for k, v in doc.items() if isinstance(v, list)}
        key = pick_key(list(lists), None, ("questions", "data", "faq", "faqs", "items", "records"))
        if key is None:
            if len(lists) != 1:
                raise DataError(file, "expected a list of records, or an object like {\"questions\": [...]}")
            key = next(iter(lists))
        others = [k for k, v in lists.items() if k != key and any(_looks_like_record(r) for r in v)]
        if others:  # reading one of them would drop the rest unannounced (metadata lists are no records)
            raise DataError(file, f"holds several lists of records ({', '.join(map(repr, [key, *others]))}); "
                                  "put the FAQ's records in one list")
        doc = doc[key]
        prefix = f"{key}[%d]"
    elif isinstance(doc, list):
        prefix = "record %d"
    else:
        raise DataError(file, f"expected a list of records, got {type(doc).__name__}")
    for i, obj in enumerate(doc):
        yield prefix % i, obj


def _one_record(doc: dict) -> bool:
    """A file's whole document is one record: a conversation (messages with roles) or text question and answer."""
    keys = list(doc)
    mkey, qkey, akey = pick_key(keys, "messages", ()), pick_key(keys, None, QUESTION_KEYS), pick_key(keys, None,
                                                                                                     ANSWER_KEYS)
    if mkey is not None:
        return isinstance(doc[mkey], list) and all(isinstance(m, dict) and "role" in m for m in doc[mkey])
    return qkey is not None and akey is not None and isinstance(doc[qkey], str) and isinstance(doc[akey], str)


def _looks_like_record(obj: Any) -> bool:
    """An FAQ record's shape: a question and an answer field, or messages."""
    if not isinstance(obj, dict):
        return False
    keys = list(obj)
    return pick_key(keys, "messages", ()) is not None or (
        pick_key(keys, None, QUESTION_KEYS) is not None and pick_key(keys, None, ANSWER_KEYS) is not None)


def _lines(text: str) -> Iterator[str]:
    """The lines of `text` split on "\\n" only, without a copy of the whole text (io.StringIO makes one)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end + 1


def _iter_jsonl(text: str, file: str) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        yield f"line {n}", parse_json(line, file, f"line {n}")


def _iter_csv(text: str, file: str) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))  # long answers are truncated later
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        raise DataError(file, "has no header row", "line 1") from None
    header = [h.strip() for h in header]
    if not any(header):
        raise DataError(file, "has an empty header row", "line 1")
    _check_header(header, file)
    lines = sum(1 for _ in io.StringIO(text, newline=""))  # as the reader counts them
    try:
        last = reader.line_num
        for row in reader:
            n, start, last = reader.line_num, last + 1, reader.line_num
            if n == lines and n > start and _unclosed_quote(text, start):  # a record that ran to the end
                raise DataError(file, "a quoted field opens here and is never closed (it ran to the end of the "
                                      "file); close the quote or double it (\"\") inside the field", f"line {start}")
            if not any(c.strip() for c in row):
                continue
            if len(row) > len(header):
                raise DataError(file, f"has {len(row)} columns, the header has {len(header)}", f"line {n}")
            unnamed = next((i for i, h in enumerate(header[:len(row)]) if not h and row[i].strip()
                            and not (i == 0 and row[0].strip().isdigit())), None)  # pandas' to_csv: its index
            if unnamed is not None:  # never read: its text would be lost unannounced
                raise DataError(file, f"column {unnamed + 1} holds {row[unnamed].strip()[:40]!r} but has no name in "
                                      "the header; name it (or remove it)", f"line {n}")
            yield f"line {n}", dict(zip(header, row + [""] * (len(header) - len(row)), strict=True))
    except csv.Error as e:
        raise DataError(file, f"invalid CSV: {e}", f"line {reader.line_num}") from None


def _check_header(header: list[str], file: str) -> None:
    """Duplicate column names (case-insensitive, as the question/answer columns are matched): which of them
    would be read is a guess, so refuse them."""
    seen: dict[str, int] = {}
    for i, name in enumerate(header):
        if not name:
            continue  # unnamed (e.g. trailing empty) columns are never read
        j = seen.setdefault(name.lower(), i)
        if j != i:
            names = (f"column {name!r}" if header[j] == name else
                     f"columns {header[j]!r} and {name!r} (names match case-insensitively)")
            raise DataError(file, f"duplicate {names} (columns {j + 1} and {i + 1}); rename or remove one", "line 1")


def _unclosed_quote(text: str, line: int) -> bool:
    """Whether the record starting at `line` (1-based) runs to the end of `text` inside an open quote: an odd
    number of '"' from there on (a doubled "" inside a quoted field counts twice)."""
    offset = 0
    for _ in range(line - 1):
        offset = text.find("\n", offset) + 1
        if offset == 0:
            return False
    return text.count('"', offset) % 2 == 1


def strip_controls(obj: Any) -> tuple[Any, int]:
    """A record with terminal escapes and bidi controls removed from its strings; and how many were removed."""
    if isinstance(obj, str):
        cleaned, n = CONTROLS.subn("", obj)
        return cleaned, n
    if isinstance(obj, dict):
        out, total = JsonObject(), 0
        out.repeated = getattr(obj, "repeated", ())  # refused where the record is known (`parse_record`)
        for k, v in obj.items():
            out[k], n = strip_controls(v)
            total += n
        return out, total
    if isinstance(obj, list):
        items = [strip_controls(v) for v in obj]
        return [v for v, _ in items], sum(n for _, n in items)
    return obj, 0


READERS = {"json": _iter_json, "jsonl": _iter_jsonl, "csv": _iter_csv}


def detect_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("json", "jsonl", "csv"):
        return suffix
    if suffix == "ndjson":
        return "jsonl"
    head = text.lstrip()[:1]
    if head in "[{":
        first = text.lstrip().split("\n", 1)[0]
        try:
            json.loads(first)
            return "jsonl" if head == "{" and "\n" in text.strip() else "json"
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; json errors get reported later
            return "json"
    return "csv"


def _loose(text: str) -> str:
    """`text` compared loosely: case, spacing and a final full stop ignored."""
    return " ".join(text.lower().split()).rstrip(".!?")


def load_faq(path: str | Path, fmt: str = "auto", question_field: str | None = None,
             answer_field: str | None = None) -> FaqData:
    """Read and validate an FAQ file; exact duplicate entries are dropped and counted."""
    path = Path(path)
    text = read_text(path)
    fmt = detect_format(path, text) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise DataError(str(path), f"unknown format {fmt!r} (expected json, jsonl or csv)")
    entries: list[FaqEntry] = []
    seen: set[tuple] = set()
    first_of: dict[str, FaqEntry] = {}  # a question's first record, to find one asked again with another answer
    conflicts: list[tuple[FaqEntry, FaqEntry]] = []
    dropped = removed = 0
    for record, obj in READERS[fmt](text, str(path)):
        obj, n = strip_controls(obj)
        removed += n
        entry = parse_record(obj, str(path), record, question_field, answer_field)
        if entry.messages in seen:
            dropped += 1
            continue
        seen.add(entry.messages)
        entries.append(entry)
        first = first_of.setdefault(_loose(entry.question), entry)
        if first is not entry and _loose(first.answer) != _loose(entry.answer):
            conflicts.append((first, entry))
    if not entries:
        raise DataError(str(path), "holds no records")
    data = FaqData(entries, str(path), dropped)
    if dropped:
        data.notes.append(f"{path}: dropped {dropped} exact duplicate record(s)")
    if removed:
        data.notes.append(f"{path}: removed {removed} terminal escape sequence(s) and bidi control character(s)")
    if conflicts:
        first, again = conflicts[0]
        asked = len({_loose(e.question) for e, _ in conflicts})
        data.notes.append(f"{path}: {asked} question(s) asked again with another answer, all kept (e.g. "
                          f"{first.question[:60]!r}, {first.record} and {again.record}); merge or remove one")
    return data


def load_faq_of_run(path: str | Path, data_cfg) -> FaqData:
    """`path` read as a run reads an FAQ (`data_cfg`: its field mapping, and its data.format for its own file),
    so a run trained on a CSV with mapped columns can be indexed and evaluated again, from an edited copy too.
    Another file without the mapped fields (default names, messages) is read as detected."""
    ours = data_cfg.path and Path(path).resolve() == Path(data_cfg.path).resolve()
    mapping = (data_cfg.question_field, data_cfg.answer_field)
    try:
        return load_faq(path, data_cfg.format if ours else "auto", *mapping)
    except DataError as e:
        if ours or e.field not in mapping or e.field is None:  # a mapped field missing: not this file's names
            raise
        return load_faq(path)


def split(entries: list[FaqEntry], eval_fraction: float, seed: int) -> tuple[list[FaqEntry], list[FaqEntry]]:
    """Deterministic train/eval split: the same entries, fraction and seed give the same split."""
    if eval_fraction <= 0 or len(entries) < 2:
        return list(entries), []
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(entries) - 1, max(1, round(len(entries) * eval_fraction)))
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(entries) if i not in held]
    evals = [e for i, e in enumerate(entries) if i in held]
    return train, evals


def write_json(path: Path, value, indent: int = 2) -> None:
    """Write a JSON file whole or not at all (a temp file renamed over it): a process reading it meanwhile sees
    the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=indent), encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(entries: list[FaqEntry], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e.to_json(), ensure_ascii=False) + "\n")
