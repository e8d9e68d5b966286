"""The answer-token loss: next-token cross-entropy over the trained (answer) tokens only.

Training (`train.FaqTrainer`), evaluation's answer loss and the merge's fidelity check all call
`answer_token_loss`. Position t predicts token t+1, so only positions whose next token is trained reach the
LM head: transformers' `logits_to_keep` takes a boolean (batch, seq) mask and projects just those hidden states
(`slice_logits_to_keep` in transformers/modeling_utils.py; PEFT's LoRA forward passes it through). The logits
are then (answer tokens, vocab) instead of (batch, seq, vocab): on a packed grounded micro-batch of the
embedded default (4 x ~160 tokens, ~1/4 of them answer tokens, vocab 49,152) the fp32 logits, their
log-softmax and their gradient shrink ~4x.
"""

from __future__ import annotations

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


def answer_token_loss(model, labels: torch.Tensor, **inputs: Any) -> AnswerLoss:
    """Run `model` on `inputs` (input_ids, attention_mask / position_ids, ...) and score the answer tokens of
    `labels` ((batch, seq), IGNORE_INDEX elsewhere, unshifted as in the dataset)."""
    keep = answer_mask(labels)
    outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
    logits = outputs.logits.reshape(-1, outputs.logits.shape[-1]).float()  # (answer tokens, vocab)
    targets = labels[:, 1:][keep[:, :-1]]
    total = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    with torch.no_grad():
        predictions = logits.argmax(-1)
    return AnswerLoss(total, targets, predictions, outputs)
