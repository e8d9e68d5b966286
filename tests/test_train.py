"""Training internals: the answer-only loss, optimizer and dtype choices, data mixing, 8-bit mode."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import TrainerCallback

from faqtune import models
from faqtune.checkpoints import prepare_run_dir
from faqtune.config import load_config
from faqtune.errors import ConfigError
from faqtune.prompting import encode_conversation
from faqtune.run import RunDir
from faqtune.train import FaqTrainer, mix_entries, resolve_optimizer

pytestmark = pytest.mark.pipeline  # the training stage: torch, transformers' Trainer, TRL on every test


def test_answer_only_loss_equals_full_cross_entropy(tiny_base, tiny_tokenizer):
    """Projecting only answer positions through the LM head must not change the loss."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    convs = [[{"role": "user", "content": f"Where is order {i}?"},
              {"role": "assistant", "content": "It ships in two days. " * (i + 1)}] for i in range(3)]
    rows = []
    for c in convs:
        enc = encode_conversation(tiny_tokenizer, c, 512)
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    for padding_free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.eos_token_id,
                                                padding_free=padding_free)(rows)
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask", "position_ids")}
        with torch.no_grad():
            # half the trained labels become the model's own argmax, so that accuracy is neither 0 nor 1
            trained = batch["labels"][:, 1:] != -100
            argmax = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].argmax(-1)
            flip = trained & (torch.arange(trained.shape[1]) % 2 == 0)
            batch["labels"][:, 1:][flip] = argmax[flip]
            out = model(**batch, use_cache=False)
            fake = SimpleNamespace(args=SimpleNamespace(average_tokens_across_devices=False),
                                   _metrics=defaultdict(lambda: defaultdict(list)))
            ours = FaqTrainer.compute_loss(fake, model, dict(batch))
        assert torch.allclose(out.loss, ours, atol=1e-5), (padding_free, out.loss, ours)
        targets = batch["labels"][:, 1:]
        expected = (out.logits[:, :-1].argmax(-1)[trained] == targets[trained]).float().mean().item()
        assert fake._metrics["eval"]["mean_token_accuracy"] == [pytest.approx(expected)]
        assert 0.3 < expected < 0.7  # the flipped half right, the rest not: the figure can tell them apart


def test_paged_optimizer_falls_back_on_cpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    assert resolve_optimizer("paged_adamw_8bit") == "adamw_torch_fused"
    assert "adamw_torch_fused" in capsys.readouterr().err
    assert resolve_optimizer("adamw_8bit") == "adamw_8bit"  # an explicit non-paged choice is kept
    assert resolve_optimizer("adamw_torch") == "adamw_torch"


@pytest.mark.parametrize("fp32_s,bf16_s,fast", [(0.004, 0.001, True), (0.004, 0.0035, False), (0.004, 0.01, False)])
def test_bf16_is_chosen_only_when_clearly_faster(fp32_s, bf16_s, fast):
    assert models.bf16_beats_fp32(fp32_s, bf16_s) is fast


