"""Multi-process training: 2-process DDP on CPU (gloo, torchrun) matches one process with the same global batch;
`python -m faqtune` works as the launchers' entry point; the accelerate example configs parse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from faqtune.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Same data, same seed, no dropout (its masks differ per process), fp32 compute, no warmup: only the split of
# each global batch of 4 over the processes differs.
RECIPE = ["--train.max_steps", "3", "--train.save_steps", "100", "--train.warmup_ratio", "0",
          "--train.learning_rate", "0.02", "--lora.r", "8", "--lora.dropout", "0", "--data.eval_fraction", "0",
          "--quantization.compute_dtype", "fp32", "--grounding.mode", "none"]
LOSS_TOLERANCE = 1e-4  # measured: up to 2.3e-5 (float summation order across processes)


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def faq(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp-faq") / "faq.json"
    rows = [{"question": f"How do I do thing number {i}?", "answer": f"Thing {i} is done on page {i}, then save."}
            for i in range(12)]
    path.write_text(json.dumps({"questions": rows}))
    return path


def test_two_process_ddp_matches_one_process(tiny_base, faq, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["train", "--base", str(tiny_base), "--data", str(faq), *RECIPE]
    assert main([*common, "--output", str(single), "--train.batch_size", "4"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "faqtune", *common, "--output", str(ddp), "--train.batch_size", "2"],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _losses(single), _losses(ddp)
    assert len(a) == len(b) == 3  # rank 0 alone writes metrics.jsonl
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < LOSS_TOLERANCE, (a, b)
    assert b[-1] < b[0]  # and it learns

    from safetensors.torch import load_file

    adapter = load_file(ddp / "adapter" / "adapter_model.safetensors")
    reference = load_file(single / "adapter" / "adapter_model.safetensors")
    lora_b = [k for k in adapter if "lora_B" in k]
    assert lora_b and all(adapter[k].abs().sum() > 0 for k in lora_b)  # B starts at zero: it trained
    # Adam turns float-order noise in near-zero gradients into +-lr steps for a few elements, so compare the
    # adapters on average, not element by element
    diff = sum(float((adapter[k].float() - reference[k].float()).abs().mean()) for k in adapter) / len(adapter)
    assert diff < 1e-3, diff
    assert json.loads((ddp / "summary.json").read_text())["steps"] == 3


def test_two_process_ddp_with_grounding_indexes_once(tiny_base, faq, tmp_path):
    """The main process builds the run's index while the other waits, then both read it."""
    run = tmp_path / "grounded"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "faqtune",
         "train", "--base", str(tiny_base), "--data", str(faq), "--output", str(run), "--train.max_steps", "1",
         "--lora.r", "4", "--train.batch_size", "2", "--grounding.top_k", "2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("grounding: indexed 12 entries") == 1
    from faqtune.retrieval import FaqIndex

    assert len(FaqIndex(run / "index")) == 12 and (run / "adapter" / "adapter_model.safetensors").exists()


def test_python_dash_m_faqtune_is_the_launch_entry_point():
    proc = subprocess.run([sys.executable, "-m", "faqtune", "train", "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=60)
    assert proc.returncode == 0 and "usage: faqtune train" in proc.stdout


@pytest.mark.pipeline  # accelerate's config reader imports torch
@pytest.mark.parametrize("name", ["ddp", "fsdp_qlora", "multi_node"])
def test_accelerate_example_configs(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "examples" / "accelerate" / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith(("# accelerate launch --config_file examples/accelerate/", "# Run on every machine"))
    assert "-m faqtune train" in path.read_text().split("\n\n")[0]
    config = load_config_from_file(str(path))
    assert config.distributed_type in ("MULTI_GPU", "FSDP")
    if name == "fsdp_qlora":
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] and config.fsdp_config["fsdp_sync_module_states"]
    if name == "multi_node":
        assert config.num_machines == 2 and config.main_process_ip


@pytest.mark.pipeline  # torch dtypes in transformers' BitsAndBytesConfig
def test_quant_storage_follows_the_compute_dtype_under_fsdp(monkeypatch):
    import torch

    from faqtune.config import QuantizationConfig
    from faqtune.models import build_bnb_config

    q = QuantizationConfig(compute_dtype="bf16")
    assert build_bnb_config(q).bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    assert build_bnb_config(q).bnb_4bit_quant_storage == torch.bfloat16


def test_sharded_qlora_keeps_one_dtype_per_layer(tiny_base, monkeypatch):
    """Under FSDP the base keeps the storage dtype (no fp32 upcast of norms), or FSDP refuses to flatten."""
    import torch

    from faqtune.config import load_config
    from faqtune.models import attach_lora, load_base_model

    def base_dtypes(norm_dtype):
        cfg = load_config(None, {"quantization.compute_dtype": "bf16", "lora.r": "4",
                                 "quantization.norm_dtype": norm_dtype})
        model = attach_lora(load_base_model(str(tiny_base), cfg), cfg)
        return {p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.is_floating_point()}

    assert torch.float32 in base_dtypes("fp32")  # single process: PEFT's upcast of the norms, when asked
    assert base_dtypes("auto") == {torch.bfloat16}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert base_dtypes("fp32") == {torch.bfloat16}  # packed 4-bit weights stored as bf16 too


@pytest.mark.parametrize("base", ["plain", "4bit"])
def test_fsdp_sharded_adapter_is_saved_whole(tiny_base, tmp_path, base):
    """Under FSDP the adapter is gathered from the shards before it is written (it was written empty)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "fsdp_save_worker.py"), str(tiny_base), str(out), base],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    expected = torch.load(out / "expected.pt")
    assert len(saved) == len(expected) > 0
    # the adapter loads with plain PEFT, every trained tensor back where it was (on a plain base: LoRA only)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out / "adapter")
    params = dict(loaded.named_parameters())
    for name, tensor in expected.items():
        assert torch.equal(params[name].to(tensor.dtype), tensor), name
