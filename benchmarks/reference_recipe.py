"""The original QLoRA FAQ guide's recipe, written from its published settings, as the baseline we measure against.

transformers `Trainer` + PEFT + bitsandbytes: NF4 *without* double quantization, bf16 compute dtype, LoRA
r=64 / alpha=16 / dropout=0.1 on PEFT's default target modules (q_proj, v_proj for Llama),
`pad_token = eos_token` with `DataCollatorForLanguageModeling(mlm=False)` (which masks every EOS, so the
model never learns to stop), the prompt `<human>: {question}\\n<assistant>: {answer}`, batch 1 x gradient
accumulation 4, lr 2e-4, cosine, warmup 5%, `paged_adamw_8bit`, 80 steps, gradient checkpointing on.
fp16 mixed precision is refused on CPU, so it is left off there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class RecipeResult:
    seconds: float
    steps: int
    real_tokens: int  # tokens trained on, padding excluded
    final_loss: float | None
    losses: list[float]


def guide_prompt(question: str, answer: str) -> str:
    return f"<human>: {question}\n<assistant>: {answer}"


def load_reference_model(base: str, compute_dtype: torch.dtype = torch.bfloat16):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                             bnb_4bit_compute_dtype=compute_dtype)
    kwargs = {"device_map": {"": 0}} if torch.cuda.is_available() else {}
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, dtype=compute_dtype, **kwargs)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def train_reference(model, tokenizer, texts: list[str] | None, out_dir: str, max_steps: int = 80,
                    token_rows: list[list[int]] | None = None, batch_size: int = 1, grad_accum: int = 4,
                    callbacks: list | None = None) -> RecipeResult:
    """Train with the guide's settings on `texts` (tokenized here, as the guide does) or pre-tokenized rows."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer.pad_token = tokenizer.eos_token
    if token_rows is None:
        token_rows = [tokenizer(t)["input_ids"] for t in texts]
    data = Dataset.from_list([{"input_ids": ids} for ids in token_rows])
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05, optim="paged_adamw_8bit",
        max_steps=max_steps, logging_steps=1, save_strategy="no", save_total_limit=3,
        fp16=on_gpu, use_cpu=not on_gpu, report_to="none", disable_tqdm=True,
        gradient_checkpointing=True, remove_unused_columns=False, seed=42,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=callbacks or [])
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    examples = max_steps * batch_size * grad_accum
    mean_len = sum(map(len, token_rows)) / len(token_rows)
    return RecipeResult(seconds, max_steps, int(examples * mean_len), losses[-1] if losses else None, losses)