@pytest.mark.parametrize("bf16_fast,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_compute_dtype_follows_the_cached_measurement(tmp_path, monkeypatch, bf16_fast, expected):
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    monkeypatch.setenv("FAQTUNE_HOME", str(tmp_path))
    # one of the two cases contradicts what this CPU measures: it passes only if the cache is read, not re-measured
    known = {models.hardware_key(): {"fp32_s": 1.0, "bf16_s": 1.0, "bf16_fast": bf16_fast}}
    (tmp_path / "hardware.json").write_text(json.dumps(known))
    models.cpu_bf16_is_fast.cache_clear()
    try:
        assert models.resolve_compute_dtype("auto") == expected
    finally:
        models.cpu_bf16_is_fast.cache_clear()
    assert models.resolve_compute_dtype("fp32") == torch.float32


def test_auto_compute_dtype_is_measured_and_cached(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    monkeypatch.setenv("FAQTUNE_HOME", str(tmp_path))
    models.cpu_bf16_is_fast.cache_clear()
    try:
        fast = models.cpu_bf16_is_fast()
    finally:
        models.cpu_bf16_is_fast.cache_clear()
    entry = json.loads((tmp_path / "hardware.json").read_text())[models.hardware_key()]
    assert entry["fp32_s"] > 0 and entry["bf16_s"] > 0
    assert entry["bf16_fast"] is fast
    assert fast is models.bf16_beats_fp32(entry["fp32_s"], entry["bf16_s"])


@pytest.mark.parametrize("content", ["[]", '{"%s": {}}', '{"%s": {"bf16_fast": "yes"}}', "{trunc"])
def test_a_damaged_hardware_cache_is_measured_again_and_rewritten_whole(tmp_path, monkeypatch, content):
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    monkeypatch.setenv("FAQTUNE_HOME", str(tmp_path))
    (tmp_path / "hardware.json").write_text(content.replace("%s", models.hardware_key()))
    models.cpu_bf16_is_fast.cache_clear()
    try:
        fast = models.cpu_bf16_is_fast()
    finally:
        models.cpu_bf16_is_fast.cache_clear()
    assert fast is json.loads((tmp_path / "hardware.json").read_text())[models.hardware_key()]["bf16_fast"]
    assert [p.name for p in tmp_path.iterdir()] == ["hardware.json"]  # no temporary file left


def test_fp16_is_refused_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        models.resolve_compute_dtype("fp16")


def test_bnb_config_is_built_in_one_place():
    cfg = load_config(None, {"quantization.quant_type": "fp4", "quantization.double_quant": "false",
                             "quantization.compute_dtype": "fp32"})
    bnb = models.build_bnb_config(cfg.quantization)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "fp4" and not bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.float32
    assert models.build_bnb_config(load_config(None, {"quantization.mode": "none"}).quantization) is None
    assert models.build_bnb_config(load_config(None, {"quantization.mode": "8bit"}).quantization).load_in_8bit
    lora = models.build_lora_config(load_config(None, {"lora.target_modules": "q_proj,v_proj"}).lora)
    assert set(lora.target_modules) == {"q_proj", "v_proj"} and lora.r == 64 and lora.lora_alpha == 16


def test_mix_share_is_deterministic():
    cfg = load_config(None, {"data.mix": "general:0.2"})
    a, b = mix_entries(cfg, 80), mix_entries(cfg, 80)
    assert len(a) == 20 and a == b
    more = mix_entries(load_config(None, {"data.mix": "general:0.75"}), 80)
    assert len(more) == 240  # the 120 bundled examples are repeated rather than under-weighted


def test_bad_mix_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="data.mix"):
        load_config(None, {"data.mix": "general:1.5"})


def test_nf4_double_quant_storage(tiny_base):
    """The 4-bit base really is NF4 with double quantization (bits per parameter near 4.127 + block overhead)."""
    import bitsandbytes as bnb

    cfg = load_config(None, {"quantization.compute_dtype": "fp32"})
    model = models.load_base_model(str(tiny_base), cfg)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    assert all(m.weight.quant_state.nested for m in layers)


class LayoutProbe(TrainerCallback):
    """Records, at each optimizer step, whether any 4-bit layer is packed for CPU inference and whether every
    LoRA B matrix got a gradient (two entries a step)."""

    def __init__(self):
        self.seen: list[bool] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import bitsandbytes as bnb

        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        self.seen.append(any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers))
        self.seen.append(all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n))


def test_evaluation_during_training_keeps_4bit_layers_differentiable(tiny_base, tmp_path):
    """bitsandbytes repacks 4-bit weights for CPU inference in eval mode, cutting the backward pass; training
    with held-out evaluations must keep every 4-bit layer in its trainable layout."""
    import faqtune.train as train_mod

    probe = LayoutProbe()
    cfg = load_config(None, {"base_model": str(tiny_base), "output_dir": str(tmp_path / "run"),
                             "train.max_steps": 4, "train.eval_steps": 1, "lora.r": 4})
    train_mod.train(cfg, callbacks=(probe,))
    seen = probe.seen
    assert len(seen) == 8
    assert seen[0::2] == [False] * 4  # never repacked for inference, even after evaluations
    assert all(seen[1::2])


def test_8bit_mode_trains_and_answers(tiny_base, tmp_path, capsys):
    from faqtune.cli import main

    run = tmp_path / "run8"
    assert main(["train", "--base", str(tiny_base), "--output", str(run), "--quantization.mode", "8bit",
                 "--train.max_steps", "2", "--lora.r", "4", "--train.eval_steps", "0"]) == 0
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert "mode: 8bit" in (run / "config.yaml").read_text()
    assert main(["ask", str(run), "How do I return an item?", "--max-new-tokens", "4"]) == 0


class DtypeProbe(TrainerCallback):
    """Records the dtype of every trainable parameter at each optimizer step (what the optimizer updates)."""

    def __init__(self):
        self.seen: list[set[torch.dtype]] = []

        self.frozen: list[set[torch.dtype]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.seen.append({p.dtype for p in model.parameters() if p.requires_grad})
        self.frozen.append({p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()
                            and type(p).__name__ != "Params4bit"})


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_adapters_train_in_the_compute_dtype(tiny_base, tmp_path, compute):
    """TRL casts a quantized model's adapters to bf16 whatever the compute dtype (bf16 matmuls are ~120x slower
    than fp32 on an AVX2-only CPU); every trainable parameter must train in the resolved compute dtype, and
    resume must keep it."""
    from faqtune.train import train

    expected = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute]
    overrides = {"base_model": str(tiny_base), "output_dir": str(tmp_path / "run"), "train.max_steps": 2,
                 "train.eval_steps": 0, "train.save_steps": 1, "lora.r": 4,
                 "quantization.compute_dtype": compute}
    probe = DtypeProbe()
    summary = train(load_config(None, overrides), callbacks=(probe,))
    assert probe.seen and all(dtypes == {expected} for dtypes in probe.seen), probe.seen
    assert (summary["compute_dtype"], summary["adapter_dtype"]) == (compute, compute)
    # the unquantized frozen weights (embeddings, norms) too: PEFT's fp32 upcast is undone under bf16
    assert probe.frozen and all(dtypes == {expected} for dtypes in probe.frozen), probe.frozen
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (stored["adapter_dtype"], stored["norm_dtype"]) == (compute, compute)
    # resume from the step-1 checkpoint: the restored adapter and its optimizer keep the dtype
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-2")
    resumed = DtypeProbe()
    train(load_config(None, overrides), resume=True, callbacks=(resumed,))
    assert resumed.seen and all(dtypes == {expected} for dtypes in resumed.seen), resumed.seen


