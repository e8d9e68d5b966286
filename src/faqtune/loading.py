"""Loading a run for answering, the one way every command does it: a run directory, a pushed adapter folder or
a Hub repo id becomes an `OpenedRun` (settings, base, adapter, tokenizer), then a model: the 4-bit base as
trained with one or more adapters on it, or an adapter merged into the dequantized weights (`merge.py`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from faqtune import hub, merge
from faqtune.config import FaqtuneConfig
from faqtune.errors import ModelError
from faqtune.models import (
    cpu_bf16_is_fast,
    from_pretrained_or_explain,
    load_base_model,
    load_tokenizer,
    resolve_base,
)
from faqtune.run import RunDir, is_adapter_folder, load_saved_settings, named_damage


def fetch_adapter(ident: str) -> str:
    """A run directory or adapter folder as is; a Hub repo id (OWNER/NAME) downloaded first (snapshot)."""
    if hub.is_local(ident) or ident.count("/") != 1:
        return ident
    offline = hub.cache_only(ident)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(ident, local_files_only=offline)
    except Exception as e:  # offline, no such repo, gated: one sentence
        if offline:
            raise ModelError(f"{hub.unreachable_hint(ident)}; name a local run or adapter folder") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"'{ident}' is neither a local run or adapter folder nor a Hub repo that could be "
                         f"downloaded ({first})") from None


def adapter_folder_config(folder: str | Path, overrides: dict[str, Any] | None = None,
                          trust_remote_code: bool = False) -> FaqtuneConfig:
    """Settings of a pushed adapter: its faqtune.yaml (the run's settings) when present; the base comes from
    there if it can be loaded here (an alias, a hub id), else from adapter_config.json, as PEFT does.
    `trust_remote_code` is the caller's (the command line's), never faqtune.yaml's."""
    folder = Path(folder)
    yaml_path = folder / "faqtune.yaml"
    cfg = load_saved_settings(yaml_path if yaml_path.exists() else None, overrides, trust_remote_code)
    with named_damage(folder / "adapter_config.json", "adapter config"):
        named = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    local_missing = cfg.base_model.startswith((".", "/", "~")) and not Path(cfg.base_model).expanduser().exists()
    if named and (not yaml_path.exists() or local_missing):
        cfg.base_model = named
    return cfg


