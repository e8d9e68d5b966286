"""No silent slow kernels: with fp32 compute (what `auto` picks on CPUs without native bf16, where bf16 matmuls
run ~120x slower), no operation of training or answering may touch a bf16 or fp16 tensor.

Every aten operation is intercepted (a TorchDispatchMode), so this holds on any CPU, not only on the
AVX2-only ones where the trap costs time. It found two: TRL's cast of QLoRA adapters to bf16
(trl/trainer/sft_trainer.py; huggingface/peft#2889), fixed by `models.cast_trainable`; and bitsandbytes'
bf16 inference kernel, used on any CPU that reports AVX512-BF16 even with fp32 compute (fp32 is chosen where
bf16 measured slow), turned off by `models.load_base_model`.
"""

from __future__ import annotations

import pytest

from faqtune.config import load_config

pytestmark = pytest.mark.pipeline


def test_fp32_training_and_answering_touch_no_half_precision(tiny_base, small_faq, tmp_path):
    from half_precision import AuditStep, HalfOps

    from faqtune.generate import Answerer
    from faqtune.loading import load_for_inference
    from faqtune.train import train

    run = tmp_path / "run"
    cfg = load_config(None, {"base_model": str(tiny_base), "data.path": str(small_faq), "output_dir": str(run),
                             "train.max_steps": 3, "train.eval_steps": 0, "lora.r": 4,
                             "quantization.compute_dtype": "fp32", "grounding.mode": "none"})
    audit = AuditStep()
    train(cfg, callbacks=(audit,))
    assert audit.audited
    assert not audit.mode.ops, f"training ran half-precision operations: {dict(audit.mode.ops)}"

    for merged in ("none", "fp32"):  # as trained (4-bit + adapter) and merged in memory, as `ask` does
        # fp32 compute: bitsandbytes' own bf16 CPU kernel (used wherever the CPU reports AVX512-BF16) stays off
        model, tokenizer, run_cfg = load_for_inference(run, merged=merged)
        bot = Answerer(model, tokenizer, run_cfg.generation, run_cfg.data.system_prompt)
        with HalfOps() as mode:
            bot.ask("How do I do thing number 3?")
            bot.ask_many(["How do I do thing number 1?", "thing 2?"])
        assert not mode.ops, f"answering (merged={merged}) ran half-precision operations: {dict(mode.ops)}"


def test_the_audit_sees_half_precision():
    """The detector itself: a bf16 matmul is counted (the audit above cannot pass by seeing nothing)."""
    import torch
    from half_precision import HalfOps

    with HalfOps() as mode:
        torch.randn(4, 4).to(torch.bfloat16) @ torch.randn(4, 4).to(torch.bfloat16)
    assert mode.ops["aten.mm.default"] == 1
