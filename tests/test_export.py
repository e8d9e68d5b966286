"""Ship it: merge (fidelity), model card, push (Hub client injected), ask from a pushed adapter, GGUF round trip."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import assert_shared_as_umask

from faqtune.cli import main

# Every test loads torch and transformers, imported in the tests: `pytest -m unit` collects this module too.
pytestmark = pytest.mark.pipeline

QUESTION = "How do I do thing number 3?"


@pytest.fixture(scope="module")
def tiny_run(tiny_runs) -> Path:
    """Two 4-bit QLoRA steps on the tiny Llama, at a learning rate that moves the adapter visibly."""
    return tiny_runs("--train.max_steps", "2", "--train.warmup_ratio", "0", "--train.learning_rate", "0.05",
                     "--lora.r", "8", "--data.eval_fraction", "0.2", "--grounding.mode", "none",
                     "--generation.max_new_tokens", "12", name="shipped")


@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "model"
    assert main(["merge", str(tiny_run), str(out), "--dtype", "fp32"]) == 0
    return out


def test_merge_writes_a_standalone_model(merged, tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()
    assert_shared_as_umask(merged, "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(merged)  # plain transformers, no PEFT
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_run / "tokenizer").chat_template


def test_merge_fidelity_report(merged, capsys):
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["questions"] == 2 and report["source"].endswith("eval.jsonl")
    cands = report["candidates"]
    assert set(cands) == {"dequantized", "original"}
    # the adapter learned against the NF4-dequantized weights: merging there reproduces the 4-bit model
    assert cands["dequantized"]["agreement"] >= cands["original"]["agreement"]
    assert report["base_weights"] == "dequantized"
    assert abs(report["difference"]["answer_loss"]) < 0.02
    assert report["saved"]["answer_accuracy"] is not None and report["reference"]["answer_accuracy"] is not None


def test_merge_equals_adapter_on_dequantized_base(tiny_run):
    """merge_and_unload into the dequantized weights == base(dequantized) + adapter, unmerged (fp32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from faqtune.loading import dequantized_weights, merge_adapter
    from faqtune.run import RunDir

    cfg = RunDir(tiny_run).load_config()
    deq = dequantized_weights(cfg.base_model, cfg)
    merged = merge_adapter(tiny_run, "dequantized", "fp32", cfg, dequantized=deq)
    base = AutoModelForCausalLM.from_pretrained(cfg.base_model)
    base.load_state_dict(deq, strict=False)
    unmerged = PeftModel.from_pretrained(base, tiny_run / "adapter").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, unmerged(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4
    original = merge_adapter(tiny_run, "original", "fp32", cfg)
    with torch.no_grad():
        assert (original(input_ids=ids).logits - b).abs().max() > 1e-4  # the quantization error is real


def test_merge_refuses_a_non_empty_out_dir(tiny_run, tmp_path, capsys):
    (tmp_path / "x").write_text("x")
    assert main(["merge", str(tiny_run), str(tmp_path), "--no-check"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_model_card(tiny_run, merged, tiny_base):
    from faqtune.run import RunDir
    from faqtune.ship.hub import model_card

    run = RunDir(tiny_run)
    cfg = run.load_config()
    card = model_card(run, cfg, "acme/faq-bot")
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "8 question/answer pairs" in card and "2 held out" in card
    assert "| LoRA r / alpha / dropout | 8 / 16 / 0.0 |" in card
    assert 'AutoPeftModelForCausalLM' in card and 'from_pretrained("acme/faq-bot")' in card
    assert "faqtune ask acme/faq-bot" in card and "## Evaluation" not in card
    eval_dir = tiny_run / "eval"
    eval_dir.mkdir(exist_ok=True)
    (eval_dir / "report.json").write_text(json.dumps({
        "source": "x/eval.jsonl", "questions_evaluated": 2, "tuned": {"answer_accuracy": 0.5, "answer_loss": 1.25},
        "base": {"answer_accuracy": 0.0, "answer_loss": 3.5}, "forgetting": {"perplexity_ratio": 1.1}}))
    try:
        card = model_card(run, cfg, "acme/faq-bot")
        assert "| answer accuracy | 0.500 | 0.000 |" in card and "| answer loss | 1.250 | 3.500 |" in card
    finally:
        shutil.rmtree(eval_dir)
    report = json.loads((merged / "merge_report.json").read_text())
    card = model_card(run, cfg, "acme/faq-bot-merged", "merged", report)
    assert "library_name: transformers" in card and "## Merge fidelity" in card and "AutoModelForCausalLM" in card


class FakeHubApi:
    """Stands in for huggingface_hub.HfApi: records the calls and keeps a copy of what was uploaded."""

    def __init__(self, store: Path):
        self.store, self.calls = store, []

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private, repo_type))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        self.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, self.store / repo_id, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def pushed(tiny_run, tmp_path_factory) -> Path:
    from faqtune.ship.hub import push

    api = FakeHubApi(tmp_path_factory.mktemp("hub"))
    assert push(tiny_run, "acme/faq-bot", private=True, api=api) == "https://huggingface.co/acme/faq-bot"
    assert api.calls[0] == ("create_repo", "acme/faq-bot", True, "model") and api.calls[1][0] == "upload_folder"
    return api.store / "acme" / "faq-bot"


def test_push_uploads_adapter_tokenizer_card_and_settings(pushed, tiny_base):
    names = {p.name for p in pushed.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "faqtune.yaml"} <= names
    assert json.loads((pushed / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_base)
    shared = (pushed / "faqtune.yaml").read_text()
    assert "output_dir: ." in shared and "path: faq.json" in shared  # no paths of the pusher's machine


def test_ask_answers_from_a_pushed_adapter_folder_and_hub_id(pushed, tiny_run, capsys, monkeypatch):
    assert main(["ask", str(tiny_run), QUESTION, "--max-new-tokens", "8"]) == 0
    from_run = capsys.readouterr().out
    assert main(["ask", str(pushed), QUESTION, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == from_run
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(pushed))
    assert main(["ask", "acme/faq-bot", QUESTION, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == from_run


def test_ask_reads_the_base_from_adapter_config_without_faqtune_yaml(pushed, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(pushed, bare)
    (bare / "faqtune.yaml").unlink()  # a plain PEFT adapter repo: the base comes from adapter_config.json
    assert main(["ask", str(bare), QUESTION, "--max-new-tokens", "4"]) == 0


def test_push_merged_and_errors(tiny_run, merged, tmp_path, capsys, monkeypatch):
    from faqtune.ship.hub import push

    api = FakeHubApi(tmp_path)
    push(tiny_run, "acme/faq-merged", merged=True, api=api, merged_dir=merged)
    up = tmp_path / "acme" / "faq-merged"
    assert (up / "model.safetensors").exists() and "## Merge fidelity" in (up / "README.md").read_text()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    assert main(["push", str(tiny_run), "acme/faq-bot"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert main(["push", str(tiny_run), "not-a-repo-id"]) == 2
    assert "OWNER/NAME" in capsys.readouterr().err


def test_push_merged_never_uploads_a_stale_or_unfinished_merge(tiny_run, tmp_path, capsys):
    """`push --merged` took RUN/merged as it was: merged before a `train --resume`, or left by an interrupted
    merge (weights, no report)."""
    import json

    from safetensors.torch import load_file, save_file

    from faqtune.errors import FaqtuneError
    from faqtune.ship.hub import push
    from faqtune.ship.merged import REPORT_NAME, adapter_fingerprint

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["merge", str(run), str(run / "merged"), "--dtype", "fp32", "--no-check"]) == 0
    assert not list(tmp_path.glob("run/.merged.merging-*"))  # built beside it, renamed into place
    weights = run / "adapter" / "adapter_model.safetensors"  # trained on since: another adapter
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, str(weights))
    user_copy = tmp_path / "mine"
    shutil.copytree(run / "merged", user_copy)
    with pytest.raises(FaqtuneError, match="was merged from another adapter"):
        push(run, "acme/x", merged=True, api=FakeHubApi(tmp_path / "hub1"), merged_dir=user_copy)
    push(run, "acme/x", merged=True, api=FakeHubApi(tmp_path / "hub2"))
    err = capsys.readouterr().err
    assert "was merged from another adapter" in err and "merging again" in err
    up = json.loads((tmp_path / "hub2" / "acme" / "x" / REPORT_NAME).read_text())
    assert up["adapter_sha256"] == adapter_fingerprint(run / "adapter")
    (run / "merged" / REPORT_NAME).unlink()  # what an interrupted merge left before
    push(run, "acme/x", merged=True, api=FakeHubApi(tmp_path / "hub3"))
    assert f"holds no readable {REPORT_NAME}" in capsys.readouterr().err
    assert (run / "merged" / REPORT_NAME).exists()


# ---- GGUF -------------------------------------------------------------------------------------------

def test_rope_permutation_is_what_the_transformers_loader_reverses():
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from faqtune.ship.gguf import rope_permute

    rng = np.random.default_rng(0)
    processor = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, heads in (("blk.0.attn_q.weight", 4), ("blk.0.attn_k.weight", 2)):
        w = rng.standard_normal((heads * 16, 64)).astype(np.float32)
        back = processor.process(rope_permute(w, heads), name).weights
        assert np.array_equal(back, w) and not np.array_equal(rope_permute(w, heads), w)


def test_export_gguf_round_trip(tiny_run, tmp_path, capsys):
    out = tmp_path / "bot.gguf"
    assert main(["export-gguf", str(tiny_run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "round trip" in printed and "token ids identical" in printed and "chat template identical" in printed
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "FROM ./bot.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in modelfile
    before = out.stat().st_mtime_ns
    assert main(["export-gguf", str(tiny_run), str(out), "--no-verify"]) == 2  # both are there: kept
    assert "pass --force to replace them" in capsys.readouterr().err and out.stat().st_mtime_ns == before
    assert main(["export-gguf", str(tiny_run), str(out), "--no-verify", "--force"]) == 0
    assert out.stat().st_mtime_ns != before and [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


@pytest.mark.parametrize("outtype, tolerance", [("f32", 1e-5), ("q8_0", 5e-2)])
def test_gguf_logits_match_the_model(tiny_base, tiny_tokenizer, tmp_path, outtype, tolerance):
    from transformers import AutoModelForCausalLM

    from faqtune.ship.gguf import verify_gguf, write_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    path = write_gguf(model, tiny_tokenizer, tmp_path / f"m-{outtype}.gguf", outtype)
    conv = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "On page 3, order 1234."}]
    result = verify_gguf(path, model, tiny_tokenizer, [conv[:1]], conv)
    assert result["max_abs_logit_diff"] < tolerance, result
    assert result["template_ids_equal"] and result["chat_template_equal"]


SMOLLM_LIKE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful bot.<|im_end|>\n' }}{% endif %}"
               "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_modelfile_template_renders_like_the_chat_template(tiny_base_no_template):
    from transformers import AutoTokenizer

    from faqtune.config import GenerationConfig
    from faqtune.prompting import GUIDE_TEMPLATE, render
    from faqtune.ship.gguf import ollama_modelfile, render_like_ollama, template_parts

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    tok = AutoTokenizer.from_pretrained(tiny_base_no_template)
    for template in (GUIDE_TEMPLATE, SMOLLM_LIKE):
        tok.chat_template = template
        parts = template_parts(tok)
        assert render_like_ollama(parts, conv) == render(tok, conv, True)
    assert parts["default_system"] == "You are a helpful bot."
    modelfile = ollama_modelfile(tok, "m.gguf", None, GenerationConfig())
    assert 'SYSTEM """You are a helpful bot."""' in modelfile and "TEMPLATE" in modelfile


def test_gguf_refuses_what_it_cannot_write():
    from transformers import GPT2Config

    from faqtune.errors import ModelError
    from faqtune.ship.gguf import check_llama, pre_tokenizer_name

    with pytest.raises(ModelError, match="only llama"):
        check_llama(GPT2Config())
    with pytest.raises(ModelError, match="splits text"):
        pre_tokenizer_name({"type": "Whitespace"})
    assert pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"  # llama.cpp's name


def test_push_includes_the_faq_index_of_a_grounded_run(tiny_run, tmp_path):
    from faqtune.run import RunDir
    from faqtune.ship.hub import stage_adapter

    run = tmp_path / "grounded"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "index").mkdir()
    (run / "index" / "faq.lance").write_text("x")
    staged = stage_adapter(RunDir(run), RunDir(run).load_config(), tmp_path / "staged")
    assert (staged / "index" / "faq.lance").exists()


def test_merge_without_check_saves_the_dequantized_merge(tiny_run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fast"
    assert main(["merge", str(tiny_run), str(out), "--no-check", "--dtype", "fp16"]) == 0
    assert "fidelity not measured" in capsys.readouterr().out
    report = json.loads((out / "merge_report.json").read_text())
    assert report["base_weights"] == "dequantized" and not report["checked"]
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float16


def test_ask_can_merge_in_memory(tiny_run):
    """`generation.merged`: the adapter merged into the dequantized weights for answering, next-token logits
    as the 4-bit model's (the trained weights), and no 4-bit or LoRA layer left."""
    import torch

    from faqtune.loading import load_for_inference

    trained, tok, _ = load_for_inference(tiny_run)
    merged, _, _ = load_for_inference(tiny_run, merged="fp32")
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.dtype == torch.float32
    assert not any("lora_" in n or p.dtype == torch.uint8 for n, p in merged.named_parameters())
    ids = tok(QUESTION, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = trained(ids).logits.float(), merged(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9 and (a - b).abs().max() < 0.05 * a.abs().max()
    assert main(["ask", str(tiny_run), QUESTION, "--merged", "fp32"]) == 0


def test_merged_dtype_and_parameter_count(tiny_base):
    from transformers import AutoModelForCausalLM

    from faqtune.config import load_config
    from faqtune.errors import ConfigError
    from faqtune.loading import _parameter_count, merged_dtype

    config = json.loads((tiny_base / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert _parameter_count(config) == sum(p.numel() for p in model.parameters()) - norms
    assert merged_dtype("none", str(tiny_base)) is None and merged_dtype("bf16", str(tiny_base)) == "bf16"
    assert merged_dtype("auto", str(tiny_base)) in ("fp32", "bf16")  # CPU, and the tiny model fits
    assert merged_dtype("auto", "no/such-folder") is None  # size unknown: keep the 4-bit base
    with pytest.raises(ConfigError, match="generation.merged"):  # checked once, when the settings load
        load_config(None, {"generation.merged": "fp8"})


def test_prompt_lookup_is_used_for_one_greedy_answer_and_changes_nothing(tiny_run):
    from faqtune.generate import Answerer
    from faqtune.loading import load_for_inference

    model, tok, cfg = load_for_inference(tiny_run, merged="fp32")  # fp32: the two decodings' sums agree
    seen = []
    generate = model.generate

    def spy(**kwargs):
        seen.append(kwargs.get("prompt_lookup_num_tokens"))
        return generate(**kwargs)

    model.generate = spy
    bot = Answerer(model, tok, cfg.generation)
    with_lookup = bot.ask(QUESTION)[0]
    bot.ask_many([QUESTION, QUESTION])  # a batch: plain decoding
    bot.gen = replace(cfg.generation, prompt_lookup=0)
    plain = bot.ask(QUESTION)[0]
    assert seen == [cfg.generation.prompt_lookup, None, None] and cfg.generation.prompt_lookup > 0
    assert with_lookup.text == plain.text and with_lookup.new_tokens == plain.new_tokens
