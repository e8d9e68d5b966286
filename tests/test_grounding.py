"""Retrieval and grounding: the LanceDB index, noisy questions, grounded training examples, the answerer."""

from __future__ import annotations

import json
import random

import pytest
from conftest import thing_rows, write_faq

from faqtune import data as data_mod
from faqtune.config import load_config
from faqtune.errors import FaqtuneError
from faqtune.grounding import (
    GroundedAnswerer,
    build_index,
    casual,
    ground_entries,
    grounded_conversation,
    grounded_question,
    keywords,
    noisy,
    offer,
    related_hits,
    retrieval_only,
    typo,
)
from faqtune.metrics import answer_accuracy, matches_own_answer
from faqtune.retrieval import CUT_IN_GAP, FaqIndex, Hit, calibrate_threshold, embedder_path


def test_embedded_embedder_is_found_offline_in_its_wheel():
    path = embedder_path("all-MiniLM-L6-v2")
    assert path.endswith("model") and (__import__("pathlib").Path(path) / "model.safetensors").exists()
    assert embedder_path("/some/folder") == "/some/folder"  # anything else is passed through


def test_index_finds_each_entry_by_its_own_question(index, bundled):
    hits = index.search_many([e.question for e in bundled], k=3)
    assert len(index) == len(bundled)
    assert sum(h[0].id == i for i, h in enumerate(hits)) == len(bundled)
    assert all(h[0].score > 0.4 and h[0].score >= h[1].score for h in hits)
    assert hits[5][0].citation() == {"id": 5, "question": bundled[5].question, "score": round(hits[5][0].score, 4)}


def test_index_reopens_from_disk_with_its_threshold(index):
    again = FaqIndex(index.root)
    assert again.threshold == index.threshold and 0.1 < again.threshold < 0.9
    assert again.search("forgot my password")[0].question == index.search("forgot my password")[0].question


def test_index_answers_lookup(index, bundled):
    assert index.answers([3, 7]) == {3: bundled[3].answer, 7: bundled[7].answer}


def test_rephrased_questions_mostly_find_their_entry(index):
    rows = [json.loads(line) for line in
            (data_mod.bundled_faq_path().parent / "ecommerce_faq_rephrased.jsonl").read_text().splitlines()]
    hits = index.search_many([r["question"] for r in rows], k=3)
    top3 = sum(r["id"] in [h.id for h in found] for r, found in zip(rows, hits, strict=True)) / len(rows)
    assert top3 > 0.85  # measured 0.93 with all-MiniLM-L6-v2 (question and answer vectors)


def test_threshold_separates_offtopic_from_faq_questions(index):
    from faqtune.evaluate import read_offtopic

    offtopic = read_offtopic(None)  # the evaluation's set: never used for calibration
    declined = sum(h[0].score < index.threshold for h in index.search_many(offtopic, k=1)) / len(offtopic)
    assert declined >= 0.8


