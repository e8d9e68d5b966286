"""Training stage: setup -> fit -> save. QLoRA on a 4-bit base with TRL's SFTTrainer.

`setup` reads and splits the FAQ, tokenizes it with the one prompt format (answer-only labels), loads
the quantized base and attaches LoRA; `fit` runs the trainer (checkpoints, resume, metrics.jsonl,
TensorBoard, progress bar); `save` writes the PEFT adapter, tokenizer and summary to the run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from faqtune import checkpoints
from faqtune import data as data_mod
from faqtune.config import FaqtuneConfig, effective_epochs
from faqtune.data import general_instructions_path
from faqtune.errors import FaqtuneError, TrainingStopped
from faqtune.grounding import ground_splits
from faqtune.loss import answer_token_loss, fusable_head
from faqtune.memory import (
    PACK_MULTIPLE,
    RELEASE_EVERY,
    activation_bytes,
    available_memory,
    bound_heap,
    in_fresh_process,
    release_freed_memory,
    use_checkpointing,
)
from faqtune.models import (
    attach_lora,
    cast_trainable,
    load_base_model,
    load_tokenizer,
    resolve_adapter_dtype,
    resolve_base,
    resolve_compute_dtype,
    trainable_report,
)
from faqtune.prompting import IGNORE_INDEX, encode_conversation, ensure_chat_template, with_system
from faqtune.run import RunDir, share_as_umask
from faqtune.validation import parse_mix

log = logging.getLogger(__name__)


@dataclass
class TokenizedSplit:
    rows: list[dict[str, list[int]]]
    truncated: int = 0
    dropped: int = 0  # examples whose answer was cut away entirely by truncation

    @property
    def tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)


def tokenize_entries(tokenizer, entries: list[data_mod.FaqEntry], cfg: FaqtuneConfig) -> TokenizedSplit:
    out = TokenizedSplit([])
    for entry in entries:
        messages = with_system(entry.as_messages(), cfg.data.system_prompt)
        enc = encode_conversation(tokenizer, messages, cfg.data.max_seq_length)
        out.truncated += enc.truncated
        if all(label == IGNORE_INDEX for label in enc.labels):
            out.dropped += 1
            continue
        out.rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return out


def mix_entries(cfg: FaqtuneConfig, n_faq: int) -> list[data_mod.FaqEntry]:
    """General examples to mix in: SHARE of the final training set per `data.mix` entry (deterministic)."""
    specs = [parse_mix(s) for s in cfg.data.mix]
    total = sum(share for _, share in specs)
    rng = random.Random(cfg.data.seed)
    out: list[data_mod.FaqEntry] = []
    for path, share in specs:
        source = general_instructions_path() if path == "general" else Path(path)
        entries = data_mod.load_faq(source).entries
        want = round(n_faq * share / (1 - total))
        picked = [entries[i] for i in rng.sample(range(len(entries)), min(want, len(entries)))]
        while len(picked) < want:  # a small set is repeated rather than under-weighted
            picked.append(entries[rng.randrange(len(entries))])
        out += picked
    return out


def _say(msg: str) -> None:
    # Progress goes to stderr so that stdout stays clean for answers and piping.
    tqdm.write(msg, file=sys.stderr)


class MetricsCallback(TrainerCallback):
    """Appends every log (loss, lr, grad norm, eval loss) to metrics.jsonl, one JSON object a line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": time.time(), **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class ProgressCallback(TrainerCallback):
    """One progress bar: step/total, loss, lr and ETA (replaces transformers' dict-printing bar)."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        shown = {k: logs[k] for k in ("loss", "eval_loss") if k in logs}
        if "learning_rate" in logs:
            shown["lr"] = f"{logs['learning_rate']:.2e}"
        if shown:
            self.bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in shown.items()})

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ReleaseMemoryCallback(TrainerCallback):
    """On CPU, gives the heap's freed pages back every `every` optimizer steps (`memory.release_freed_memory`)."""

    def __init__(self, every: int = RELEASE_EVERY):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            release_freed_memory()


