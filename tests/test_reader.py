"""The grounded reader's training questions (`grounding.questions`) and its fused choice step
(`grounding.retrieval_prior`)."""

from __future__ import annotations

import math
import random

import pytest

from faqtune import data as data_mod
from faqtune.config import effective_epochs, load_config
from faqtune.errors import ConfigError
from faqtune.grounding import answer_words, ground_entries, noisy, question_forms
from faqtune.reader import pick, retrieval_prior, strip_choice


def entry(question: str, answer: str) -> data_mod.FaqEntry:
    return data_mod.FaqEntry((("user", question), ("assistant", answer)), 0)


def test_answer_words_are_the_first_sentences_content_words():
    assert answer_words("You can return any item within 30 days. Refunds take a week.") == \
        "return item within 30 days"
    assert answer_words("Yes!") == "yes"


def test_one_question_form_is_the_old_single_noisy_or_plain_question():
    e = entry("How do I reset my password?", "Use the reset link on the login page.")
    for seed in range(20):
        a, b = random.Random(seed), random.Random(seed)
        expected = noisy(e.question, b) if b.random() < 0.5 else e.question
        assert question_forms(e, 1, 0.5, a) == [expected]
        assert a.random() == b.random()  # the same draws: runs with questions=1 train on what they did before


def test_several_forms_ask_the_question_its_noise_and_the_answers_words():
    e = entry("How do I reset my password?", "Use the reset link on the login page. It expires in an hour.")
    forms = question_forms(e, 5, 0.5, random.Random(0))
    assert len(forms) == 5
    assert forms[0] == e.question
    assert forms[2] == "use reset link login page"
    assert forms[1] != e.question and forms[3] != e.question


def test_each_entry_is_trained_in_several_wordings_with_their_own_neighbours(index, bundled):
    cfg = load_config(None, {"grounding.top_k": "3", "grounding.choice": "true", "grounding.questions": "3",
                             "grounding.absent_share": "0"})
    out = ground_entries(index, bundled[:20], list(range(20)), cfg, seed=0)
    assert len(out) == 60
    for i, own in enumerate(bundled[:20]):
        asked = [e.question.rsplit("Question: ", 1)[1] for e in out[3 * i:3 * i + 3]]
        assert asked[0] == own.question and len(set(asked)) == 3
        for e in out[3 * i:3 * i + 3]:
            choice, text = strip_choice(e.answer)
            assert text == own.answer and f"[{choice}] Q: {own.question}\nA: {own.answer}" in e.question
    prompts = {e.question.split("\n\nAnswer the customer's")[0] for e in out[:3]}
    assert len(prompts) > 1  # different wordings retrieve (and show) different entries or orders


def test_more_questions_per_entry_keep_the_default_training_cost():
    one, three = load_config(None), load_config(None, {"grounding.questions": "3"})
    assert effective_epochs(one) == 2.0 and effective_epochs(three) == 2.0 / 3
    assert effective_epochs(load_config(None, {"grounding.questions": "3", "train.epochs": "2"})) == 2.0
    with pytest.raises(ConfigError, match="grounding.questions"):
        load_config(None, {"grounding.questions": "0"})
    with pytest.raises(ConfigError, match="grounding.retrieval_prior"):
        load_config(None, {"grounding.retrieval_prior": "-1"})


def test_the_retrieval_prior_ranks_the_entries_by_similarity():
    prior = retrieval_prior([0.60, 0.50, 0.30])
    assert math.isclose(sum(math.exp(p) for p in prior), 1.0)
    assert prior[0] > prior[1] > prior[2] and math.isclose(prior[0] - prior[1], 0.10 / 0.05)


def test_the_model_overrules_retrieval_only_when_it_is_sure_and_declines_alone():
    sims = [0.60, 0.55, 0.30]
    unsure = [math.log(0.2), math.log(0.3), math.log(0.4), math.log(0.1)]  # the model leans to entry 2
    sure = [math.log(0.01), math.log(0.01), math.log(0.97), math.log(0.01)]
    assert pick(unsure, sims, weight=1.0) == 1  # 1 nat of retrieval beats 0.29 of the model
    assert pick(unsure, sims, weight=0.0) == 2  # the model alone
    assert pick(sure, sims, weight=1.0) == 2
    declines = [math.log(0.4), math.log(0.35), math.log(0.2), math.log(0.05)]
    assert pick(declines, sims, weight=1.0) == 0  # the model's decline stands, however similar entry 1 is
    assert pick(declines, [0.9, 0.2, 0.1], weight=5.0) == 0


def test_choice_only_targets_are_the_number_alone(index, bundled):
    cfg = load_config(None, {"grounding.top_k": "3", "grounding.choice": "true", "grounding.choice_only": "true",
                             "grounding.absent_share": "0.5"})
    out = ground_entries(index, bundled[:20], list(range(20)), cfg, seed=0)
    targets = [e.answer for e in out]
    assert set(targets) <= {"[0]", "[1]", "[2]", "[3]"} and "[0]" in targets and len(set(targets)) == 4
    for e, own in zip(out, bundled[:20], strict=True):
        n = int(e.answer[1])
        assert n == 0 or f"[{n}] Q: {own.question}\nA: {own.answer}" in e.question
