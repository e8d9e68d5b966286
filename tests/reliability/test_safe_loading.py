"""Safe by default: weights load only from safetensors, model code from a model folder runs only when asked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from faqtune import loading, models
from faqtune.config import load_config
from faqtune.errors import ModelError

FP32 = {"quantization.compute_dtype": "fp32"}


def test_defaults_are_safe():
    cfg = load_config()
    assert cfg.trust_remote_code is False


def test_base_loading_asks_for_safetensors_and_no_remote_code(tiny_base, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, ident, **kwargs):
        seen.update(kwargs)
        return original(cls, ident, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    models.load_base_model(str(tiny_base), load_config(None, FP32))
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False


def test_a_model_folder_with_only_pytorch_model_bin_is_refused(tiny_base, tmp_path):
    from safetensors.torch import load_file

    folder = shutil.copytree(tiny_base, tmp_path / "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    for quantize in (True, False):
        with pytest.raises(ModelError, match="holds no .safetensors weights; faqtune does not load pickled weights"):
            models.load_base_model(str(folder), load_config(None, FP32), quantize=quantize)


def test_model_code_in_a_folder_never_runs_unless_asked(tiny_base, tmp_path):
    folder = shutil.copytree(tiny_base, tmp_path / "custom-code")
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilForCausalLM\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                               "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="ships its own model code, which runs only with `trust_remote_code: true`"):
        models.load_base_model(str(folder), load_config(None, FP32))
    assert not marker.exists()


def test_a_pickled_adapter_is_refused(reference, tmp_path):
    """PEFT falls back to adapter_model.bin when there is no safetensors file; faqtune does not."""
    from safetensors.torch import load_file

    run = Path(shutil.copytree(reference, tmp_path / "run"))
    weights = run / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(weights), run / "adapter" / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(ModelError, match="no adapter_model.safetensors; faqtune loads adapters only from safetensors"):
        loading.load_for_inference(run)


def test_checkpoints_and_adapters_are_written_as_safetensors(reference):
    """Weights are safetensors; the Trainer's other pickles (optimizer, RNG) are checksummed before resuming
    and read with weights_only=True; training_args.bin is written by the Trainer but never read."""
    assert (reference / "adapter" / "adapter_model.safetensors").exists()
    assert {p.name for p in reference.rglob("*.bin")} == {"training_args.bin"}
    assert all((p / "adapter_model.safetensors").exists() for p in (reference / "checkpoints").glob("checkpoint-*"))