class _ScoredIndex:
    """Stands in for an index: each question's top hit scores what the test says."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def search_many(self, questions, k=1):
        return [[Hit(0, q, "a", self.scores[q])] for q in questions]


def test_the_threshold_sits_near_the_off_topic_end_of_the_gap():
    # the FAQ's own questions (in scope) score 0.60-0.90, off-topic ones 0.10-0.40: a cut at the gap's middle
    # (0.50) declined customers' rephrasings, which score lower than the FAQ's own wording
    in_scope = {f"in {i}": 0.6 + 0.1 * i for i in range(4)}
    off_topic = {f"off {i}": 0.1 + 0.1 * i for i in range(4)}
    cut = calibrate_threshold(_ScoredIndex(in_scope | off_topic), list(in_scope), list(off_topic))
    assert cut == pytest.approx(0.4 + CUT_IN_GAP * 0.2) and cut < 0.5
    # overlapping scores: the cut still keeps more in-scope questions than it lets off-topic ones through
    in_scope["in low"], off_topic["off high"] = 0.3, 0.7
    cut = calibrate_threshold(_ScoredIndex(in_scope | off_topic), list(in_scope), list(off_topic))
    assert 0.4 < cut < 0.6


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(FaqtuneError, match="holds no FAQ index"):
        FaqIndex(tmp_path)


def test_noise_styles_are_deterministic_and_realistic():
    q = "How do I reset my password?"
    assert keywords(q) == "reset password"
    assert casual(q) == "how do i reset my password"
    t = typo(q, random.Random(1))
    assert t != q and len(t.split()) == len(q.split())
    assert sum(a != b for a, b in zip(t.split(), q.split(), strict=True)) == 1
    assert noisy(q, random.Random(3)) == noisy(q, random.Random(3))


def test_grounded_training_examples_hide_the_right_entry_for_declines(index, bundled):
    cfg = load_config(None, {"grounding.absent_share": "0.3", "grounding.top_k": "3"})
    ids = list(range(40))
    out = ground_entries(index, bundled[:40], ids, cfg, seed=0)
    assert len(out) == 40
    declines = [e for e in out if e.answer == cfg.grounding.decline_message]
    answered = [e for e in out if e.answer != cfg.grounding.decline_message]
    assert 5 <= len(declines) <= 20
    asked = []
    for e, own in zip(out, bundled[:40], strict=True):
        prompt = e.question
        entries, _, question = prompt.rpartition("\nQuestion: ")
        assert prompt.count("\nA: ") == 3 and entries.startswith("FAQ entries:\n[1] Q: ")
        assert _spelling_of(question, own.question), (question, own.question)  # the customer's question, last
        asked.append(question != own.question)
        shows_own = f"A: {own.answer}" in prompt
        assert shows_own == (e.answer == own.answer)  # the right entry is shown iff the target is its answer
    positions = {e.question.split("\n\n").index(next(p for p in e.question.split("\n\n") if own.answer in p))
                 for e, own in zip(out, bundled[:40], strict=True) if e in answered}
    assert len(positions) > 1  # the right entry is not always first
    assert 10 <= sum(asked) <= 30  # grounding.noisy_share 0.5: about half asked as customers type


def _spelling_of(asked: str, question: str) -> bool:
    """`asked` is `question` itself or one of the noisy spellings `grounding.noisy` makes of it: keywords, lower
    case without punctuation, or one word with a typo (a letter dropped or two swapped) in either."""
    if asked in (question, keywords(question), casual(question)):
        return True
    for original in (question, casual(question)):
        words, typed = original.split(), asked.split()
        if len(words) == len(typed) and sum(a != b for a, b in zip(words, typed, strict=True)) == 1:
            return True
    return False


def test_grounded_question_lists_entries_then_the_question(index):
    hits = index.search("gift card balance", k=2)
    text = grounded_question("gift card balance", hits)
    assert text.startswith("FAQ entries:\n[1] Q: ") and "\n\n[2] Q: " in text
    assert text.endswith("Question: gift card balance")


def test_the_model_reads_a_follow_up_without_the_earlier_turns_unless_history_is_on(index):
    """The earlier turns find the entries; shown to the 135M default, it answered follow-ups with the previous
    answer copied from them, so by default it reads the one grounded question it was trained on."""
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "How long does shipping take?"},
            {"role": "assistant", "content": "Standard shipping takes 3-5 business days."},
            {"role": "user", "content": "and can I get it faster?"}]
    hits = index.search("expedited shipping", k=1)
    alone = grounded_conversation(conv, hits, history=False)
    assert [m["role"] for m in alone] == ["system", "user"]
    assert alone[-1]["content"] == grounded_question("and can I get it faster?", hits)
    assert "3-5 business days" not in json.dumps(alone)
    full = grounded_conversation(conv, hits, history=True)
    assert [m["role"] for m in full] == ["system", "user", "assistant", "user"]
    assert full[:3] == conv[:3] and full[-1] == alone[-1]
    assert conv[-1]["content"] == "and can I get it faster?"  # the caller's conversation is left as it was


def test_retrieval_only_baseline_and_threshold(index, bundled):
    answers = retrieval_only(index, [bundled[2].question, "How many moons does Jupiter have?"],
                             threshold=index.threshold, decline="no")
    assert answers[0].text == bundled[2].answer and answers[0].source["id"] == 2
    assert answers[1].declined and answers[1].text == "no"


def test_grounded_answerer_declines_below_threshold_and_cites(tiny_base, index, bundled):
    from faqtune.models import load_base_model, load_tokenizer

    cfg = load_config(None, {"base_model": str(tiny_base), "quantization.mode": "none",
                             "generation.max_new_tokens": "4"})
    model, tok = load_base_model(str(tiny_base), cfg, quantize=False), load_tokenizer(str(tiny_base))
    bot = GroundedAnswerer(model, tok, cfg.generation, None, index, cfg)
    answers = [g[0] for g in bot.answer_batch([[{"role": "user", "content": bundled[4].question}],
                                                [{"role": "user", "content": "Who painted the Mona Lisa?"}]])]
    assert answers[1].declined and answers[1].text == cfg.grounding.decline_message and answers[1].new_tokens == 0
    assert not answers[0].declined and answers[0].new_tokens > 0
    assert answers[0].source["id"] in [h.id for h in index.search(bundled[4].question)]  # one of the shown
    assert answers[0].prompt_tokens > 100  # the entries went into the prompt


@pytest.mark.pipeline  # builds an index: loads the embedded MiniLM embedder
def test_index_command_builds_an_index_and_reports_bad_files(tmp_path, small_faq, capsys):
    from faqtune.cli import main

    out = tmp_path / "idx"
    assert main(["index", str(small_faq), "--out", str(out), "--threshold", "0.3", "--question-weight", "0.7",
                 "--joint-weight", "0"]) == 0
    assert "indexed 10 entries" in capsys.readouterr().out
    idx = FaqIndex(out)
    assert (idx.threshold, idx.question_weight, idx.joint_weight) == (0.3, 0.7, 0.0)
    assert idx.meta["embedder"].startswith("./embedder-")  # tuned on the FAQ's questions by default
    shipped = tmp_path / "shipped"
    assert main(["index", str(small_faq), "--out", str(shipped), "--threshold", "0.3", "--embedder-epochs", "0"]) == 0
    assert "with all-MiniLM-L6-v2 (" in capsys.readouterr().out
    assert FaqIndex(shipped).meta["embedder"] == "all-MiniLM-L6-v2"
    assert idx.search("thing number 7")[0].id == 7
    meta = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**meta, "joint_weight": 0.5}))  # a table built without them
    with pytest.raises(FaqtuneError, match="joint vectors its table lacks; rebuild"):
        FaqIndex(out)
    (out / "index.json").write_text(json.dumps(meta))
    assert main(["index", str(small_faq), "--out", str(tmp_path / "other"), "--question-weight", "1.5"]) == 2
    assert "`grounding.question_weight` must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    assert main(["index", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("turn,expected", [
    ("can I change it?", True), ("and to Canada?", True), ("what about returns?", True),
    ("How about gift cards", True), ("also, do they expire?", True), ("how long does that take?", True),
    ("where is my stuff", False), ("Is there a minimum order amount?", False),
    ("How do I change the delivery address of an order?", False),
    ("I bought a jacket last month and now the zipper on it is broken, what can I do?", False),
])
def test_follow_up_detection(turn, expected):
    from faqtune.grounding import is_follow_up

    assert is_follow_up(turn) is expected


def _conv(*turns):
    out = []
    for t in turns:
        out += [{"role": "user", "content": t}, {"role": "assistant", "content": "..."}]
    return out[:-1]


def test_a_follow_up_is_searched_with_the_previous_question(index, bundled):
    from faqtune.grounding import retrieve_turns

    ids = [h[0].id for h in retrieve_turns(index, [
        _conv("How long does standard shipping take?", "and how much does it cost?"),
        _conv("How do I buy a gift card?", "what about checking the balance?"),
        _conv("Can I change or cancel my order?", "what about adding an item to it?"),
    ], k=1, threshold=index.threshold)]
    assert ids == [32, 26, 46]  # not the first turn's entry (31, 25, 43), which the longer turn would win


def test_a_new_topic_after_a_question_is_searched_alone(index, bundled):
    from faqtune.grounding import choose_hits, retrieve_turns

    found = retrieve_turns(index, [_conv("Do you ship internationally?", "how do I delete my account?"),
                                   _conv("How do I delete my account?")], k=1, threshold=index.threshold)
    assert found[0][0].id == found[1][0].id == 4
    alone = index.search("where is my stuff", k=10)
    combined = index.search("Do you ship internationally? where is my stuff", k=10)
    strong = choose_hits("where is my stuff", "Do you ship internationally?", alone, combined, 1, -1.0)
    assert strong == (alone[:1], False)  # above the threshold: the turn alone, not international shipping
    weak = choose_hits("where is my stuff", "Do you ship internationally?", alone, combined, 1, 0.99)
    assert weak[1]  # nothing close alone: the previous question helps


FAQ_ANSWERS = [row["answer"] for row in thing_rows()]  # the grounded run's FAQ (tiny_runs' default)


@pytest.fixture(scope="module")
def grounded_run(tiny_runs):
    return tiny_runs("--train.max_steps", "2", "--lora.r", "8", "--data.eval_fraction", "0.2", "--grounding.top_k", "2")


def test_grounded_run_has_its_index_and_grounded_examples(grounded_run):
    idx = FaqIndex(grounded_run / "index")
    assert len(idx) == 10 and 0 < idx.threshold < 1  # the whole FAQ, held-out entries included
    shown = [json.loads(line) for line in (grounded_run / "data" / "train_grounded.jsonl").read_text().splitlines()]
    assert len(shown) == 8
    assert all(r["question"].startswith("FAQ entries:\n[1] Q: ") and r["question"].count("\nA: ") == 2
               for r in shown)


def test_ask_cites_the_entry_on_stderr_and_declines_offtopic(grounded_run, capsys):
    from faqtune.cli import main

    assert main(["ask", str(grounded_run), "How do I do thing number 3?", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "source: FAQ entry #" in err and "thing number" in err  # a random tiny model: any text
    assert main(["ask", str(grounded_run), "Who painted the Mona Lisa?"]) == 0
    out, err = capsys.readouterr()
    assert "I'm sorry" in out and "declined" in err
    assert main(["ask", str(grounded_run), "how do i do a thing", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()  # entries 1, 4 and 2 score within 0.03 of each other
    assert err.count("\nrelated: #") == 1 and err.splitlines()[-1].count(' "How do I do thing number ') == 2
    assert main(["ask", str(grounded_run), "How do I do thing number 3?", "--no-grounding",
                 "--max-new-tokens", "4"]) == 0
    assert "source" not in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["index.json gone", "table data gone", "tuned embedder cut"])
def test_a_grounded_run_whose_index_is_damaged_refuses_to_answer(grounded_run, tmp_path, capsys, damage):
    """Without its index a grounded run would answer from the tuned model alone, unannounced; a table whose
    files are gone failed inside LanceDB with a traceback."""
    import shutil

    from faqtune.cli import main

    run = tmp_path / "run"
    shutil.copytree(grounded_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    if damage == "index.json gone":
        (run / "index" / "index.json").unlink()
        expected = f"{run / 'index'}: no FAQ index (index.json), but this run answers from one"
    elif damage == "table data gone":
        for f in (run / "index").glob("*.lance/data/*"):
            f.unlink()
        expected = f"{run / 'index'}: damaged or unreadable FAQ index ("
    else:  # a traceback at the first question: the embedder loads lazily
        [weights] = (run / "index").glob("*/model.safetensors")
        weights.write_bytes(weights.read_bytes()[:1000])
        expected = f"cannot load the embedding model '{weights.parent}': Error while deserializing header"
    assert main(["ask", str(run), "How do I do thing number 3?", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "faqtune index" in err and "Traceback" not in err
    assert main(["ask", str(run), "How do I do thing number 3?", "--no-grounding", "--max-new-tokens", "4"]) == 0



def test_a_run_that_never_had_an_index_answers_plainly(grounded_run, tmp_path, capsys):
    """A run from before grounding (its config.yaml has no grounding section, so it reads as `retrieval`) or an
    upload without its index never had one: it answers as it always did."""
    import shutil

    from faqtune.cli import main

    run = tmp_path / "run"
    shutil.copytree(grounded_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb", "index",
                                                                    "train_grounded.jsonl"))
    assert main(["ask", str(run), "How do I do thing number 3?", "--max-new-tokens", "4"]) == 0
    assert "source" not in capsys.readouterr().err


def test_eval_of_a_grounded_run_reports_the_three_ways_side_by_side(grounded_run, capsys):
    from faqtune.cli import main

    assert main(["eval", str(grounded_run), "--limit", "2", "--max-new-tokens", "4"]) == 0
    report = json.loads((grounded_run / "eval" / "report.json").read_text())
    g = report["grounding"]
    assert set(g) >= {"tuned_without_grounding", "retrieval_only", "tuned_grounded", "threshold"}
    assert g["retrieval_only"]["answer_accuracy"] == 1.0  # held-out questions verbatim: their own entry first
    assert report["tuned"]["answer_accuracy"] <= g["related_reached"] <= 1  # answered right, or offered
    rows = report["per_question"]
    recomputed = answer_accuracy([r["tuned"]["answer"] for r in rows], [r["reference"] for r in rows], FAQ_ANSWERS)
    assert g["tuned_grounded"]["answer_accuracy"] == report["tuned"]["answer_accuracy"] == recomputed
    assert [r["tuned"]["match"] for r in rows] == [matches_own_answer(r["tuned"]["answer"], r["reference"],
                                                                      FAQ_ANSWERS) for r in rows]


@pytest.mark.parametrize("fallback", [True, False])
def test_a_model_decline_of_an_in_scope_question_falls_back_to_the_top_entry(tiny_base, index, bundled, fallback):
    from faqtune.generate import Answer
    from faqtune.models import load_base_model, load_tokenizer

    cfg = load_config(None, {"base_model": str(tiny_base), "quantization.mode": "none",
                             "grounding.fallback": str(fallback).lower()})
    model, tok = load_base_model(str(tiny_base), cfg, quantize=False), load_tokenizer(str(tiny_base))
    bot = GroundedAnswerer(model, tok, cfg.generation, None, index, cfg)
    hits = index.search(bundled[4].question)
    said = cfg.grounding.decline_message
    out = bot.finish(Answer(said, True, 20, 100, said), (hits, []))
    if fallback:
        assert out.text == hits[0].answer and out.source["verbatim"] and out.source["id"] == hits[0].id
    else:
        assert out.declined and out.source is None and out.text == said
    copied = bot.finish(Answer(hits[1].answer, True, 20, 100, hits[1].answer), (hits, []))
    assert copied.source["id"] == hits[1].id and copied.source["overlap"] == 1.0 and not copied.declined
    # the decline, then an entry's words (seen after 2 epochs): still a decline, however much it overlaps
    mixed = f"{said.rsplit('.', 2)[0]}. {hits[0].answer}"
    out = bot.finish(Answer(mixed, True, 40, 100, mixed), (hits, []))
    if fallback:
        assert out.text == hits[0].answer and out.source["verbatim"]
    else:
        assert out.declined and out.source is None and out.text == said


def _hits(*scores: float) -> list[Hit]:
    return [Hit(i, f"question {i}?", f"answer {i}.", s) for i, s in enumerate(scores)]


def test_related_entries_are_those_within_the_margin_of_the_top_one_or_of_the_threshold():
    assert [h.id for h in related_hits(_hits(0.80, 0.77, 0.74, 0.70), threshold=0.5)] == [0, 1]
    assert [h.id for h in related_hits(_hits(0.80, 0.77), threshold=0.5, margin=0.01)] == [0]
    # declined (top below the threshold): only entries close under the threshold ("did you mean")
    assert [h.id for h in related_hits(_hits(0.48, 0.46, 0.44), threshold=0.5)] == [0, 1]
    assert related_hits(_hits(0.40, 0.39), threshold=0.5) == [] and related_hits([], 0.5) == []
    # `hybrid` ranks by fused rank: the margin is taken from the best score, wherever it is ranked
    assert [h.id for h in related_hits(_hits(0.70, 0.80, 0.78), threshold=0.5)] == [1, 2]


@pytest.mark.parametrize("related", [0, 1, 2])
def test_an_answer_offers_the_related_entries_other_than_the_one_it_cites(related):
    from faqtune.generate import Answer

    cfg = load_config(None, {"grounding.related": str(related), "grounding.fallback": "false"})
    bot = GroundedAnswerer.__new__(GroundedAnswerer)  # finish and unanswered need no model
    bot.grounding = cfg.grounding
    hits = _hits(0.80, 0.78, 0.77, 0.76)
    copied = bot.finish(Answer(hits[1].answer, True, 5, 50, hits[1].answer), (hits[:2], hits))
    assert copied.source["id"] == 1
    assert [r["id"] for r in copied.related] == [0, 2, 3][:related]
    listed = "; ".join(f'#{i} "question {i}?"' for i in [0, 2, 3][:related])
    assert offer(copied) == (f"related: {listed}" if related else "")
    said = cfg.grounding.decline_message
    declined = bot.finish(Answer(said, True, 5, 50, said), (hits[:1], hits[:2]))
    assert declined.declined and [r["id"] for r in declined.related] == [0, 1][:related]
    below = bot.unanswered((None, hits[:1]))
    assert below.declined and [r["id"] for r in below.related] == [0][:related]
    if related:
        assert offer(below) == 'did you mean: #0 "question 0?"'


def test_an_answer_that_opens_like_a_decline_but_is_not_the_decline_stays_an_answer():
    from faqtune.config import DECLINE_MESSAGE
    from faqtune.grounding import opens_with_decline

    assert opens_with_decline(DECLINE_MESSAGE + " Please call us at 555-0100.", DECLINE_MESSAGE)
    assert opens_with_decline("I'm sorry, I can't find that in our FAQ, so I can't answer it. Call us.",
                              DECLINE_MESSAGE)
    assert not opens_with_decline("Sorry, we do not ship to PO boxes. Use a street address.", DECLINE_MESSAGE)
    assert not opens_with_decline("You can return items within 30 days.", DECLINE_MESSAGE)


def test_forgetting_probes_bypass_retrieval(grounded_run, tmp_path):
    """General instructions are off-topic for the FAQ: asked through the grounded answerer they were all
    declined without generating, so base and tuned 'answered' the same decline and nothing was measured."""
    from faqtune.cli import main

    assert main(["eval", str(grounded_run), "--limit", "1", "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    decline = load_config(None).grounding.decline_message
    general = report["forgetting"]["general_answers"]
    assert general and all(g["tuned"] != decline and g["base"] != decline for g in general)


@pytest.mark.pipeline  # builds an index: loads the embedded MiniLM embedder
def test_an_interrupted_index_build_leaves_the_previous_index_whole(tmp_path, small_faq):
    from faqtune.retrieval import TABLE, load_embedder

    cfg = load_config(None, {"grounding.embedder_epochs": "0"})  # the hook below is on the embedder as shipped
    entries = data_mod.load_faq(small_faq).entries
    out = tmp_path / "idx"
    first = build_index(out, entries[:5], cfg)
    before = (out / "index.json").read_text()

    def killed(module, args):  # Ctrl-C between the table and the calibrated threshold: calibration's first embedding
        if any(tmp_path.glob(f".idx.building-*/{TABLE}.lance")):
            raise KeyboardInterrupt

    # a torch forward hook on the embedding model (the one load_embedder caches and the build uses)
    hook = next(load_embedder(cfg.grounding.embedder).children()).register_forward_pre_hook(killed)
    try:
        with pytest.raises(KeyboardInterrupt):
            build_index(out, entries, cfg)
    finally:
        hook.remove()
    assert (out / "index.json").read_text() == before
    again = FaqIndex(out)
    assert len(again) == 5 and again.threshold == first.threshold
    leftovers = list(tmp_path.glob(".idx.building-*"))
    assert leftovers and all(not (d / "index.json").exists() for d in leftovers)  # never a null threshold
    rebuilt = build_index(out, entries, cfg)  # the next build replaces it and sweeps what was left
    assert len(rebuilt) == 10 and FaqIndex(out).search("thing number 7")[0].id == 7
    assert [p.name for p in tmp_path.iterdir() if p.name != "faq.json"] == ["idx"]


@pytest.mark.parametrize("meta", [{"embedder": "all-MiniLM-L6-v2", "threshold": None},
                                  {"threshold": 0.4}, {"embedder": "all-MiniLM-L6-v2"},
                                  {"embedder": "all-MiniLM-L6-v2", "threshold": 0.4, "question_weight": 2},
                                  {"embedder": "all-MiniLM-L6-v2", "threshold": 0.4, "question_weight": "high"},
                                  {"embedder": "all-MiniLM-L6-v2", "threshold": 0.4, "joint_weight": -0.1}])
def test_index_metadata_without_threshold_or_embedder_is_one_clear_error(index, tmp_path, meta):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(index.root, copy)
    (copy / "index.json").write_text(json.dumps(meta))
    with pytest.raises(FaqtuneError, match="index.json: field '(threshold|embedder|question_weight|joint_weight)'") as e:
        FaqIndex(copy)
    assert "\n" not in str(e.value) and "faqtune index" in str(e.value)


def test_the_question_weight_is_fixed_as_the_index_is_built_and_scores_its_entries(tmp_path, small_faq):
    import numpy as np

    from faqtune.retrieval import embed, entry_text

    entries = data_mod.load_faq(small_faq).entries[:6]
    settings = {"grounding.question_weight": 0.8, "grounding.joint_weight": 0.25}
    index = build_index(tmp_path / "idx", entries, load_config(None, settings))
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert (meta["question_weight"], meta["joint_weight"]) == (0.8, 0.25)
    query = "how do I get thing number 3"
    hit = FaqIndex(index.root).search(query, k=1)[0]
    q, question, answer, joint = embed(index.embedder, [query, hit.question, hit.answer, entry_text(hit)])
    rest = 0.75 * np.dot(q, answer) + 0.25 * np.dot(q, joint)
    assert hit.score == pytest.approx(0.8 * np.dot(q, question) + 0.2 * rest, abs=1e-4)
    del meta["question_weight"], meta["joint_weight"]  # an index built before the weights were stored: the mean
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    old = FaqIndex(index.root).search(query, k=6)
    same = next(h for h in old if h.id == hit.id)
    assert same.score == pytest.approx((np.dot(q, question) + np.dot(q, answer)) / 2, abs=1e-4)


def test_index_refuses_to_replace_a_folder_that_is_no_index(tmp_path, small_faq):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FaqtuneError, match="not an FAQ index folder"):
        build_index(tmp_path, data_mod.load_faq(small_faq).entries, load_config(None))
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("epochs", ["0", "1"])  # loaded to encode; loaded to be tuned first (a traceback)
def test_an_embedder_folder_that_is_no_model_is_one_line(tmp_path, small_faq, capsys, epochs):
    from faqtune.cli import main

    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "notes.txt").write_text("mine")
    argv = ["index", str(small_faq), "--out", str(tmp_path / "index"), "--embedder", str(tmp_path / "notmodel")]
    assert main([*argv, "--embedder-epochs", epochs]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"cannot load the embedding model '{tmp_path / 'notmodel'}'" in err


def test_index_says_the_duplicates_it_dropped_as_train_does(tmp_path, capsys):
    from faqtune.cli import main

    rows = thing_rows(4)
    faq = write_faq(tmp_path / "faq.json", [*rows, rows[0], {**rows[1], "answer": "Another answer."}])
    assert main(["index", str(faq), "--out", str(tmp_path / "index"), "--embedder-epochs", "0"]) == 0
    err = capsys.readouterr().err
    assert "dropped 1 exact duplicate record(s)" in err and "1 question(s) asked again with another answer" in err


def test_a_runs_index_is_rebuilt_from_its_csv_with_its_column_mapping(tmp_path, capsys):
    """`faqtune index` read the run's own CSV without the run's --data.question_field/answer_field: 'missing'."""
    from faqtune.cli import main
    from faqtune.config import FaqtuneConfig
    from faqtune.run import RUN_HEADER

    faq = tmp_path / "custom.csv"
    faq.write_text("Q,A\n" + "".join(f"{r['question']},{r['answer']}\n" for r in thing_rows(4)))
    run = tmp_path / "run"
    run.mkdir()
    cfg = FaqtuneConfig(output_dir=str(run))
    cfg.data.path, cfg.data.question_field, cfg.data.answer_field = str(faq), "Q", "A"
    cfg.save(run / "config.yaml", RUN_HEADER)
    assert main(["index", str(faq), "--out", str(run / "index"), "--embedder-epochs", "0"]) == 0
    assert "indexed 4 entries" in capsys.readouterr().out
    edited = tmp_path / "edited.csv"  # an edited copy is read with the run's mapping too
    edited.write_text(faq.read_text() + "Can I pay by cheque?,No.\n")
    assert main(["index", str(edited), "--out", str(run / "index"), "--embedder-epochs", "0"]) == 0
    assert "indexed 5 entries" in capsys.readouterr().out
    plain = write_faq(tmp_path / "plain.json", thing_rows(3))  # default names: read as detected
    assert main(["index", str(plain), "--out", str(run / "index"), "--embedder-epochs", "0"]) == 0
    assert "indexed 3 entries" in capsys.readouterr().out
    assert main(["index", str(faq), "--out", str(tmp_path / "alone"), "--embedder-epochs", "0"]) == 2  # no run
    assert "field 'question': missing" in capsys.readouterr().err


def test_indexing_a_conversation_of_several_turns_says_which_turn_is_found(tmp_path, capsys):
    """Only its last question and answer were indexed, unannounced: the earlier answers could not be given."""
    from faqtune.cli import main

    turns = [{"role": "user", "content": "Do you ship abroad?"}, {"role": "assistant", "content": "Yes, to 40 countries."},
             {"role": "user", "content": "How long to Canada?"}, {"role": "assistant", "content": "Five days."}]
    faq = tmp_path / "faq.jsonl"
    faq.write_text("".join(json.dumps(r) + "\n" for r in [*thing_rows(3), {"messages": turns}]))
    assert main(["index", str(faq), "--out", str(tmp_path / "index"), "--embedder-epochs", "0"]) == 0
    assert "note: 1 conversation record(s) have several turns (e.g. line 4): the index finds each by its last " \
           "question" in capsys.readouterr().err
    assert main(["index", str(write_faq(tmp_path / "one.json", thing_rows(3))), "--out", str(tmp_path / "i2"),
                 "--embedder-epochs", "0"]) == 0
    assert "several turns" not in capsys.readouterr().err


def test_an_index_beside_a_config_yaml_of_the_users_own_is_no_runs_index(tmp_path, small_faq, capsys):
    """A project folder's own config.yaml was read as a run's settings: `faqtune index FAQ --out project/index`
    failed on its unknown keys."""
    from faqtune.cli import main

    (tmp_path / "config.yaml").write_text("services:\n  web: {image: nginx}\n")
    assert main(["index", str(small_faq), "--out", str(tmp_path / "index"), "--embedder-epochs", "0"]) == 0
    assert "indexed" in capsys.readouterr().out


def test_eval_reports_retrieval_ceiling_differences_and_follow_ups(grounded_run, tmp_path):
    from faqtune.cli import main

    convs = tmp_path / "convs.jsonl"
    convs.write_text('{"turns": ["How do I do thing number 3?", "and what about thing number 4?"], "id": 4}\n'
                     '{"turns": ["How do I do thing number 1?", "How do I do thing number 6?"], "id": 6}\n')
    out = tmp_path / "eval"
    assert main(["eval", str(grounded_run), "--limit", "2", "--max-new-tokens", "4", "--conversations",
                 str(convs), "--out", str(out), "--compare-base"]) == 0
    report = json.loads((out / "report.json").read_text())
    g, f = report["grounding"], report["follow_ups"]
    assert g["retrieval_topk"]["k"] == 3 and g["retrieval_topk"]["recall"] == 1.0
    assert isinstance(g["differences"], list)
    assert all(set(d) >= {"question", "retrieval_match", "tuned_match"} for d in g["differences"])
    assert f["conversations"] == 2 and "base" in f
    for side in (f["tuned"], f["base"]):  # each follow-up's answer scored against its own FAQ answer
        matches = [matches_own_answer(r["answer"], r["reference"], FAQ_ANSWERS) for r in side["rows"]]
        assert [r["match"] for r in side["rows"]] == matches and side["accuracy"] == sum(matches) / 2
    assert [r["reference"] for r in f["tuned"]["rows"]] == [FAQ_ANSWERS[4], FAQ_ANSWERS[6]]
    assert f["retrieval_only"] == 1.0  # the follow-up's own entry, found with the previous question's help
    assert [r["turns"] for r in f["tuned"]["rows"]][0][1] == "and what about thing number 4?"
    md = (out / "report.md").read_text()
    assert "## Retrieval alone vs the tuned reader" in md and "top-3 recall" in md and "## Follow-ups" in md


def test_choice_training_targets_name_the_right_entry_or_zero(index, bundled):
    from faqtune.reader import strip_choice

    cfg = load_config(None, {"grounding.absent_share": "0.3", "grounding.top_k": "3", "grounding.choice": "true"})
    out = ground_entries(index, bundled[:30], list(range(30)), cfg, seed=0)
    zeros = 0
    for e, own in zip(out, bundled[:30], strict=True):
        choice, text = strip_choice(e.answer)
        shown = e.question.split("FAQ entries:\n", 1)[1].split("\n\n" + "Answer the", 1)[0].split("\n\n")
        if choice == 0:
            zeros += 1
            assert text == cfg.grounding.decline_message and not any(f"A: {own.answer}" in s for s in shown)
        else:
            assert text == own.answer and shown[choice - 1].startswith(f"[{choice}] Q: ")
            assert shown[choice - 1].endswith(f"A: {own.answer}")
    assert 3 <= zeros <= 15
    with pytest.raises(FaqtuneError, match="top_k"):
        ground_entries(index, bundled[:2], [0, 1], load_config(None, {"grounding.top_k": "12",
                                                                      "grounding.choice": "true"}), seed=0)


def test_choice_step_answers_a_shown_entry_verbatim_or_declines(tiny_base, index, bundled):
    from faqtune.models import load_base_model, load_tokenizer
    from faqtune.reader import choice_tokens, score_choices

    cfg = load_config(None, {"base_model": str(tiny_base), "quantization.mode": "none", "grounding.top_k": "3",
                             "grounding.choice": "true"})
    model, tok = load_base_model(str(tiny_base), cfg, quantize=False), load_tokenizer(str(tiny_base))
    opening, names = choice_tokens(tok, 3)
    assert len(set(names)) == 4
    bot = GroundedAnswerer(model, tok, cfg.generation, None, index, cfg)
    questions = [bundled[4].question, bundled[30].question, "Who painted the Mona Lisa?"]
    answers = [g[0] for g in bot.answer_batch([[{"role": "user", "content": q}] for q in questions])]
    assert all(a.new_tokens == 0 for a in answers)  # nothing generated: a choice, then a verbatim entry
    assert answers[2].declined  # below the threshold: the guard still declines
    for q, a in zip(questions[:2], answers[:2], strict=True):
        shown = index.search(q, k=3)
        assert a.declined or (a.text == shown[a.source["choice"] - 1].answer and a.source["verbatim"])
    logp = score_choices(model, tok, [[{"role": "user", "content": grounded_question("q", shown)}]] * 2, 3)
    assert len(logp) == 2 and len(logp[0]) == 4 and all(x <= 0 for x in logp[0])
    assert logp[0] == pytest.approx(logp[1], abs=1e-4)  # batched rows of the same prompt agree
    short = [{"role": "user", "content": grounded_question("q", shown)}]
    long = [{"role": "user", "content": grounded_question("a much longer question " * 6, shown)}]
    alone, padded = score_choices(model, tok, [short], 3)[0], score_choices(model, tok, [long, short], 3)[1]
    assert alone == pytest.approx(padded, abs=1e-3)  # left padding changes nothing


@pytest.mark.pipeline
def test_a_runs_index_is_rebuilt_with_the_runs_grounding_settings(tiny_runs, small_faq, tmp_path):
    import shutil

    from faqtune.cli import main
    from faqtune.retrieval import FaqIndex

    run = tmp_path / "run"
    shutil.copytree(tiny_runs("--train.max_steps", "1", "--lora.r", "4", "--grounding.threshold", "0.123",
                              name="fixed-threshold"), run)
    assert main(["index", str(small_faq), "--out", str(run / "index")]) == 0
    assert FaqIndex(run / "index").threshold == pytest.approx(0.123)  # the run's, not a new calibration
    assert main(["index", str(small_faq), "--out", str(run / "index"), "--threshold", "0.3"]) == 0
    assert FaqIndex(run / "index").threshold == pytest.approx(0.3)  # a flag still wins
