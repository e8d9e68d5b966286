"""Answer-quality measures: ROUGE-L, token F1, and FAQ answer accuracy."""

from __future__ import annotations

import re
from collections import Counter

_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (same definition as rouge-score without stemming)."""
    c, r = tokens(candidate), tokens(reference)
    lcs = _lcs(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def token_f1(candidate: str, reference: str) -> float:
    c, r = tokens(candidate), tokens(reference)
    common = sum((Counter(c) & Counter(r)).values())
    if common == 0:
        return 0.0
    p, rec = common / len(c), common / len(r)
    return 2 * p * rec / (p + rec)


def matches_own_answer(candidate: str, own: str, others: list[str]) -> bool:
    """True when `candidate` is closer (ROUGE-L) to its own reference than to every other FAQ answer."""
    own_score = rouge_l(candidate, own)
    return own_score > 0 and all(own_score > rouge_l(candidate, o) for o in others if o != own)


def answer_accuracy(candidates: list[str], references: list[str], answer_pool: list[str]) -> float:
    """Share of candidates that match their own reference better than any other answer in `answer_pool`."""
    if not candidates:
        return 0.0
    pool = list(dict.fromkeys(answer_pool))
    hits = sum(matches_own_answer(c, ref, pool) for c, ref in zip(candidates, references, strict=True))
    return hits / len(candidates)
