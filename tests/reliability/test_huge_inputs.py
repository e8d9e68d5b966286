"""Huge inputs: a 100,000-row file loads in seconds and in memory proportional to what it keeps; a 1 MB answer
is truncated to data.max_seq_length and counted."""

from __future__ import annotations

import csv
import json
import time
import tracemalloc

import pytest

from faqtune.cli import main
from faqtune.config import load_config
from faqtune.data import load_faq

ROWS, DUPLICATES = 100_000, 1_000
MEGABYTE_ANSWER = ("Our return policy explained in full detail, clause by clause. " * 20_000)[:1_000_000]


@pytest.mark.pipeline  # a 17 MB file loaded under tracemalloc: ~12 s, the slower tier
def test_a_100k_row_jsonl_loads_in_seconds_and_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in list(range(ROWS)) + list(range(DUPLICATES)):
            f.write(json.dumps({"question": f"How do I change setting number {i} on my account?",
                                "answer": f"Open the settings page, choose section {i} and press save."}) + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    started = time.perf_counter()
    try:
        data = load_faq(path)
        seconds = time.perf_counter() - started
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data) == ROWS and data.duplicates_dropped == DUPLICATES
    assert data.notes == [f"{path}: dropped {DUPLICATES} exact duplicate record(s)"]
    # measured on 2 busy CPU cores: ~3 s (traced), peak 4.5x the 17 MB file, of which 3.3x is the entries kept
    assert seconds < 30, seconds
    assert peak < 10 * size and peak - kept < 3 * size, (size, kept, peak)


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_a_1mb_answer_loads(tmp_path, suffix):
    path = tmp_path / f"faq{suffix}"
    if suffix == ".csv":  # longer than the csv module's default field limit (128 KiB)
        with path.open("w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([["question", "answer"], ["What is the return policy?", MEGABYTE_ANSWER]])
    else:
        path.write_text(json.dumps([{"question": "What is the return policy?", "answer": MEGABYTE_ANSWER}]))
    assert load_faq(path).entries[0].answer == MEGABYTE_ANSWER.strip()


def test_a_1mb_answer_is_truncated_to_max_seq_length_and_counted(tiny_tokenizer, tmp_path):
    path = tmp_path / "faq.json"
    rows = [{"question": "What is the return policy?", "answer": MEGABYTE_ANSWER}]
    rows += [{"question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(3)]
    path.write_text(json.dumps(rows))
    cfg = load_config(None, {"data.max_seq_length": 64})
    from faqtune.train import tokenize_entries

    split = tokenize_entries(tiny_tokenizer, load_faq(path).entries, cfg)
    assert split.truncated == 1 and split.dropped == 0 and len(split.rows) == 4
    assert max(len(r["input_ids"]) for r in split.rows) == 64


def test_training_reports_the_truncation_count(tiny_base, tmp_path, capsys):
    path = tmp_path / "faq.json"
    rows = [{"question": "What is the return policy?", "answer": MEGABYTE_ANSWER}]
    rows += [{"question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(4)]
    path.write_text(json.dumps(rows))
    assert main(["train", "--base", str(tiny_base), "--data", str(path), "--output", str(tmp_path / "run"),
                 "--data.max_seq_length", "64", "--data.eval_fraction", "0", "--train.max_steps", "1",
                 "--lora.r", "4", "--grounding.mode", "none", "--quantization.compute_dtype", "fp32",
                 "--data.mix", ""]) == 0  # the FAQ's own example alone, not the mixed-in general ones
    assert "data: 1 example(s) longer than data.max_seq_length=64 truncated" in capsys.readouterr().err