def safe_adapter_dir(adapter_dir: str | Path) -> Path:
    """An adapter folder checked before PEFT loads it: a config and safetensors weights (PEFT would fall back
    to a pickled adapter_model.bin, which can run code when loaded)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"{adapter_dir}: no adapter_config.json (did training finish?)")
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise ModelError(f"{adapter_dir}: no adapter_model.safetensors; faqtune loads adapters only from "
                         "safetensors, never from pickled weights such as adapter_model.bin")
    from safetensors import safe_open

    with named_damage(adapter_dir / "adapter_config.json", "adapter config"):  # damaged files: one line each
        if not isinstance(json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    with named_damage(adapter_dir / "adapter_model.safetensors", "adapter weights"):
        safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt")  # checks a truncated file too
    return adapter_dir


def load_run_tokenizer(tokenizer_dir: Path, base: str, trust_remote_code: bool = False):
    """A run's saved tokenizer (a damaged one is one line naming it), else the base's."""
    if not tokenizer_dir.exists():
        return load_tokenizer(base, trust_remote_code)
    with named_damage(tokenizer_dir, "tokenizer"):
        return load_tokenizer(str(tokenizer_dir), trust_remote_code)


@dataclass
class OpenedRun:
    """A run as a command names it, resolved: where its adapter and tokenizer are, its settings, its base."""

    root: Path  # the run directory, or a pushed adapter folder (adapter and tokenizer side by side)
    cfg: FaqtuneConfig
    base: str  # what the base loads from: a local folder (the embedded default's cache) or a hub id
    adapter_dir: Path
    tokenizer_dir: Path

    def has_adapter(self) -> bool:
        return is_adapter_folder(self.adapter_dir)

    def tokenizer(self):
        """The run's saved tokenizer (a damaged one is one line naming it), else the base's."""
        return load_run_tokenizer(self.tokenizer_dir, self.base, self.cfg.trust_remote_code)


def open_run(ident: str | Path, overrides: dict[str, Any] | None = None, trust_remote_code: bool = False,
             cfg: FaqtuneConfig | None = None) -> OpenedRun:
    """A run directory, a pushed adapter folder, or a Hub repo id (OWNER/NAME, downloaded first): its settings
    (+ `overrides`; `trust_remote_code` from the caller only, never from the files), base, adapter, tokenizer.
    Loads no weights."""
    root = Path(fetch_adapter(str(ident)))
    if is_adapter_folder(root) and RunDir(root.parent).adapter_dir == root and RunDir(root.parent).config_path.exists():
        print(f"note: {root} is the adapter of the run {root.parent}: reading the run (its settings, its FAQ "
              "index)", file=sys.stderr)  # alone, it answered without retrieval and the run's settings
        root = root.parent
    if is_adapter_folder(root):  # a pushed adapter (or its Hub download): settings from its faqtune.yaml
        cfg = cfg or adapter_folder_config(root, overrides, trust_remote_code)
        tokenizer_dir = root if (root / "tokenizer_config.json").exists() else root / "tokenizer"
        return OpenedRun(root, cfg, resolve_base(cfg.base_model), root, tokenizer_dir)
    run = RunDir(root)
    cfg = cfg or run.load_config(overrides, trust_remote_code)
    return OpenedRun(root, cfg, resolve_base(cfg.base_model), run.adapter_dir, run.tokenizer_dir)


def load_adapters(base: str, cfg: FaqtuneConfig, adapters: dict[str, Path]):
    """The base, quantized as trained, with each adapter loaded onto it under its name (PEFT's adapter
    names; the first is active); no adapters gives the bare base. Ready to generate."""
    model = load_base_model(base, cfg)
    if adapters:
        from peft import PeftModel

        (first, folder), *rest = adapters.items()
        with merge.adapter_fits(folder):
            model = PeftModel.from_pretrained(model, str(safe_adapter_dir(folder)), adapter_name=first)
        for name, folder in rest:
            with merge.adapter_fits(folder):
                model.load_adapter(str(safe_adapter_dir(folder)), adapter_name=name)
    model.eval()
    model.config.use_cache = True
    return model


def dequantized_weights(base: str, cfg: FaqtuneConfig) -> dict[str, torch.Tensor]:
    """The weights the adapter was trained against: the base quantized exactly as in training (same loader,
    same BitsAndBytesConfig), then dequantized to fp32. Keyed by state-dict name."""
    quantized = load_base_model(base, cfg)
    weights = merge.dequantize(quantized)
    del quantized
    return weights


def merge_adapter(run_dir: str | Path, base_weights: str = "dequantized", dtype: str = "fp32",
                  cfg: FaqtuneConfig | None = None, dequantized: dict[str, torch.Tensor] | None = None):
    """Base (full precision) + the run's adapter merged into plain weights; returns a plain transformers model.

    base_weights: `dequantized` merges into the NF4-dequantized weights the adapter was trained on (`dequantized`
    if given, else measured now), `original` into the base checkpoint's own weights. The merge itself runs in
    fp32, then casts to `dtype`.
    """
    from transformers import AutoModelForCausalLM

    run = open_run(run_dir, cfg=cfg)
    adapter_dir = safe_adapter_dir(run.adapter_dir)
    model = from_pretrained_or_explain(AutoModelForCausalLM, run.base, dtype=torch.float32, use_safetensors=True,
                                       trust_remote_code=run.cfg.trust_remote_code)
    weights = None
    if base_weights == "dequantized" and run.cfg.quantization.mode != "none":
        weights = dequantized if dequantized is not None else dequantized_weights(run.base, run.cfg)
    return merge.merge_into(model, adapter_dir, dtype, weights)


def load_for_inference(run_dir: str | Path, base_only: bool = False, cfg: FaqtuneConfig | None = None,
                       merged: str = "none"):
    """Base (quantized as trained) + the run's adapter, ready to generate; returns (model, tokenizer, cfg).

    `run_dir` may also be an adapter folder as `faqtune push` uploads it, or its Hub repo id. `merged` (fp32 |
    bf16 | auto) instead merges the adapter into the dequantized 4-bit weights in memory (the weights it was
    trained against: `faqtune merge`'s fidelity) for faster generation; `auto` merges on CPU when the merged
    model fits in a quarter of the free memory (see `merged_dtype`), else keeps the 4-bit base.
    """
    run = open_run(run_dir, cfg=cfg)
    tokenizer = run.tokenizer()  # first: the cheap load, so a damaged one is said before the weights load
    dtype = merged_dtype(merged, run.base) if not base_only else None
    if dtype is not None:
        return merge_adapter(run.root, "dequantized", dtype, cfg=run.cfg), tokenizer, run.cfg
    model = load_adapters(run.base, run.cfg, {} if base_only else {"default": run.adapter_dir})
    return model, tokenizer, run.cfg


def merged_dtype(merged: str, base: str) -> str | None:
    """The dtype to merge the adapter in for inference, or None to keep the 4-bit base + adapter.

    `auto`: on CPU only (a GPU runs the 4-bit kernels fast and has little memory to spare), in bf16 where this
    CPU computes it fast (measured), else fp32, when that model takes at most a quarter of the free memory."""
    if merged != "auto":  # one of its choices: validation.validate checked it at load
        return None if merged == "none" else merged
    if torch.cuda.is_available():
        return None
    dtype = "bf16" if cpu_bf16_is_fast() else "fp32"
    try:
        config = json.loads((Path(base) / "config.json").read_text())
        params = _parameter_count(config)
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unknown size: keep the 4-bit base
    return dtype if params * (2 if dtype == "bf16" else 4) <= free / 4 else None


def _parameter_count(config: dict) -> int:
    """A Llama-like decoder's parameter count from its config.json (embeddings, attention, MLP, head)."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    inter = config.get("intermediate_size", 4 * h)
    heads = config.get("num_attention_heads", 1)
    kv = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim", h // heads)
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    per_layer = attention + 3 * h * inter
    head = 0 if config.get("tie_word_embeddings", False) else vocab * h
    return vocab * h + layers * per_layer + head
