"""The settings' rules: the allowed choices, one spelling of each (`normalise`), and every range (`validate`).

`validate` only checks: it collects every problem, each naming the key and, when `load_config` says so, where the
value was set (the YAML file or `override`), and raises them together in one :class:`ConfigError`. Both take a
`faqtune.config.FaqtuneConfig` (typed `Any` here: that module imports this one).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import reprlib
import types
from typing import Any

from faqtune.errors import ConfigError

MAX_BATCH = 2**16  # the most examples per micro-batch, and micro-batches per step
_SHORT = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 80, 80


def show(value: Any) -> str:
    """A bounded repr for messages (YAML aliases can make a value enormous)."""
    return _SHORT.repr(value)


def lookup(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


CHOICES = {
    "data.format": {"auto", "json", "jsonl", "csv"},
    "quantization.mode": {"4bit", "8bit", "none"},
    "quantization.quant_type": {"nf4", "fp4"},
    "quantization.compute_dtype": {"auto", "bf16", "fp16", "fp32"},
    "quantization.adapter_dtype": {"auto", "bf16", "fp32"},
    "quantization.norm_dtype": {"auto", "bf16", "fp32"},
    "lora.bias": {"none", "all", "lora_only"},
    "train.gradient_checkpointing": {"auto", "true", "false"},
    "grounding.mode": {"retrieval", "none"},
    "generation.merged": {"auto", "none", "fp32", "bf16"},
}


def normalise(cfg: Any) -> None:
    """Spell every choice as `validate` expects it: `NF4` -> `nf4` (the one change made to loaded values).

    A value that is no choice in any case is left as written, so that its error quotes what the user wrote."""
    for key, choices in CHOICES.items():
        section, _, leaf = key.rpartition(".")
        owner = lookup(cfg, section)
        value = getattr(owner, leaf)
        if isinstance(value, str) and value.lower() in choices:
            setattr(owner, leaf, value.lower())


def validate(cfg: Any, sources: dict[str, str] | None = None) -> None:
    """Raise one ConfigError listing every invalid value; checks only, never changes `cfg`.

    Choices are compared as `normalise` spells them (`load_config` normalises, then validates). `sources` maps a
    dotted key to where its value was set (a file's path, `override`): a problem starts with where its keys were set
    (nothing for defaults)."""
    problems: list[str] = []
    sources = sources or {}

    def fail(message: str, *keys: str) -> None:
        where = ", ".join(dict.fromkeys(sources[k] for k in keys if k in sources))
        problems.append(f"{where}: {message}" if where else message)

    def need(ok: bool, key: str, rule: str, value: Any) -> None:
        if not ok:
            fail(f"`{key}` must be {rule}, got {show(value)}", key)

    for key, choices in CHOICES.items():
        value = lookup(cfg, key)
        need(value in choices, key, "one of " + ", ".join(sorted(choices)), value)
    for key in ("base_model", "output_dir", "grounding.embedder"):  # "" or blanks: not a model, not a folder
        need(bool(lookup(cfg, key).strip()), key, "set (a name or a path)", lookup(cfg, key))
    need(0 <= cfg.data.eval_fraction < 1, "data.eval_fraction", "in [0, 1)", cfg.data.eval_fraction)
    need(cfg.data.max_seq_length >= 16, "data.max_seq_length", ">= 16", cfg.data.max_seq_length)
    need(cfg.lora.r > 0, "lora.r", "> 0", cfg.lora.r)
    need(cfg.lora.alpha > 0, "lora.alpha", "> 0", cfg.lora.alpha)
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", "in [0, 1)", cfg.lora.dropout)
    tm = cfg.lora.target_modules
    need(
        tm == "all-linear" or (isinstance(tm, list) and tm and all(isinstance(m, str) for m in tm)),
        "lora.target_modules", "'all-linear' or a non-empty list of module names", tm,
    )
    t = cfg.train
    need(t.learning_rate > 0, "train.learning_rate", "> 0", t.learning_rate)
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "in [0, 1)", t.warmup_ratio)
    # upper bounds: torch's data loader fails on a batch past sys.maxsize with a traceback; no real run nears them
    need(1 <= t.batch_size <= MAX_BATCH, "train.batch_size", f"in [1, {MAX_BATCH}]", t.batch_size)
    need(1 <= t.gradient_accumulation_steps <= MAX_BATCH, "train.gradient_accumulation_steps", f"in [1, {MAX_BATCH}]",
         t.gradient_accumulation_steps)
    need(t.epochs is None or t.epochs > 0 or t.max_steps > 0, "train.epochs", "> 0 when train.max_steps is not set",
         t.epochs)
    for key, names in _transformers_names(t).items():
        value = lookup(cfg, key)
        close = difflib.get_close_matches(str(value).lower(), names, n=3, cutoff=0.5)
        need(value in names, key, f"one of transformers' {len(names)} names" + (
            f" (closest: {', '.join(close)})" if close else f" ({', '.join(sorted(names)[:6])}, ...)"), value)
        if value in names:
            why = _cannot_run(key, value)
            need(why is None, key, f"one that can run here ({why})", value)
    need(t.logging_steps >= 1, "train.logging_steps", ">= 1", t.logging_steps)
    need(t.eval_steps >= 0, "train.eval_steps", ">= 0", t.eval_steps)
    if t.keep_best and (t.eval_steps == 0 or t.save_steps % max(1, t.eval_steps) or cfg.data.eval_fraction == 0):
        fail("`train.keep_best` needs `data.eval_fraction` > 0, `train.eval_steps` > 0 and "
             f"`train.save_steps` a multiple of it, got eval_steps={t.eval_steps}, "
             f"save_steps={t.save_steps}, eval_fraction={cfg.data.eval_fraction}",
             "train.keep_best", "train.eval_steps", "train.save_steps", "data.eval_fraction")
    shares = []
    for spec in cfg.data.mix:
        try:
            shares.append(parse_mix(spec)[1])
        except ValueError as e:
            fail(str(e), "data.mix")
    if sum(shares) >= 1:
        fail(f"`data.mix` shares must add up to less than 1, got {cfg.data.mix}", "data.mix")
    need(t.save_steps >= 1, "train.save_steps", ">= 1", t.save_steps)
    need(t.save_total_limit >= 1, "train.save_total_limit", ">= 1", t.save_total_limit)
    need(t.max_grad_norm >= 0, "train.max_grad_norm", ">= 0", t.max_grad_norm)
    need(t.num_threads >= 0, "train.num_threads", ">= 0", t.num_threads)
    g = cfg.generation
    need(g.max_new_tokens >= 1, "generation.max_new_tokens", ">= 1", g.max_new_tokens)
    need(g.temperature >= 0, "generation.temperature", ">= 0", g.temperature)
    need(0 < g.top_p <= 1, "generation.top_p", "in (0, 1]", g.top_p)
    need(g.top_k >= 0, "generation.top_k", ">= 0", g.top_k)
    need(g.repetition_penalty > 0, "generation.repetition_penalty", "> 0", g.repetition_penalty)
    need(g.num_return_sequences >= 1, "generation.num_return_sequences", ">= 1", g.num_return_sequences)
    need(g.prompt_lookup >= 0, "generation.prompt_lookup", ">= 0", g.prompt_lookup)
    if g.num_return_sequences > 1 and g.temperature == 0:
        fail("`generation.num_return_sequences` > 1 needs sampling: set `generation.temperature` > 0",
             "generation.num_return_sequences", "generation.temperature")
    gr = cfg.grounding
    need(1 <= gr.top_k <= 20, "grounding.top_k", "in [1, 20]", gr.top_k)
    need(0 <= gr.related <= 10, "grounding.related", "in [0, 10]", gr.related)
    need(0 <= gr.embedder_epochs <= 20, "grounding.embedder_epochs", "in [0, 20]", gr.embedder_epochs)
    need(0 <= gr.embedder_mix <= 1, "grounding.embedder_mix", "in [0, 1]", gr.embedder_mix)
    need(0 <= gr.question_weight <= 1, "grounding.question_weight", "in [0, 1]", gr.question_weight)
    need(0 <= gr.joint_weight <= 1, "grounding.joint_weight", "in [0, 1]", gr.joint_weight)
    need(0 <= gr.absent_share < 1, "grounding.absent_share", "in [0, 1)", gr.absent_share)
    need(0 <= gr.noisy_share <= 1, "grounding.noisy_share", "in [0, 1]", gr.noisy_share)
    need(1 <= gr.questions <= 10, "grounding.questions", "in [1, 10]", gr.questions)
    need(gr.retrieval_prior >= 0, "grounding.retrieval_prior", ">= 0", gr.retrieval_prior)
    need(gr.threshold is None or -1 <= gr.threshold <= 1, "grounding.threshold", "in [-1, 1] (a cosine)",
         gr.threshold)
    need(bool(gr.decline_message.strip()), "grounding.decline_message", "non-empty", gr.decline_message)
    if problems:
        raise ConfigError(problems)


def _transformers_names(train: Any) -> dict[str, set[str]]:
    """The names transformers accepts for `lr_scheduler` and `optimizer`, for each not at its default (importing
    transformers takes seconds; a default needs no check)."""
    defaults, out = type(train)(), {}
    if train.lr_scheduler != defaults.lr_scheduler:
        from transformers.trainer_utils import SchedulerType

        out["train.lr_scheduler"] = {s.value for s in SchedulerType}
    if train.optimizer != defaults.optimizer:
        from transformers.training_args import OptimizerNames

        out["train.optimizer"] = {o.value for o in OptimizerNames}
    return out


def _cannot_run(key: str, name: str) -> str | None:
    """Why transformers would fail at the first step with this scheduler or optimizer name, or None: a scheduler
    that needs arguments faqtune does not pass (min_lr, num_decay_steps), an optimizer whose package is missing.
    Built once on a one-parameter stand-in, as the trainer would."""
    import torch

    try:
        if key == "train.lr_scheduler":
            from transformers.optimization import get_scheduler

            get_scheduler(name, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), num_warmup_steps=1,
                          num_training_steps=2)
        else:  # TrainingArguments' defaults, not TrainingArguments: it would set up accelerate (a process group)
            from transformers import Trainer, TrainingArguments

            defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                        for f in dataclasses.fields(TrainingArguments)
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
            args = types.SimpleNamespace(**{**defaults, "optim": name})
            Trainer.get_optimizer_cls_and_kwargs(args, torch.nn.Linear(1, 1))
    except (ImportError, ValueError, TypeError, RuntimeError) as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return None


def parse_mix(spec: str) -> tuple[str, float]:
    """'FILE[:SHARE]' -> (FILE, SHARE); SHARE defaults to 0.1 and must be in (0, 1)."""
    path, sep, share = spec.rpartition(":")
    if not sep or not re.fullmatch(r"\s*[+-]?([0-9]*\.?[0-9]+([eE][+-]?[0-9]+)?|inf|nan)\s*", share, re.I):
        path, share = spec, "0.1"  # ASCII digits only ('²' is a digit too); 'C:\\x.jsonl' is a path
    value = float(share)
    if not path or not 0 < value < 1:
        raise ValueError(f"`data.mix` entries must be FILE[:SHARE] with 0 < SHARE < 1, got {show(spec)}")
    return path, value


def positive_int_arg(text: str) -> int:
    """A command-line whole number >= 1 (argparse `type`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def finite_arg(text: str) -> float:
    """A command-line finite number (argparse `type`): nan compares false with everything (a forgetting threshold of
    nan never flagged, so --fail-on-forgetting could not fail)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value
