"""Typed configuration: one dataclass per concern, loaded from YAML with CLI overrides.

Every field's help text lives in its ``metadata`` and nowhere else. ``load_config`` reads the values and
notes where each was set; the rules they must meet are in :mod:`faqtune.validation`, applied once at load.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from faqtune.errors import ConfigError
from faqtune.validation import CHOICES, normalise, parse_mix, show, validate


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class DataConfig:
    path: str | None = _f(None, "FAQ file (JSON, JSONL, CSV); default: the bundled e-commerce FAQ")
    format: str = _f("auto", "auto | json | jsonl | csv")
    question_field: str | None = _f(None, "column/key holding the question (default: question, case-insensitive)")
    answer_field: str | None = _f(None, "column/key holding the answer (default: answer, case-insensitive)")
    eval_fraction: float = _f(0.1, "share of entries held out for evaluation (0 keeps all for training)")
    seed: int = _f(42, "seed of the train/eval split")
    system_prompt: str | None = _f(None, "system prompt put before every conversation (train and inference)")
    max_seq_length: int = _f(512, "longest tokenized example; longer ones are truncated and counted")
    mix: list[str] = _f(["general:0.2"], "general instruction data mixed into training against forgetting, as "
                                         "FILE[:SHARE] (SHARE of the training examples, default 0.1); 'general' is "
                                         "the bundled set; \"\" mixes none (measured: general-text perplexity "
                                         "x1.12 instead of x1.45 at the same held-out accuracy)")


@dataclass
class QuantizationConfig:
    mode: str = _f("4bit", "4bit | 8bit | none")
    quant_type: str = _f("nf4", "4-bit data type: nf4 | fp4")
    double_quant: bool = _f(True, "quantize the quantization constants too (~0.37 bits/param saved)")
    compute_dtype: str = _f("auto", "auto (bf16 where the hardware does bf16 natively, else fp32) | bf16 | fp16 | fp32")
    adapter_dtype: str = _f(
        "auto", "dtype of the trainable LoRA weights: auto (the compute dtype; fp32 under fp16 mixed precision) | "
                "bf16 | fp32 (TRL would cast them to bf16 on every machine, ~4x slower where bf16 is emulated)"
    )
    norm_dtype: str = _f(
        "auto", "dtype of the frozen weights left unquantized (embeddings, LM head, norms) while training: auto "
                "(the compute dtype, as answering uses them; fp32 under fp16) | bf16 | fp32 (PEFT's upcast: "
                "+0.19 GB peak for the embedded default on a bf16 CPU; under FSDP the storage dtype, always)"
    )


@dataclass
class LoraConfig:
    r: int = _f(64, "LoRA rank")
    alpha: int = _f(16, "LoRA alpha (scale = alpha / r)")
    dropout: float = _f(0.0, "dropout on the LoRA input (the guide: 0.1; measured: 0 keeps the held-out accuracy and "
                             "the forgetting, and makes gradient checkpointing cheaper on CPU: 1.24x the step time, not 1.30x)")
    bias: str = _f("none", "none | all | lora_only")
    target_modules: list[str] | str = _f("all-linear", "modules to adapt: 'all-linear' (QLoRA paper) or a list")


@dataclass
class TrainConfig:
    learning_rate: float = _f(4e-3, "peak learning rate (the guide's 2e-4 learns too slowly at alpha/r=0.25)")
    lr_scheduler: str = _f("cosine", "transformers scheduler name: cosine | linear | constant | ...")
    warmup_ratio: float = _f(0.05, "share of the steps spent warming up the learning rate")
    batch_size: int = _f(4, "examples per device per micro-batch (packed into one sequence when packing)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    epochs: float | None = _f(None, "passes over the training data (ignored when max_steps > 0); default: 10 for "
                                    "pure fine-tuning, 2 with grounding (copying from shown entries is learnt sooner; measured: 3 forgot "
                                    "more, general-text perplexity x1.12-1.15 against x0.95, at the same accuracy)")
    max_steps: int = _f(-1, "optimizer steps; > 0 overrides epochs")
    optimizer: str = _f("paged_adamw_8bit", "transformers optim name, e.g. paged_adamw_8bit | adamw_torch")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(0.3, "gradient clipping (QLoRA paper: 0.3)")
    gradient_checkpointing: str = _f(
        "auto", "recompute activations to save memory: true | false | auto (on for GPUs; on CPU on when a "
                "micro-batch's activations would pass 512 MiB or a quarter of the free memory, as grounded ones do)"
    )
    packing: bool = _f(True, "padding-free batches: a micro-batch is one sequence with per-example positions")
    logging_steps: int = _f(1, "log every N optimizer steps")
    eval_steps: int = _f(20, "held-out loss every N optimizer steps (0: only at the end)")
    keep_best: bool = _f(False, "end with the checkpoint of lowest held-out loss (needs eval_steps, save_steps its multiple)")
    save_steps: int = _f(50, "checkpoint every N optimizer steps")
    save_total_limit: int = _f(3, "checkpoints kept")
    seed: int = _f(42, "training seed")
    num_threads: int = _f(0, "CPU threads for torch (0: leave torch's default)")


GROUNDED_EPOCHS = 2.0  # benchmarks/README.md, "What the grounded fine-tune forgets": two seeds


def effective_epochs(cfg: Any) -> float:
    """`train.epochs`, or its default for the grounding mode."""
    if cfg.train.epochs is not None:
        return cfg.train.epochs
    return GROUNDED_EPOCHS / cfg.grounding.questions if cfg.grounding.mode == "retrieval" else 10.0


@dataclass
class GenerationConfig:
    max_new_tokens: int = _f(128, "longest answer in tokens")
    temperature: float = _f(0.0, "0 = greedy (reproducible); > 0 samples")
    top_p: float = _f(1.0, "nucleus sampling mass (when sampling)")
    top_k: int = _f(50, "top-k sampling (when sampling)")
    repetition_penalty: float = _f(1.0, "> 1 discourages repeats")
    num_return_sequences: int = _f(1, "answers per question (> 1 needs sampling)")
    prompt_lookup: int = _f(10, "one greedy answer at a time: draft up to N tokens by copying from the prompt "
                                "(prompt-lookup decoding; the answer is unchanged, grounded answers copy their entry); "
                                "0 = off")
    merged: str = _f("auto", "ask/chat/demo: merge the adapter into the dequantized base in memory for faster "
                             "answers: auto (on CPU, when it fits) | none (4-bit as trained) | fp32 | bf16")


DECLINE_MESSAGE = ("I'm sorry, I can't find that in our FAQ, so I can't answer it reliably. "
                   "Please contact our support team.")


@dataclass
class GroundingConfig:
    mode: str = _f("retrieval", "retrieval (answer from the top FAQ entries, cite them, decline below the threshold) "
                                "| none (the guide's pure fine-tuning)")
    embedder: str = _f("all-MiniLM-L6-v2", "sentence-embedding model: embedded alias, sentence-transformers id, folder")
    embedder_epochs: int = _f(1, "epochs tuning the embedder on the FAQ's own question forms as the index is built "
                                 "(0: the embedder as shipped; measured with joint vectors, 1 against 0: held-out "
                                 "top 1 under the threshold +7 points on the bundled FAQ's rephrasings, +5 on the "
                                 "bank FAQ's, the shared FAQ's unchanged; 14 s on 88 entries, 9 min on 1,246)")
    embedder_mix: float = _f(0.75, "share of the tuned embedder in the one indexed (the rest: the original's "
                                   "weights, which keep its robustness; 1: tuned alone)")
    question_weight: float = _f(0.5, "the question's share of an entry's retrieval score, fixed as the index is built "
                                     "(measured: 0.8 +17 points on the bank FAQ's long answers, worse on e-commerce)")
    joint_weight: float = _f(0.6, "of the score's rest (1 - question_weight), the share of the cosine to question "
                                  "and answer embedded as one text, the answer alone getting the remainder; fixed "
                                  "as the index is built (measured against 0: +15 points on the bank FAQ)")
    top_k: int = _f(1, "FAQ entries shown to the model with each question (measured: 1 answers more faithfully "
                          "than 3 with the 135M default, which mixes entries up)")
    absent_share: float = _f(0.2, "share of training examples whose right entry is withheld (target: a decline)")
    noisy_share: float = _f(0.5, "share of training questions rewritten as keywords / typos / lower case")
    hybrid: bool = _f(False, "fuse LanceDB full-text ranking with the vector ranking (measured worse on rephrasings)")
    related: int = _f(2, "related FAQ questions offered with an answer (entries within 0.05 of the top score) or a "
                         "decline (up to 0.05 under the threshold); 0: none (measured: right entry reached +4-22 points)")
    threshold: float | None = _f(None, "decline below this top-1 similarity (default: calibrated at training time)")
    fallback: bool = _f(True, "when the model declines a question retrieval found in scope, answer with the top "
                              "entry verbatim (cited as such)")
    decline_message: str = _f(DECLINE_MESSAGE, "what the bot says when no FAQ entry fits")
    choice: bool = _f(False, "train and answer with a scored choice step: the target opens with the answering "
                             "entry's number ([1]..[k], [0] = decline); at inference one forward pass scores the "
                             "choices and the chosen entry is answered verbatim (top_k <= 9; not measured better yet)")
    choice_only: bool = _f(False, "with `choice`: train the choice number alone, not the answer after it (the "
                                  "answer is returned verbatim anyway; measured: general-text perplexity x6.0)")
    questions: int = _f(1, "training examples per FAQ entry, each asking it another way (the question, a noisy "
                           "spelling, the answer's key words, ...) with the entries retrieved for that wording; "
                           "the default epochs are divided by it, so training costs the same")
    history: bool = _f(False, "show the model the conversation's earlier turns with the entries (off: they only "
                              "help find the entries; measured: shown, the 135M default repeats the previous answer "
                              "instead of reading the entry)")
    retrieval_prior: float = _f(1.0, "with `choice`: weight of retrieval's similarities when the model picks among "
                                     "the shown entries (0: the model alone; the decline is the model's alone)")


@dataclass
class FaqtuneConfig:
    base_model: str = _f("smollm2-135m", "alias, local HF folder or hub id of the base model")
    output_dir: str = _f("runs/faqtune", "run directory (adapter, config, metrics, checkpoints)")
    trust_remote_code: bool = _f(False, "let the base model run its own Python files (train; other commands take "
                                        "--trust-remote-code: a run's saved settings never enable it)")
    data: DataConfig = field(default_factory=DataConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def make_paths_absolute(self) -> None:
        """The FAQ's and the mixed-in files' paths made absolute (the `general` alias as it is)."""
        if self.data.path:
            self.data.path = str(Path(self.data.path).resolve())
        mix = [parse_mix(spec) for spec in self.data.mix]
        self.data.mix = [f"{p if p == 'general' else Path(p).resolve()}:{share}" for p, share in mix]

    def save(self, path: str | Path, header: str = "") -> None:
        Path(path).write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def field_help() -> dict[str, tuple[Any, str]]:
    """Every dotted key with its default and help text, for `--help` and docs."""
    out: dict[str, tuple[Any, str]] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = (value, f.metadata.get("help", ""))

    walk(FaqtuneConfig(), "")
    return out


_SYNONYMS = {"rank": "r", "lr": "learning_rate", "epoch": "epochs", "steps": "max_steps", "model": "base_model",
             "base": "base_model", "output": "output_dir", "dropout_rate": "dropout"}


def suggest(name: str, siblings: list[str] | None = None) -> str:
    """' (did you mean `x`?)' for a mistyped dotted key, or ''. `siblings`: the valid names at its level."""
    keys = list(field_help())
    section, _, leaf = name.rpartition(".")
    if siblings is None:
        siblings = sorted({k[len(section) + 1:].split(".")[0] for k in keys if k.startswith(section + ".")}
                          if section else {k.split(".")[0] for k in keys})
    close = difflib.get_close_matches(_SYNONYMS.get(leaf, leaf), siblings, n=1, cutoff=0.5)
    if close:
        return f" (did you mean `{section + '.' if section else ''}{close[0]}`?)"
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the field's type; raise ValueError with a clear message."""
    hint = annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in {"null", "none", "~"} and type(None) in args:
            return None
        if isinstance(value, str) and str in args and "," not in value and (list not in map(typing.get_origin, args)
                                                                           or value == "all-linear"):
            return value
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"`{key}`: unsupported value {show(value)}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise ValueError(f"`{key}` must be a list of strings, got {show(value)}")
        return [str(v) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "1", "on"}:
            return True
        if isinstance(value, str) and value.lower() in {"false", "no", "0", "off"}:
            return False
        raise ValueError(f"`{key}` must be true or false, got {show(value)}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"`{key}` must be an integer, got {show(value)}")
        if isinstance(value, int):
            return value
        try:
            if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
                return int(value)
            as_float = float(value)
        except (TypeError, ValueError, OverflowError):  # not a number, or too many digits
            raise ValueError(f"`{key}` must be an integer, got {show(value)}") from None
        if not as_float.is_integer():
            raise ValueError(f"`{key}` must be an integer, got {show(value)}")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"`{key}` must be a number, got {show(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"`{key}` must be a number, got {show(value)}") from None
        if not math.isfinite(number):
            raise ValueError(f"`{key}` must be a finite number, got {show(value)}")
        return number
    if hint is str:
        if value is None:
            raise ValueError(f"`{key}` must be set (got an empty value)")
        if isinstance(value, bool) and "true" in CHOICES.get(key, ()):  # gradient_checkpointing: true
            return "true" if value else "false"
        if isinstance(value, (bool, int, float)):  # YAML's reading of an unquoted yes, 0755 or 1.50: str() of it
            raise ValueError(f"`{key}` must be text, got {show(value)}: YAML reads an unquoted yes/no/on/off or "
                             "number as such (yes is true, 0755 is 493, 1.50 is 1.5); quote it")
        if isinstance(value, (dict, list)):
            raise ValueError(f"`{key}` must be a string, got {show(value)}")
        return str(value)
    raise ValueError(f"`{key}`: unsupported type {hint!r}")


def _apply(cfg: Any, values: dict[str, Any], prefix: str, problems: list[str], source: str,
           sources: dict[str, str]) -> None:
    """Set `values` on `cfg`, noting in `sources` where each dotted key was set."""
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            hint = suggest(dotted, names)
            problems.append(f"{source}: unknown key `{dotted}`{hint}")
            continue
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                problems.append(f"{source}: `{dotted}` must be a mapping, got {show(value)}")
                continue
            _apply(current, value, dotted + ".", problems, source, sources)
            continue
        try:
            setattr(cfg, key, _coerce(value, hints[key], dotted))
            sources[dotted] = source
        except ValueError as e:
            problems.append(f"{source}: {e}")


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError([f"`{key}` conflicts with another override"])
        node[leaf] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag != "tag:yaml.org,2002:str":  # merge keys (<<), numbers: left to PyYAML
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"`{key_node.value}` is set twice",
                                                        key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FaqtuneConfig:
    """Defaults <- YAML file <- overrides (dotted keys), normalised once, then validated once; every problem
    reported at once, each naming where its value was set."""
    cfg = FaqtuneConfig()
    problems: list[str] = []
    sources: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except FileNotFoundError:
            raise ConfigError([f"{path}: no such config file"]) from None
        except IsADirectoryError:
            raise ConfigError([f"{path}: is a directory, expected a YAML config file"]) from None
        except OSError as e:
            raise ConfigError([f"{path}: cannot be read ({e.strerror})"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"{path}: not UTF-8 text"]) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError([f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})"]) from None
        except RecursionError:
            raise ConfigError([f"{path}: invalid YAML (nested too deeply)"]) from None
        except ValueError as e:  # PyYAML's int() of a number with more than 4300 digits
            raise ConfigError([f"{path}: invalid YAML ({str(e).split(';')[0]})"]) from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of settings, got {type(raw).__name__}"])
        _apply(cfg, raw, "", problems, str(path), sources)
    if overrides:
        _apply(cfg, _nest(overrides), "", problems, "override", sources)
    normalise(cfg)
    try:
        validate(cfg, sources)  # values that failed to parse kept their defaults, so this still checks the rest
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return cfg
