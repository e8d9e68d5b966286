"""Unit tests for faqtune.metrics on hand-computed cases, and against rouge-score where installed."""

from __future__ import annotations

import pytest

from faqtune.metrics import answer_accuracy, matches_own_answer, rouge_l, token_f1, tokens


def test_tokens_lowercase_words_only():
    assert tokens("Hello, World! Don't   panic-now 42") == [
        "hello",
        "world",
        "don",
        "t",
        "panic",
        "now",
        "42",
    ]
    assert tokens("  ?! ") == []


@pytest.mark.parametrize("metric", [rouge_l, token_f1])
@pytest.mark.parametrize(
    "candidate,reference,expected",
    [
        ("The cat sat on the mat.", "the cat sat on the mat", 1.0),  # case and punctuation ignored
        ("red green blue", "cyan magenta", 0.0),
        ("", "the cat", 0.0),
        ("the cat", "", 0.0),
        ("", "", 0.0),
        ("!!!", "!!!", 0.0),  # no word tokens at all
        # "the cat sat on the mat" vs "the cat is on the mat": LCS "the cat on the mat" = 5 of 6 each way;
        # the bags share the x2, cat, on, mat = 5 too. P = R = F = 5/6.
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        # clipped counts: one "yes" in common; P = 1/3, R = 1/2, F = 2 * (1/6) / (5/6) = 2/5
        ("yes yes yes", "yes no", 0.4),
    ],
)
def test_shared_cases(metric, candidate, reference, expected):
    assert metric(candidate, reference) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_depends_on_order_token_f1_does_not():
    cand = "police killed the gunman"
    ref = "the gunman was killed by the police"
    # candidate: police killed the gunman           (4 tokens)
    # reference: the gunman was killed by the police (7 tokens)
    # Longest common subsequence: "the gunman" (or "killed the") = 2; nothing extends either, because
    # "police" comes first in the candidate but last in the reference.
    # P = 2/4, R = 2/7, F = 2 * (1/2)(2/7) / (1/2 + 2/7) = (2/7) / (11/14) = 4/11
    assert rouge_l(cand, ref) == pytest.approx(4 / 11)
    # Bags: all 4 candidate tokens occur in the reference. P = 4/4, R = 4/7, F = (8/7) / (11/7) = 8/11
    assert token_f1(cand, ref) == pytest.approx(8 / 11)
    # Reordered "gunman the killed police": LCS = "the killed police" (reference positions 1, 4, 7) = 3,
    # P = 3/4, R = 3/7, F = (18/28) / (33/28) = 6/11; the bags, and so token F1, are unchanged.
    assert rouge_l("gunman the killed police", ref) == pytest.approx(6 / 11)
    assert token_f1("gunman the killed police", ref) == pytest.approx(8 / 11)


def test_rouge_l_is_symmetric_f_measure():
    a, b = "where is my order today", "my order is where"
    # a: where is my order today; b: my order is where. LCS = "my order" = 2. P = 2/5, R = 2/4, F = 4/9
    assert rouge_l(a, b) == pytest.approx(4 / 9)
    assert rouge_l(b, a) == pytest.approx(4 / 9)


POOL = [
    "Returns are free within 30 days of delivery.",
    "We ship to 40 countries worldwide.",
    "You can pay by card or PayPal.",
]


def test_answer_accuracy_counts_only_own_answer():
    candidates = [
        POOL[0],  # exactly its own reference -> hit
        POOL[1],  # exactly ANOTHER FAQ answer -> miss
        "",  # empty -> miss
        "returns are free for 30 days",  # a paraphrase closest to its own reference -> hit
    ]
    references = [POOL[0], POOL[0], POOL[2], POOL[0]]
    assert answer_accuracy(candidates, references, POOL) == pytest.approx(2 / 4)


def test_answer_accuracy_ties_do_not_count():
    pool = ["alpha beta", "alpha gamma"]
    assert rouge_l("alpha", pool[0]) == rouge_l("alpha", pool[1]) > 0  # the premise: a genuine tie
    assert answer_accuracy(["alpha"], [pool[0]], pool) == 0.0
    assert not matches_own_answer("alpha", pool[0], pool)
    assert answer_accuracy(["alpha beta"], [pool[0]], pool) == 1.0


def test_answer_accuracy_duplicate_answers_in_pool():
    # Two FAQ entries sharing one answer: the copy of the own answer is not a competitor.
    pool = [POOL[0], POOL[1], POOL[0]]
    assert answer_accuracy([POOL[0]], [POOL[0]], pool) == 1.0


def test_answer_accuracy_edge_cases():
    assert answer_accuracy([], [], POOL) == 0.0
    with pytest.raises(ValueError):
        answer_accuracy([POOL[0]], [POOL[0], POOL[1]], POOL)


SENTENCES = [
    ("police killed the gunman", "the gunman was killed by the police"),
    (
        "Click Sign In, choose Create Account and enter your email.",
        "To create an account, click on the Sign Up button and follow the instructions.",
    ),
    ("You can't return items after 30 days.", "Items can be returned within 30 days of purchase."),
    ("a b a b a", "b a b b a a"),
    ("Shipping is free.", "Returns cost $5."),
]


@pytest.mark.parametrize("candidate,reference", SENTENCES)
def test_rouge_l_agrees_with_rouge_score(candidate, reference):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = scorer.score(reference, candidate)["rougeL"].fmeasure
    assert rouge_l(candidate, reference) == pytest.approx(expected, abs=1e-6)