class FaqTrainer(checkpoints.SafeCheckpoints, SFTTrainer):
    """TRL's SFTTrainer whose loss projects only answer positions through the LM head (`loss.answer_token_loss`),
    in training a chunk at a time (`loss.fusable_head`; not under FSDP, whose head weight is sharded outside the
    forward).

    On CPU this is faster than TRL's chunked fused head, and the loss is the same (tested). Logged like TRL:
    `mean_token_accuracy` (this process's answer tokens); TRL's `entropy` and `num_tokens` are not computed.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        chunk = model.training and torch.is_grad_enabled() and not self.is_fsdp_enabled and not return_outputs
        scored = answer_token_loss(model, labels, head=fusable_head(model) if chunk else None, **inputs)
        count = num_items_in_batch if num_items_in_batch is not None else scored.tokens
        loss = scored.total / max(1, int(count))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients across ranks
        mode = "train" if model.training else "eval"
        # TRL logs its metrics from the private `_metrics` its own compute_loss fills; there is no public way to
        # add one from an overriding compute_loss (its accuracy: huggingface/trl#2597)
        self._metrics[mode]["mean_token_accuracy"].append(scored.correct / scored.tokens if scored.tokens else 0.0)
        return (loss, scored.outputs) if return_outputs else loss


def resolve_optimizer(name: str) -> str:
    """Paged optimizers page their states to CPU RAM under GPU memory pressure; on a CPU there is nothing to
    page, and bitsandbytes' 8-bit step costs ~0.3 s a step here (vs 0.015 s fused), so fall back, once, loudly."""
    if name.startswith("paged_") and not torch.cuda.is_available():
        _say(f"optimizer: {name} pages optimizer states off the GPU; on CPU using adamw_torch_fused instead "
             "(set train.optimizer=adamw_8bit for 8-bit states on CPU)")
        return "adamw_torch_fused"
    return name


