"""Pipeline on a tiny random Llama: train 2 steps in 4-bit -> save -> reload with plain PEFT -> answer."""

from __future__ import annotations

import io
import json

import pytest
from conftest import assert_shared_as_umask, one_error_line, thing_rows, write_faq

from faqtune.cli import main

FAST = ["--train.max_steps", "2", "--train.save_steps", "1", "--train.gradient_accumulation_steps", "2",
        "--lora.r", "8", "--data.eval_fraction", "0.2"]


@pytest.fixture(scope="module")
def trained_run(tiny_runs):
    return tiny_runs(*FAST)


def test_weights_written_are_readable_as_the_umask_says(trained_run):
    """safetensors writes 0600 (safetensors/safetensors#782): a server running as another user could read the
    adapter's config but not its weights, nor the index's tuned embedder."""
    assert_shared_as_umask(trained_run / "adapter", "adapter_model.safetensors")
    [embedder] = (trained_run / "index").glob("*/model.safetensors")
    assert_shared_as_umask(embedder.parent, "model.safetensors")


def test_run_directory_contents(trained_run):
    assert (trained_run / "adapter" / "adapter_config.json").exists()
    assert (trained_run / "adapter" / "adapter_model.safetensors").exists()
    assert not list((trained_run / "adapter").glob("*.bin"))
    assert (trained_run / "tokenizer" / "tokenizer.json").exists()
    cfg = (trained_run / "config.yaml").read_text()
    assert "max_steps: 2" in cfg and "r: 8" in cfg  # the effective config, overrides included
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2]
    assert all("learning_rate" in r for r in losses)
    assert any("eval_loss" in r for r in rows)
    assert list((trained_run / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (trained_run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1",
                                                                                          "checkpoint-2"]
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens_per_second"] > 0
    assert len((trained_run / "data" / "eval.jsonl").read_text().splitlines()) == 2


def test_adapter_loads_with_plain_peft_and_was_trained(trained_run, tiny_base):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = load_file(trained_run / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means it trained
    targets = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())["target_modules"]
    leaves = {t.rsplit(".", 1)[-1] for t in targets}  # all-linear: every projection, never lm_head
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(base, trained_run / "adapter")
    tok = AutoTokenizer.from_pretrained(trained_run / "tokenizer")
    ids = tok.apply_chat_template([{"role": "user", "content": "How do I do thing number 3?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_ask_prints_only_the_answer(trained_run, capsys):
    from faqtune.config import GenerationConfig
    from faqtune.generate import Answerer
    from faqtune.loading import load_for_inference

    question = "How do I do thing number 3?"
    assert main(["ask", str(trained_run), question, "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    model, tok, cfg = load_for_inference(trained_run)
    raw = Answerer(model, tok, GenerationConfig(max_new_tokens=12)).ask(question)[0]
    assert printed == raw.text + "\n"  # the clean answer and nothing else
    assert "<|im_start|>" not in printed and "<|im_end|>" not in printed
    assert raw.new_tokens <= 12
    assert main(["ask", str(trained_run), question, "--base-only", "--max-new-tokens", "12"]) == 0


def test_chat_reads_piped_stdin(trained_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("How do I do thing number 1?\n\n/reset\nAnd number 2?\n"))
    assert main(["chat", str(trained_run), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2  # one answer line per question; no prompts echoed on a pipe
    assert "you>" not in out


@pytest.mark.parametrize("command", [["ask", "RUN", "How do I do thing number 1?", "--merged", "none"],
                                     ["ask", "RUN", "How do I do thing number 1?", "--merged", "fp32"],
                                     ["merge", "RUN", "OUT"]])
def test_an_adapter_config_whose_rank_does_not_fit_its_weights_is_one_line(trained_run, tmp_path, capsys, command):
    """PEFT's size-mismatch RuntimeError reached the user as a traceback listing every tensor."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config["r"] *= 2
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    argv = [str(run) if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert str(run / "adapter") in line and "do not fit its adapter_config.json" in line and "size mismatch" in line


def test_a_question_longer_than_the_context_is_refused_and_chat_goes_on(trained_run, capsys, monkeypatch):
    """The tiny Llama's context is 512 tokens: ask and chat answered a longer prompt with no word (serve says
    400); now ask refuses it in one line and chat skips that line, answers the next, and exits 1. Grounded, the
    top entry is answered as it is (the next test)."""
    long = "How do I do thing number 3? " * 120
    assert main(["ask", str(trained_run), long, "--max-new-tokens", "4", "--no-grounding"]) == 2
    assert "longer than the model's context of 512 tokens" in one_error_line(capsys)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long}\nHow do I do thing number 1?\n"))
    assert main(["chat", str(trained_run), "--max-new-tokens", "4", "--no-grounding"]) == 1
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and "stdin line 1: the prompt is" in err and "skipped" in err


def test_a_grounded_prompt_too_long_to_read_answers_the_top_entry_as_it_is(tiny_runs, tmp_path, capsys):
    """An FAQ entry of 3,000 words made every question it was retrieved for fail with "shorten the question",
    and `faqtune eval` die at the first; now the entry is answered verbatim and cited, without generating."""
    terms = "The full terms: " + " ".join(f"clause {i} applies." for i in range(1000))
    rows = [*thing_rows(6), {"question": "What are the full terms?", "answer": terms}]
    run = tiny_runs(*FAST, faq=write_faq(tmp_path / "faq.json", rows), name="long-entry")
    assert main(["ask", str(run), "What are the full terms?"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == terms and 'FAQ entry #6 "What are the full terms?"' in err
    assert main(["ask", str(run), "How do I do thing number 2?", "--max-new-tokens", "4"]) == 0  # short: generated


def test_resume_after_the_faq_was_edited_is_refused_and_the_run_kept(tiny_runs, tmp_path, capsys):
    """An edited FAQ reshuffled the split on --resume, silently: entries trained on moved into the held-out half."""
    faq = write_faq(tmp_path / "faq.json", thing_rows(10))
    run = tiny_runs(*FAST, faq=faq, name="edited-faq")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    write_faq(faq, thing_rows(12))
    assert main(["train", "--output", str(run), "--resume", "--train.max_steps", "3"]) == 2
    assert "has changed since this run was trained" in one_error_line(capsys)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_runs_adapter_folder_is_read_as_its_run(trained_run, capsys):
    """`ask RUN/adapter` answered without retrieval and without the run's settings, with no word."""
    assert main(["ask", str(trained_run / "adapter"), "How do I do thing number 1?", "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert f"is the adapter of the run {trained_run}" in err and "source: " in err


def test_resume_continues_from_last_checkpoint(trained_run, capsys):
    import shutil

    run = trained_run.parent / "resumed"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "checkpoints" / "checkpoint-2")
    assert main(["train", "--output", str(run), "--resume", "--train.max_steps", "3"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps[-2:] == [2, 3]  # continued from checkpoint-1, not from scratch
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_resume_with_other_settings_is_refused_and_the_run_kept(trained_run, tmp_path, capsys):
    """Another lora.r crashed while loading the checkpoint after config.yaml had been rewritten (the run could
    not be resumed again); another --data rewrote the run's splits and index under the old adapter."""
    import shutil

    run = tmp_path / "kept"
    shutil.copytree(trained_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = tmp_path / "other.csv"
    other.write_text("question,answer\nWhy?,Because.\n")
    for flags, named in ((["--lora.r", "2"], "`lora.r`"), (["--data", str(other)], "`data.path`")):
        assert main(["train", "--output", str(run), "--resume", "--train.max_steps", "3", *flags]) == 2
        err = capsys.readouterr().err
        assert named in err and "new --output" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_existing_run_is_not_overwritten(trained_run, capsys):
    before = (trained_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(["train", "--output", str(trained_run), "--base", "unused"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "Traceback" not in err
    assert (trained_run / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_guide_template_run(tiny_base_no_template, small_faq, tmp_path, capsys):
    run = tmp_path / "plain"
    assert main(["train", "--base", str(tiny_base_no_template), "--data", str(small_faq), "--output", str(run),
                 "--train.max_steps", "1", "--lora.r", "4", "--quantization.mode", "none"]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert "<human>: " in tok.chat_template  # saved with the run, so inference uses the same format
    assert main(["ask", str(run), "How do I do thing number 1?", "--max-new-tokens", "6"]) == 0
    assert "<assistant>:" not in capsys.readouterr().out


def test_packed_and_padded_losses_agree(tiny_base, tiny_tokenizer):
    """Padding-free packing (position ids restart per example) must give the same loss as padding."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from faqtune.prompting import encode_conversation

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    convs = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes. " * (i + 1)}]
             for i in range(3)]
    rows = [vars(encode_conversation(tiny_tokenizer, c, 512)) for c in convs]
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    pad = tiny_tokenizer.eos_token_id
    padded = DataCollatorForLanguageModeling(pad_token_id=pad)(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(rows)
    with torch.no_grad():
        a = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"])
        # use_cache=False as in training: transformers only derives the block-diagonal mask without a cache
        b = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"],
                  use_cache=False)
    assert packed["input_ids"].shape[0] == 1
    assert torch.allclose(a.loss, b.loss, atol=1e-5), (a.loss, b.loss)