def test_norm_dtype_fp32_keeps_pefts_upcast(tiny_base, tmp_path):
    """`quantization.norm_dtype fp32` under bf16 compute: embeddings and norms train upcast, as PEFT does."""
    from faqtune.train import train

    overrides = {"base_model": str(tiny_base), "output_dir": str(tmp_path / "run"), "train.max_steps": 1,
                 "train.eval_steps": 0, "lora.r": 4, "quantization.compute_dtype": "bf16",
                 "quantization.norm_dtype": "fp32"}
    probe = DtypeProbe()
    summary = train(load_config(None, overrides), callbacks=(probe,))
    assert probe.frozen == [{torch.float32}] and probe.seen == [{torch.bfloat16}]
    assert (summary["norm_dtype"], summary["adapter_dtype"]) == ("fp32", "bf16")


def test_norm_dtype_follows_compute_except_fp16():
    q = load_config(None, {"quantization.compute_dtype": "bf16"}).quantization
    assert models.resolve_norm_dtype(q) == torch.bfloat16
    q.compute_dtype = "fp32"
    assert models.resolve_norm_dtype(q) == torch.float32
    q.compute_dtype, q.norm_dtype = "bf16", "fp32"
    assert models.resolve_norm_dtype(q) == torch.float32


def test_adapter_dtype_follows_compute_except_fp16():
    q = load_config(None, {"quantization.compute_dtype": "fp32"}).quantization
    assert models.resolve_adapter_dtype(q) == torch.float32
    q.compute_dtype = "bf16"
    assert models.resolve_adapter_dtype(q) == torch.bfloat16
    q.adapter_dtype = "fp32"
    assert models.resolve_adapter_dtype(q) == torch.float32


def test_hub_telemetry_is_off_unless_asked():
    """TRL's trainer sends telemetry to the Hub from a thread; importing faqtune turns it off (env wins)."""
    import os
    import subprocess
    import sys

    probe = "import faqtune, huggingface_hub.constants as c; print(c.HF_HUB_DISABLE_TELEMETRY)"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK",
                                                               "DISABLE_TELEMETRY")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**env, "HF_HUB_DISABLE_TELEMETRY": "0"})
    assert out.stdout.strip() == "False"


def test_auto_checkpointing_turns_on_when_activations_would_dominate_memory():
    """On CPU `auto` checkpoints when one micro-batch's activations would pass the budget (the grounded
    default's packed micro-batches do) or a quarter of the free memory; short micro-batches keep theirs (faster);
    an explicit setting always wins."""
    from faqtune import memory

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    free = 64 * 2**30
    config = SimpleNamespace(num_hidden_layers=30, hidden_size=576)
    grounded = memory.activation_bytes(config, 640, torch.bfloat16)  # the default on the shared FAQ: ~0.9 GB
    assert 0.7e9 < grounded < 1.1e9
    assert memory.use_checkpointing("auto", grounded, free) is True
    assert memory.use_checkpointing("auto", grounded, None) is True  # unknown free memory: the budget decides
    short = memory.activation_bytes(config, 160, torch.bfloat16)  # 4 short pure fine-tuning examples
    assert memory.use_checkpointing("auto", short, free) is False
    assert memory.use_checkpointing("auto", short, 4 * short - 1) is True  # crowded memory: on
    assert memory.use_checkpointing("false", 10**12, free) is False
    assert memory.use_checkpointing("true", 1, free) is True
    measured = memory.available_memory()
    assert measured is None or measured > 0


def test_the_faq_path_is_saved_absolute(tmp_path, monkeypatch):
    """`eval` pairs question ids with the run's FAQ file and `--resume` reads it again, from any folder."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"data.path": "faq.json", "output_dir": "run", "data.mix": "general:0.2,more.jsonl"})
    prepare_run_dir(cfg, RunDir("run"), resume=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["path"] == str(tmp_path / "faq.json")
    assert saved["data"]["mix"] == ["general:0.2", f"{tmp_path / 'more.jsonl'}:0.1"]