def _training_args(cfg: FaqtuneConfig, run: RunDir, has_eval: bool, activations: int | None = None):
    t = cfg.train
    on_gpu = torch.cuda.is_available()
    compute = resolve_compute_dtype(cfg.quantization.compute_dtype)
    checkpointing = use_checkpointing(t.gradient_checkpointing, activations, available_memory())
    if checkpointing and t.gradient_checkpointing == "auto" and not on_gpu:
        _say(f"memory: gradient checkpointing on (a micro-batch's activations would take ~{activations / 2**30:.1f} "
             "GiB; --train.gradient_checkpointing false keeps them: ~1.2x faster steps, more memory)")
    optimizer = resolve_optimizer(t.optimizer)
    return SFTConfig(
        output_dir=str(run.checkpoints_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=max(1, t.batch_size),
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=effective_epochs(cfg),
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a share of the steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # faqtune rotates, after sealing the new checkpoint (checkpoints.SafeCheckpoints)
        eval_strategy="steps" if has_eval and t.eval_steps > 0 else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None,
        load_best_model_at_end=t.keep_best,
        metric_for_best_model="eval_loss" if t.keep_best else None,
        greater_is_better=False if t.keep_best else None,
        seed=t.seed,
        data_seed=t.seed,
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        bf16=compute == torch.bfloat16,
        fp16=on_gpu and compute == torch.float16,
        use_cpu=not on_gpu,
        report_to="none",
        disable_tqdm=True,
        max_length=None,  # sequences are truncated (and counted) by faqtune before the trainer sees them
        padding_free=t.packing,
        pad_to_multiple_of=PACK_MULTIPLE if t.packing and not on_gpu else None,  # kernel shapes repeat (memory.py)
        completion_only_loss=False,  # labels already mask everything but the answers
        dataset_num_proc=None,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        save_only_model=False,
        logging_nan_inf_filter=False,
    )


def train(cfg: FaqtuneConfig, resume: bool = False, callbacks: tuple[TrainerCallback, ...] = ()) -> dict[str, Any]:
    """Fine-tune per `cfg`; returns the summary written to the run directory.

    `callbacks` are transformers `TrainerCallback`s added to the trainer (probes, benchmarks, fault injection)."""
    run = RunDir(cfg.output_dir)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if not torch.cuda.is_available():
        bound_heap()  # CPU: the heap stays bounded over a long run (memory.py)
    last = checkpoints.resume_point(run.checkpoints_dir, _say) if resume else None
    if last is not None:  # the steps after the checkpoint are trained (and logged) again
        checkpoints.check_resume_settings(cfg, run.config_path)
        checkpoints.forget_after(run.metrics_path, checkpoints.checkpoint_step(last))
    data_path = cfg.data.path or str(data_mod.bundled_faq_path())
    faq = data_mod.load_faq(data_path, cfg.data.format, cfg.data.question_field, cfg.data.answer_field)
    for note in faq.notes:
        _say(note)
    train_entries, eval_entries = data_mod.split(faq.entries, cfg.data.eval_fraction, cfg.data.seed)
    if last is not None:  # before anything is written
        checkpoints.check_resume_split(run, data_path, train_entries, eval_entries)
    mixed = mix_entries(cfg, len(train_entries))
    checkpoints.check_run_dir(run, resume)  # before the base loads (a download, a first-use conversion)
    base = resolve_base(cfg.base_model)  # a base that cannot be found is refused before anything is written
    tokenizer = load_tokenizer(base, cfg.trust_remote_code)
    checkpoints.prepare_run_dir(cfg, run, resume)
    data_mod.write_jsonl(train_entries, run.train_split)
    data_mod.write_jsonl(eval_entries, run.eval_split)
    if mixed:
        data_mod.write_jsonl(mixed, run.mix_split)
        _say(f"data: mixing in {len(mixed)} general example(s) from {', '.join(cfg.data.mix)}")
    if ensure_chat_template(tokenizer):
        _say("the tokenizer has no chat template: using the guide's '<human>: / <assistant>:' format")
    setup_started = time.time()
    if cfg.grounding.mode == "retrieval":  # before the base is loaded: the child then runs beside imports alone
        train_entries, eval_entries = _ground(cfg, run, faq.entries, train_entries, eval_entries)
    grounding_seconds = time.time() - setup_started
    model = load_base_model(base, cfg)
    torch.manual_seed(cfg.train.seed)  # the LoRA init draws from torch's RNG: same seed, same adapter
    model = attach_lora(model, cfg)
    release_freed_memory()
    train_tok = tokenize_entries(tokenizer, train_entries + mixed, cfg)
    eval_tok = tokenize_entries(tokenizer, eval_entries, cfg)
    if not train_tok.rows:
        raise FaqtuneError(f"{data_path}: no training example left after truncation to "
                           f"data.max_seq_length={cfg.data.max_seq_length}")
    truncated = train_tok.truncated + eval_tok.truncated
    _say(f"data: {len(faq)} entries from {data_path} -> {len(train_tok.rows)} train / {len(eval_tok.rows)} eval"
         f" ({train_tok.tokens:,} train tokens)")
    if truncated:
        _say(f"data: {truncated} example(s) longer than data.max_seq_length={cfg.data.max_seq_length} truncated"
             + (f", {train_tok.dropped + eval_tok.dropped} dropped (no answer left)"
                if train_tok.dropped + eval_tok.dropped else ""))
    tokenizer.save_pretrained(run.tokenizer_dir)

    _say(trainable_report(model))
    trainer = build_trainer(cfg, run, model, tokenizer, train_tok, eval_tok, callbacks)

    started = time.time()
    if last is not None and checkpoints.is_final(last, cfg.train.max_steps, effective_epochs(cfg)):
        # transformers would train one step past the end; the run only lacks its adapter (crash after the end)
        _say(f"{last.name} is the end of training: writing the adapter from it")
        result = trainer.restore(last)
    else:
        result = _fit(trainer, run, last)
    elapsed = time.time() - started
    if eval_tok.rows:
        trainer.evaluate()
    return save(cfg, run, trainer, train_tok, result, elapsed, resumed_from=last, setup_seconds=grounding_seconds)


def _fit(trainer, run: RunDir, last: Path | None):
    """trainer.train, stopping cleanly (checkpoint, then TrainingStopped) on SIGINT/SIGTERM."""
    stop = checkpoints.GracefulStop()
    trainer.add_callback(stop)
    try:
        with checkpoints.stop_on_signals(stop):
            result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    finally:  # close the progress bar even on an error, so the message gets a line of its own
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback):
                callback.on_train_end(trainer.args, trainer.state, trainer.control)
    if stop.received is not None and trainer.state.global_step < trainer.state.max_steps:
        raise TrainingStopped(checkpoints.interrupted_message(stop, trainer.state, run.checkpoints_dir),
                              stop.exit_code)
    return result


