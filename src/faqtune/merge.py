"""Merging a LoRA adapter into plain weights: the dequantized NF4 weights it was trained against, the merge
itself, and the standalone folder it is saved as.

The adapter of a QLoRA run learned against the *dequantized NF4* weights of the base, not its original
weights: merging into the original weights adds back the quantization error the adapter never saw. This
module does the arithmetic on models it is handed; `models.merge_adapter` loads them (the 4-bit base as in
training, the full-precision base) and `export.merge_run` measures which merge is more faithful. It sits
below both, so that `models.load_for_inference` can merge in memory without importing the ship stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from faqtune.errors import ModelError
from faqtune.run import share_as_umask

MERGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dequantize(quantized) -> dict[str, torch.Tensor]:
    """Every 4-/8-bit layer's weight of a bitsandbytes-quantized model, dequantized to fp32 on the CPU; keyed
    by state-dict name (the keys of the same model loaded unquantized)."""
    from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type

    out = {}
    for name, module in quantized.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and get_bnb_param_type(weight):
            out[f"{name}.weight"] = dequantize_bnb_weight(weight, getattr(module, "state", None)).float().cpu()
    return out


@contextmanager
def adapter_fits(adapter_dir: str | Path) -> Iterator[None]:
    """PEFT loading the adapter in `adapter_dir` onto a base: weights whose shapes do not fit (a rank `r` in
    adapter_config.json other than the weights', or another base) are one line naming the folder and the first
    mismatch, not torch's list of every tensor."""
    try:
        yield
    except RuntimeError as e:
        mismatches = [line.strip() for line in str(e).splitlines() if line.strip().startswith("size mismatch")]
        if not mismatches:
            raise
        raise ModelError(f"{adapter_dir}: the adapter's weights do not fit its adapter_config.json and base model "
                         f"({len(mismatches)} tensor(s); first: {mismatches[0].rstrip('.')}); was adapter_config.json edited, "
                         "or the adapter trained on another base?") from None


def merge_into(model, adapter_dir: str | Path, dtype: str, weights: dict[str, torch.Tensor] | None = None):
    """`model` (full precision, fp32) with `weights` copied over its own (the dequantized ones, or None to keep
    the checkpoint's), the adapter in `adapter_dir` merged in fp32, then every parameter cast to `dtype`.
    Returns a plain transformers model in eval mode."""
    from peft import PeftModel

    if weights:
        state = model.state_dict()
        with torch.no_grad():
            for key, value in weights.items():
                state[key].copy_(value)
    with adapter_fits(adapter_dir):
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model = model.merge_and_unload()
    with torch.no_grad():  # parameters only: buffers such as rope's inv_freq stay fp32, as from_pretrained keeps them
        for param in model.parameters():
            param.data = param.data.to(MERGE_DTYPES[dtype])
    model.config.dtype = MERGE_DTYPES[dtype]
    model.config.use_cache = True
    return model.eval()


def save_merged(model, tokenizer, out_dir: str | Path) -> Path:
    """A standalone model folder: safetensors weights, config, generation config, tokenizer + chat template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    share_as_umask(out)
    return out
