"""The one answer-token loss (`loss.answer_token_loss`): the LM head at answer positions only gives the same loss,
the same argmax and the same adapter gradients as the full logits over every token."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

from faqtune.config import load_config
from faqtune.prompting import IGNORE_INDEX, encode_conversation

if TYPE_CHECKING:
    import torch

# Every test runs torch, imported in the tests (with faqtune.loss and faqtune.models, which import it): `pytest -m
# unit` collects this module too, and loads no torch.
pytestmark = pytest.mark.pipeline


def test_answer_mask_keeps_the_positions_that_predict_a_trained_token():
    import torch

    from faqtune.loss import answer_mask

    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, 9]])
    assert answer_mask(labels).tolist() == [[False, True, True, False, True, False]]


def _full_logits_loss(model, labels, **inputs):
    """The reference: fp32 logits at every position, shifted, cross-entropy ignoring masked labels."""
    import torch

    logits = model(**inputs, use_cache=False).logits.float()  # (batch, seq, vocab)
    shift, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(shift, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    kept = targets != IGNORE_INDEX
    return total, shift[kept].argmax(-1), int(kept.sum())


def _batch(tokenizer, padding_free: bool) -> dict[str, torch.Tensor]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = []
    for i in range(3):
        conv = [{"role": "user", "content": f"Where is order {i}?"},
                {"role": "assistant", "content": "It ships in two days. " * (i + 1)}]
        enc = encode_conversation(tokenizer, conv, 512)
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.eos_token_id, padding_free=padding_free)(rows)
    return {k: v for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask", "position_ids")}


def _adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunked", [False, True], ids=["model's head", "chunked head"])
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_answer_positions_only_match_the_full_logits_loss_and_gradients(tiny_base, tiny_tokenizer, padding_free,
                                                                         chunked, monkeypatch):
    """On the 4-bit tiny Llama with a fresh LoRA adapter (as training builds it), fp32 compute; the chunked head
    in chunks of 7 answer tokens, so that the last one is partial."""
    import torch

    from faqtune import loss
    from faqtune.loss import answer_token_loss, fusable_head
    from faqtune.models import attach_lora, load_base_model

    cfg = load_config(None, {"base_model": str(tiny_base), "quantization.compute_dtype": "fp32", "lora.r": 4,
                             "lora.dropout": "0"})
    torch.manual_seed(0)
    model = attach_lora(load_base_model(str(tiny_base), cfg), cfg)
    with torch.no_grad():  # B starts at zero: give the adapter weights so that its gradients are not trivial
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.train()
    batch = _batch(tiny_tokenizer, padding_free)
    labels = batch.pop("labels")

    ref_total, ref_argmax, ref_tokens = _full_logits_loss(model, labels, **batch)
    (ref_total / ref_tokens).backward()
    ref_grads = _adapter_grads(model)
    model.zero_grad()

    monkeypatch.setattr(loss, "HEAD_CHUNK", 7)
    head = fusable_head(model) if chunked else None
    assert (head is not None) == chunked
    scored = answer_token_loss(model, labels, head=head, **batch)
    scored.mean().backward()
    grads = _adapter_grads(model)

    assert scored.tokens == ref_tokens > 20 and ref_tokens % 7
    if chunked:
        assert scored.outputs.logits is None  # applied here, not by the model
    else:
        assert scored.outputs.logits.shape[-2] == ref_tokens  # the LM head ran at the answer positions only
    assert torch.allclose(scored.total, ref_total, rtol=1e-5, atol=1e-5), (scored.total, ref_total)
    assert torch.equal(scored.predictions, ref_argmax)
    assert ref_grads.keys() == grads.keys() and len(grads) > 10
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-7), name


def test_a_sequence_without_answer_tokens_scores_zero(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    from faqtune.loss import answer_token_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        scored = answer_token_loss(model, torch.full((1, 5), IGNORE_INDEX), input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    assert scored.tokens == 0 and float(scored.total) == 0.0 and float(scored.mean()) == 0.0


def test_the_head_is_chunked_only_where_the_model_applies_it_plainly(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    from faqtune.loss import answer_token_loss, fusable_head

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(False)
    assert fusable_head(model) is head
    assert fusable_head(SimpleNamespace(module=model)) is head  # under DDP: the wrapped model's head
    head.weight.requires_grad_(True)  # a trained head (modules_to_save): it needs its gradient
    assert fusable_head(model) is None
    head.weight.requires_grad_(False)
    model.config.model_type = "gemma2"  # soft-caps its logits after the head
    assert fusable_head(model) is None
    model.config.model_type = "llama"

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5]])
    chunked = answer_token_loss(model, labels, head=head, input_ids=ids)
    plain = answer_token_loss(model, labels, input_ids=ids)
    assert head.forward.__func__ is torch.nn.Linear.forward  # the head is itself again after the call
    assert torch.allclose(chunked.total, plain.total, atol=1e-5) and chunked.tokens == 3
