"""The answer-token loss: next-token cross-entropy over the trained (answer) tokens only.

Training (`train.FaqTrainer`), evaluation's answer loss and the merge's fidelity check all call
`answer_token_loss`. Position t predicts token t+1, so only positions whose next token is trained reach the
LM head: transformers' `logits_to_keep` takes a boolean (batch, seq) mask and projects just those hidden states
(`slice_logits_to_keep` in transformers/modeling_utils.py; PEFT's LoRA forward passes it through). The logits
are then (answer tokens, vocab) instead of (batch, seq, vocab): on a packed grounded micro-batch of the
embedded default (4 x ~160 tokens, ~1/4 of them answer tokens, vocab 49,152) the fp32 logits, their
log-softmax and their gradient shrink ~4x.

Training goes one step further (`head=fusable_head(model)`): the model returns the hidden states at those
positions (its head is skipped for that call) and `_ChunkedHeadLoss` projects them a chunk of tokens at a time,
keeping each chunk's loss and its gradient with respect to the hidden states only. The (tokens, vocab) logits,
their log-softmax, their gradient and autocast's bf16 copy of the head weight never exist whole. This is the
"fused linear cross-entropy" of Liger Kernel and Unsloth (https://github.com/linkedin/Liger-Kernel), for a
frozen head, in plain torch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from faqtune.prompting import IGNORE_INDEX


@dataclass
class AnswerLoss:
    total: torch.Tensor  # summed negative log-likelihood of the answer tokens (differentiable)
    targets: torch.Tensor  # (answer tokens,) the trained next tokens
    predictions: torch.Tensor  # (answer tokens,) the model's argmax at each of those positions
    outputs: Any  # the model's output (its `logits` are the kept positions only)

    @property
    def tokens(self) -> int:
        return int(self.targets.numel())

    @property
    def correct(self) -> int:
        return int((self.predictions == self.targets).sum())

    def mean(self) -> torch.Tensor:
        """Mean loss per answer token (0 when there is none)."""
        return self.total / max(1, self.tokens)


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: True at position t when the token at t+1 is trained (its label is not ignored)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def answer_token_loss(model, labels: torch.Tensor, head: torch.nn.Linear | None = None, **inputs: Any) -> AnswerLoss:
    """Run `model` on `inputs` (input_ids, attention_mask / position_ids, ...) and score the answer tokens of
    `labels` ((batch, seq), IGNORE_INDEX elsewhere, unshifted as in the dataset).

    With `head` (the model's own output layer, from `fusable_head`) the head is applied here, chunk by chunk
    (`_ChunkedHeadLoss`), and the returned `outputs.logits` is None."""
    keep = answer_mask(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    if head is not None:
        with _skipped(head):
            outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
        hidden = outputs.logits.reshape(-1, outputs.logits.shape[-1])  # (answer tokens, hidden size)
        outputs.logits = None
        total, predictions = _ChunkedHeadLoss.apply(hidden, head.weight, targets, HEAD_CHUNK)
        return AnswerLoss(total, targets, predictions, outputs)
    outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
    logits = outputs.logits.reshape(-1, outputs.logits.shape[-1]).float()  # (answer tokens, vocab)
    total = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    with torch.no_grad():
        predictions = logits.argmax(-1)
    return AnswerLoss(total, targets, predictions, outputs)


# Model types whose causal-LM forward returns `lm_head(hidden states)` as the logits, nothing applied after it
# (no soft-capping or logit scaling, as Gemma 2 and Granite apply): skipping the head there yields the hidden states.
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# Answer tokens projected at a time by `_ChunkedHeadLoss`: a chunk's fp32 logits are HEAD_CHUNK x vocab x 4 bytes
# (25 MB for the embedded default's 49,152 tokens).
HEAD_CHUNK = 128


def fusable_head(model) -> torch.nn.Linear | None:
    """The output layer of `model` (a PEFT, DDP or plain causal LM) where `answer_token_loss` may apply it
    itself: a frozen bias-free `nn.Linear` of a PLAIN_HEAD_MODELS model; else None (a trained or LoRA-wrapped
    head, another architecture), and the model's own head is used."""
    inner = getattr(model, "module", model)  # DDP
    config = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS or type(head) is not torch.nn.Linear:
        return None
    return head if head.bias is None and not head.weight.requires_grad else None


@contextmanager
def _skipped(head: torch.nn.Module):
    """`head` passes its input through for the duration (the model then returns its hidden states as logits)."""
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` (fp32 logits) against `targets`, and the argmax predictions,
    computed `chunk` rows at a time in the weight's dtype without autocast. The gradient with respect to `hidden`
    is computed in the forward pass, chunk by chunk, and kept; the weight is frozen and gets none."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        predictions = torch.empty_like(targets)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                rows, wanted = hidden[start:start + chunk].to(weight.dtype), targets[start:start + chunk]
                logits = (rows @ weight.T).float()
                predictions[start:start + chunk] = logits.argmax(-1)
                lse = torch.logsumexp(logits, -1)
                total += (lse - logits.gather(1, wanted[:, None]).squeeze(1)).sum()
                if grad is not None:  # d(loss)/d(logits) = softmax - one-hot(target), softmax = exp(logits - lse)
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[torch.arange(len(wanted), device=probs.device), wanted] -= 1
                    grad[start:start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
                del logits
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(predictions)
        return total, predictions

    @staticmethod
    def backward(ctx, grad_total, grad_predictions):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total.to(grad.dtype) if grad is not None else None), None, None, None