def _ground(cfg: FaqtuneConfig, run: RunDir, faq: list[data_mod.FaqEntry], train_entries, eval_entries):
    """Index the whole FAQ in the run and put retrieved entries into the training prompts.

    In a child process (`grounding.ground_splits`): the embedder, LanceDB and their imports leave with it, so
    the training process never holds them (0.16 GB on the embedded default, benchmarks/memory_timeline.py)."""
    started = time.time()
    position = {id(e): i for i, e in enumerate(faq)}
    splits = [(split, [position[id(e)] for e in split]) for split in (train_entries, eval_entries)]
    main, first = True, contextlib.nullcontext()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # several processes: the main one indexes, the others read it
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # on CPU accelerate needs telling
        main, first = state.is_main_process, state.main_process_first()
    if main and cfg.grounding.embedder_epochs:  # minutes on a large FAQ: about 9 on 1,246 entries, 2 cores
        _say(f"grounding: tuning the embedder on the training questions' forms, then indexing {len(faq)} entries "
             "(--grounding.embedder_epochs 0 skips the tuning)")
    with first:
        threshold, grounded = in_fresh_process(ground_splits, run.index_dir, faq, splits, cfg, main)
    if main:
        _say(f"grounding: indexed {len(faq)} entries in {time.time() - started:.1f}s "
             f"(decline below similarity {threshold:.3f})")
    data_mod.write_jsonl(grounded[0], run.grounded_split)  # what the model saw
    return grounded[0], grounded[1]


def build_trainer(cfg: FaqtuneConfig, run: RunDir, model, tokenizer, train_tok: TokenizedSplit,
                  eval_tok: TokenizedSplit, callbacks: tuple[TrainerCallback, ...] = ()) -> FaqTrainer:
    """The trainer `train` fits: `cfg`'s training arguments (gradient checkpointing sized to the longest
    micro-batch of `train_tok`), the adapter cast to its resolved dtype, faqtune's callbacks (metrics.jsonl,
    the progress bar, TensorBoard), then `callbacks`.

    `model` is the base with LoRA attached (`models.attach_lora`); the splits are already tokenized, so a
    benchmark can time training on rows of its own."""
    from datasets import Dataset
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    longest = sorted((len(r["input_ids"]) for r in train_tok.rows), reverse=True)[:cfg.train.batch_size]
    tokens = sum(longest) if cfg.train.packing else len(longest) * max(longest, default=0)
    activations = activation_bytes(model.config, tokens, resolve_compute_dtype(cfg.quantization.compute_dtype))
    args = _training_args(cfg, run, has_eval=bool(eval_tok.rows), activations=activations)
    trainer = FaqTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_tok.rows),
        eval_dataset=Dataset.from_list(eval_tok.rows) if eval_tok.rows else None,
        processing_class=tokenizer,
    )
    # TRL casts QLoRA adapters to bf16 on every machine; train them in the resolved dtype instead
    cast_trainable(trainer.model, resolve_adapter_dtype(cfg.quantization))
    trainer.keep_checkpoints = cfg.train.save_total_limit
    trainer.remove_callback(PrinterCallback)  # our progress bar shows the logs; metrics.jsonl keeps them
    trainer.add_callback(MetricsCallback(run.metrics_path))
    trainer.add_callback(ProgressCallback())
    if not torch.cuda.is_available():
        trainer.add_callback(ReleaseMemoryCallback())
    if trainer.is_world_process_zero():
        trainer.add_callback(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run.tb_dir))))
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def _fsdp_adapter_state(trainer) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the adapter's tensors gathered from every process, as PEFT's file names them (process 0;
    None elsewhere and without FSDP). Every process must call it: gathering is a collective.

    PEFT's own save finds adapter tensors by module name, and FSDP's nested units put
    `_fsdp_wrapped_module.` inside those names: it wrote an empty adapter (measured on an H200, reproduced on
    CPU in tests/test_distributed.py). So the full state is gathered with accelerate and the LoRA tensors
    picked by their parameter names."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    full = trainer.accelerator.get_state_dict(trainer.model)
    name = f".{trainer.model.active_adapter}."
    return {k.replace(name, "."): v.detach().contiguous().cpu() for k, v in full.items() if "lora_" in k and name in k}


