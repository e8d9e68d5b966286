"""The scored choice step of a grounded reader (`grounding.choice`): which shown entry answers, or none.

Training targets start with the number of the entry that answers ("[2] " + its answer) or "[0] " + the decline
(`choice_target`). At inference one forward pass over the prompt and the targets' common opening ("[") gives
the next-token scores of the choice numbers (`score_choices`); the argmax picks an entry, whose answer is
returned verbatim and cited, or the decline. More reliable for a 135M model than generating free text from
several entries, which it mixes up (benchmarks/README.md), and no answer tokens are generated at all.
"""

from __future__ import annotations

import re

import torch

from faqtune.errors import ConfigError
from faqtune.prompting import encode_prompt

NONE = 0  # the choice number of "no shown entry answers"
PRIOR_TEMPERATURE = 0.05  # retrieval prior: a top-1 0.10 (cosine) above the top-2 is e^2 times likelier
_PREFIX = re.compile(r"^\s*\[(\d)\]\s?")


def check_choice(top_k: int) -> None:
    if top_k > 9:
        raise ConfigError([f"`grounding.top_k` must be <= 9 with `grounding.choice` (one digit a choice), got {top_k}"])


def choice_target(position: int, text: str) -> str:
    """The training target: "[position] text" (position 1..k of the answering entry, 0 for the decline), or
    "[position]" alone for an empty text (`grounding.choice_only`)."""
    return f"[{position}] {text}" if text else f"[{position}]"


def strip_choice(text: str) -> tuple[int | None, str]:
    """(choice number, the text after it), or (None, text) without one."""
    m = _PREFIX.match(text)
    return (int(m.group(1)), text[m.end():]) if m else (None, text)


def retrieval_prior(similarities: list[float]) -> list[float]:
    """Log-probabilities of the shown entries from retrieval alone: a softmax of their similarities over
    PRIOR_TEMPERATURE."""
    return torch.log_softmax(torch.tensor(similarities, dtype=torch.float64) / PRIOR_TEMPERATURE, dim=0).tolist()


def pick(model_logp: list[float], similarities: list[float], weight: float) -> int:
    """The choice 0..k (k = len(similarities)). The decline is the model's decision: [0] when it scores
    highest. Otherwise the entry maximising the model's log-probability plus `weight` times retrieval's
    (`retrieval_prior`): the model reorders retrieval's ranking only where it is sure."""
    if max(range(len(similarities) + 1), key=model_logp.__getitem__) == NONE:
        return NONE
    prior = retrieval_prior(similarities)
    return 1 + max(range(len(similarities)), key=lambda n: model_logp[n + 1] + weight * prior[n])


def choice_tokens(tokenizer, k: int) -> tuple[list[int], list[int]]:
    """(the token ids every choice "[n]" opens with, the one token after them that names n, for n = 0..k).

    Raises ConfigError when the tokenizer does not spell the choices that way (then scoring needs one
    forward per choice, which this module does not do)."""
    spelled = [tokenizer.encode(f"[{n}]", add_special_tokens=False) for n in range(k + 1)]
    common = 0
    while all(len(s) > common + 1 for s in spelled) and len({s[common] for s in spelled}) == 1:
        common += 1
    names = [s[common] for s in spelled]
    if len(set(names)) != len(names):
        raise ConfigError(["`grounding.choice` needs a tokenizer that spells [0]..[9] with one distinct token for "
                           "the digit; this one does not"])
    return spelled[0][:common], names


@torch.inference_mode()
def score_choices(model, tokenizer, conversations: list[list[dict[str, str]]], k: int) -> list[list[float]]:
    """Log-probabilities of the choices 0..k for each conversation (its last user turn holds the entries),
    from one left-padded batched forward pass over prompt + the choices' common opening."""
    opening, names = choice_tokens(tokenizer, k)
    prompts = [encode_prompt(tokenizer, c) + opening for c in conversations]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt's own positions from 0
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1, :]
    logp = torch.log_softmax(logits.float(), dim=-1)[:, names]  # (B, vocab) -> (B, k + 1)
    return logp.tolist()
