"""The command line: help texts, shipped configs, and one-line errors (never a traceback) for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faqtune.cli import COMMANDS, main
from faqtune.config import field_help, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert COMMANDS[command][1] in capsys.readouterr().out


def test_train_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in field_help():
        assert key in out, key


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# faqtune ") and "--config examples/" + path.name in first
    load_config(path)


def _one_line_error(capsys) -> str:
    """The error on stderr: `error: ...` after any progress notes (`data: ...`), nothing else."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    while lines and lines[0].startswith("data: "):
        lines.pop(0)
    assert lines and lines[0].startswith("error: "), err
    return "\n".join(lines)


def test_bad_data_is_one_clear_error(tmp_path, capsys):
    faq = tmp_path / "faq.jsonl"
    faq.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": "  "}\n')
    assert main(["train", "--data", str(faq), "--output", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys)
    assert str(faq) in err and "line 2" in err and "answer" in err
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_unknown_setting_suggests(capsys):
    assert main(["train", "--train.epoch", "3"]) == 2
    assert "did you mean --train.epochs" in _one_line_error(capsys)


def test_all_invalid_values_reported_together(capsys):
    assert main(["train", "--lora.r", "0", "--train.learning_rate", "-1", "--quantization.mode", "3bit"]) == 2
    err = capsys.readouterr().err
    assert "lora.r" in err and "train.learning_rate" in err and "quantization.mode" in err


def test_ask_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["ask", str(tmp_path), "hi?"]) == 2
    assert "not a faqtune run directory" in _one_line_error(capsys)


@pytest.mark.pipeline  # `faqtune train` imports the training stack (transformers' trainer, peft, trl): ~10 s
def test_offline_hub_id_is_one_sentence(tmp_path, capsys, monkeypatch, small_faq):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, when imported (by an earlier test, often): set its constant too,
    # or the Hub is asked over the network (~45 s of retries where there is none).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = main(["train", "--base", "no-such-org/no-such-model", "--data", str(small_faq),
                 "--output", str(tmp_path / "run")])
    assert code == 2
    err = _one_line_error(capsys)
    assert "no-such-org/no-such-model" in err and "Hub" in err and len(err.splitlines()) == 1


def test_missing_local_base_folder(tmp_path, capsys, small_faq):
    assert main(["train", "--base", str(tmp_path / "nope"), "--data", str(small_faq),
                 "--output", str(tmp_path / "run")]) == 2
    assert "does not exist" in _one_line_error(capsys)


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "faqtune", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "ask" in out.stdout and "chat" in out.stdout


def test_resume_without_checkpoint_is_refused(tmp_path, capsys, small_faq):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(json.dumps({"output_dir": str(run), "data": {"path": str(small_faq)}}))
    assert main(["train", "--output", str(run), "--resume"]) == 2
    assert "no checkpoint" in _one_line_error(capsys)


@pytest.mark.parametrize("argv,message", [
    (["merge", "RUN", "OUT", "--dtype", "fp8"], "--dtype must be one of bf16, fp16, fp32, got 'fp8'"),
    (["merge", "RUN", "OUT", "--base-weights", "best"], "--base-weights must be one of auto, dequantized, original"),
    (["export-gguf", "RUN", "OUT.gguf", "--outtype", "q4"], "--outtype must be one of f16, q8_0, f32, got 'q4'"),
    (["serve-config", "RUN", "--engine", "tgi"], "--engine must be one of vllm, llamacpp, got 'tgi'"),
])
def test_a_bad_choice_is_checked_once_by_its_stage_before_anything_loads(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / a) if a in ("RUN", "OUT", "OUT.gguf") else a for a in argv]  # no run exists
    assert main(argv) == 2
    assert message in _one_line_error(capsys)


@pytest.mark.parametrize("threshold", ["nan", "inf", "x"])
def test_a_forgetting_threshold_that_is_not_a_finite_number_is_refused(threshold, capsys):
    """nan never flagged: the --fail-on-forgetting gate could not fail."""
    with pytest.raises(SystemExit) as exc:
        main(["eval", "runs/none", "--forgetting-threshold", threshold])
    assert exc.value.code == 2
    assert f"--forgetting-threshold: must be a finite number, got '{threshold}'" in capsys.readouterr().err


@pytest.mark.pipeline  # three `faqtune` processes, each importing torch
@pytest.mark.parametrize("argv", [
    ["ask", "someone/no-such-adapter", "hi?"],
    ["index", "FAQ", "--out", "OUT", "--embedder", "someone/no-such-embedder", "--embedder-epochs", "0"],
    ["train", "--base", "someone/no-such-model", "--data", "FAQ", "--output", "OUT"],
], ids=["adapter", "embedder", "base"])
def test_a_hub_id_on_a_machine_that_cannot_reach_the_hub_is_one_line_at_once(argv, tmp_path, small_faq):
    """No HF_HUB_OFFLINE set, the Hub's address refuses: one probe, then the local cache only. Without it,
    huggingface_hub retried each file for 45-80 s, printing a 'Retrying' line each time."""
    argv = [str(small_faq) if a == "FAQ" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "faqtune", *argv], capture_output=True, text=True, env=env,
                         timeout=120)
    elapsed = time.monotonic() - started
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the Hub cannot be reached" in errors[0], out.stderr
    assert "Retrying" not in out.stderr and "Traceback" not in out.stderr
    assert elapsed < 40, elapsed


def test_a_hub_id_in_the_local_cache_loads_while_the_hub_cannot_be_reached(tmp_path):
    """The other half of the probe: offline, a model already in the Hugging Face cache is read from it."""
    snapshot = tmp_path / "hf" / "hub" / "models--someone--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    code = ("from transformers import AutoConfig\nfrom faqtune.models import from_pretrained_or_explain\n"
            "print(from_pretrained_or_explain(AutoConfig, 'someone/cached').hidden_size)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["64"], out.stderr
    assert "Retrying" not in out.stderr