def _write_adapter(model, fsdp_state: dict[str, torch.Tensor] | None, folder: Path) -> None:
    """A plain PEFT adapter folder: adapter_config.json + adapter_model.safetensors (+ PEFT's README)."""
    if fsdp_state is None:
        model.save_pretrained(folder, safe_serialization=True)
        share_as_umask(folder)
        return
    from safetensors.torch import save_file

    if not fsdp_state:
        raise FaqtuneError("FSDP: no adapter tensors were gathered from the processes; the checkpoints keep the "
                           "sharded model state")
    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config[model.active_adapter].save_pretrained(folder)
    save_file(fsdp_state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    share_as_umask(folder)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)


def _trainable_dtype(model) -> torch.dtype | None:
    """The dtype the adapter trained in (its first trainable parameter's; all share it, see cast_trainable)."""
    return next((p.dtype for p in model.parameters() if p.requires_grad), None)


def save(cfg, run: RunDir, trainer, train_tok: TokenizedSplit, result, elapsed: float,
         resumed_from: Path | None = None, setup_seconds: float = 0.0) -> dict[str, Any]:
    """Write adapter/ (plain PEFT, safetensors) and summary.json; print the final summary.

    Every process calls it: under FSDP the adapter's shards are gathered first (a collective)."""
    fsdp_state = _fsdp_adapter_state(trainer)
    if not trainer.is_world_process_zero():
        return {}
    tmp = run.root / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    advice = f"; the checkpoints are intact: free some space and resume with `faqtune train --output {run.root} --resume`"
    with checkpoints.named_write_errors(run.adapter_dir, advice, cleanup=tmp):
        _write_adapter(trainer.model, fsdp_state, tmp)
    if run.adapter_dir.exists():
        shutil.rmtree(run.adapter_dir)
    os.replace(tmp, run.adapter_dir)
    state = trainer.state
    world = max(1, trainer.args.world_size)
    steps_run = state.global_step - (int(resumed_from.name.split("-")[-1]) if resumed_from else 0)
    examples = steps_run * cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world
    mean_len = train_tok.tokens / max(1, len(train_tok.rows))
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    summary = {
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 3),
        "train_seconds": round(elapsed, 2),
        "grounding_seconds": round(setup_seconds, 2),  # the index, its calibration and the grounded prompts
        "tokens_per_second": round(examples * mean_len / elapsed, 1) if elapsed > 0 else None,
        "final_loss": losses[-1] if losses else None,
        "mean_train_loss": result.training_loss if not math.isnan(result.training_loss) else None,
        "final_eval_loss": evals[-1] if evals else None,
        "train_examples": len(train_tok.rows),
        "compute_dtype": _dtype_name(resolve_compute_dtype(cfg.quantization.compute_dtype)),
        "adapter_dtype": _dtype_name(_trainable_dtype(trainer.model)),
        "norm_dtype": _dtype_name(trainer.model.get_input_embeddings().weight.dtype),
        "gradient_checkpointing": bool(trainer.args.activation_checkpointing),
        "adapter": str(run.adapter_dir),
    }
    run.summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    _say(
        f"done: {summary['steps']} steps in {elapsed:.1f}s, ~{summary['tokens_per_second']} tokens/s, "
        f"final loss {summary['final_loss']:.4f}" + (f", eval loss {evals[-1]:.4f}" if evals else "")
        + f"\nadapter saved to {run.adapter_dir}"
    )
    return summary
