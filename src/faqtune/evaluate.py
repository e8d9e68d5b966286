"""Evaluation stage: what the bot learned, how it stops, what it forgot -- tuned and base side by side.

`build_eval_set` pairs questions with reference answers (the run's held-out split, an FAQ file, or a
questions file paired with an FAQ by id or by order); `evaluate_run` generates and scores answers with
the adapter on and off (one loaded model), measures answer loss, general-text perplexity, general
instructions and off-topic declines, and returns one `report.EvalReport` (rendered and written by `report.py`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from faqtune import data as data_mod
from faqtune.data import packaged
from faqtune.errors import DataError, FaqtuneError, PromptTooLong, one_line
from faqtune.generate import Answer, Answerer
from faqtune.grounding import is_decline, retrieval_only, retrieve_turns
from faqtune.loss import answer_token_loss
from faqtune.metrics import answer_accuracy, matches_own_answer, rouge_l, token_f1, tokens
from faqtune.prompting import TEMPLATE_MARKERS, encode_conversation, with_system
from faqtune.report import (
    AnswerRow,
    Difference,
    EvalReport,
    Figures,
    FollowUpRow,
    FollowUps,
    FollowUpSide,
    Forgetting,
    ForgettingSide,
    GeneralAnswer,
    GroundedFigures,
    Grounding,
    OfftopicAnswer,
    QuestionResult,
    RetrievalFigures,
    TopkRecall,
    UngroundedFigures,
)
from faqtune.run import RunDir


@dataclass
class EvalSet:
    questions: list[str]
    references: list[str]
    pool: list[str]  # every answer of the FAQ: a generated answer must be closest to its own
    source: str
    notes: list[str] = field(default_factory=list)


def _run_faq(cfg) -> Path:
    return Path(cfg.data.path) if cfg.data.path else data_mod.bundled_faq_path()


def _faq_for_run(run: RunDir, cfg) -> list[data_mod.FaqEntry]:
    """The run's FAQ in its original order (ids and order pairing refer to it), else its saved splits (the
    same answers, for the pool, in another order: `_pairable` refuses pairing with them)."""
    path = _run_faq(cfg)
    if path.exists():
        return data_mod.load_faq(path, cfg.data.format, cfg.data.question_field, cfg.data.answer_field).entries
    entries = data_mod.load_faq(run.train_split).entries if run.train_split.exists() else []
    if run.eval_split.exists() and run.eval_split.stat().st_size:
        entries += data_mod.load_faq(run.eval_split).entries
    return entries


def _gone_faq(cfg, faq: str | Path | None) -> Path | None:
    """The run's FAQ file when questions would pair with it (no `faq` given) but it is not there."""
    path = _run_faq(cfg)
    return None if faq or path.exists() else path


def faq_index(value):
    """An `id` as written: an int in JSON, a string of digits in CSV (every CSV value is text); else as it is."""
    return int(value) if isinstance(value, str) and value.strip().isdecimal() else value


def _pairable(gone: Path | None, file: Path, record: str | None, how: str) -> None:
    """Questions of `file` pair with the FAQ by `how` (id, order): refused when the run's FAQ file is `gone`."""
    if gone is not None:
        raise DataError(str(file), f"pairs questions with the run's FAQ by {how}, but {gone} is not found (a "
                                   "relative path is read from the current folder; the run's saved splits are not "
                                   "in its order); pass --faq FILE", record)


def _read_question_records(path: Path) -> list[tuple[str, dict]]:
    """Records of a questions file (JSON/JSONL/CSV, or plain text with one question a line)."""
    text = data_mod.read_text(path)
    if path.suffix.lower() == ".txt":
        return [(f"line {i}", {"question": q.strip()}) for i, q in enumerate(text.splitlines(), 1) if q.strip()]
    records = list(data_mod.READERS[data_mod.detect_format(path, text)](text, str(path)))
    for record, obj in records:
        data_mod.refuse_repeated_keys(obj, str(path), record)
    return records


def build_eval_set(run: RunDir, cfg, questions: str | Path | None = None, faq: str | Path | None = None) -> EvalSet:
    """Questions with references: the run's held-out split by default, else a file of questions.

    A questions file may carry its own answers (any FAQ format), or only questions, paired with `faq`
    (default: the run's FAQ) by an `id` field (0-based index into the FAQ) or by order.
    """
    faq_entries = data_mod.load_faq_of_run(faq, cfg.data).entries if faq else _faq_for_run(run, cfg)
    pool = [e.answer for e in faq_entries]
    if questions is None:
        if not run.eval_split.exists() or not run.eval_split.stat().st_size:
            raise DataError(str(run.eval_split), "the run has no held-out split (data.eval_fraction was 0); "
                                                 "pass --questions FILE")
        held = data_mod.load_faq(run.eval_split).entries
        return EvalSet([e.question for e in held], [e.answer for e in held], pool, str(run.eval_split))
    path = Path(questions)
    records = _read_question_records(path)
    if not records:
        raise DataError(str(path), "holds no questions")
    gone = _gone_faq(cfg, faq)  # checked once, refused at the first question that pairs by id or order
    qs, refs = [], []
    paired: dict[str, str] = {}  # "id" / "order" -> the first record paired so
    for i, (record, obj) in enumerate(records):
        if not isinstance(obj, dict):
            raise DataError(str(path), f"must be an object, got {type(obj).__name__}", record)
        qkey = data_mod.pick_key(list(obj), None, data_mod.QUESTION_KEYS)
        akey = data_mod.pick_key(list(obj), None, data_mod.ANSWER_KEYS)
        if qkey is None and data_mod.pick_key(list(obj), "messages", ()):  # a chat record: one question, one answer
            entry = data_mod.parse_record(obj, str(path), record)
            if sum(role == "user" for role, _ in entry.messages) > 1:
                raise DataError(str(path), "a conversation of several questions: one question and its answer "
                                           "per record here (follow-ups: --conversations)", record, "messages")
            qs.append(entry.question)
            refs.append(entry.answer)
            continue
        if qkey is None:
            raise DataError(str(path), "missing (expected fields: question, and answer or id)", record, "question")
        qs.append(data_mod.text_field(obj[qkey], str(path), record, qkey))
        if akey is not None:
            refs.append(data_mod.text_field(obj[akey], str(path), record, akey))
        elif (ikey := data_mod.pick_key(list(obj), None, ("id",))) is not None:  # matched as the others are: ID
            idx = faq_index(obj[ikey])
            _pairable(gone, path, record, "id")
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(faq_entries):
                raise DataError(str(path), f"must be an FAQ index in [0, {len(faq_entries)}), got {idx!r}",
                                record, ikey)
            refs.append(faq_entries[idx].answer)
            paired.setdefault("id", record)
        else:
            _pairable(gone, path, record, "order")
            paired.setdefault("order", record)
            if i >= len(faq_entries):
                raise DataError(str(path), f"has more questions than the FAQ has entries ({len(faq_entries)}) "
                                           "to pair by order; add an 'id' or 'answer' field", record)
            refs.append(faq_entries[i].answer)
        if len(paired) == 2:  # by order, a record's place counts the records with an id too: a guess
            raise DataError(str(path), f"has no 'id' or 'answer' field, but {paired['id']} pairs with the FAQ by "
                                       "id; give every question an id (or an answer)", paired["order"])
    pool = list(dict.fromkeys(pool + refs))
    return EvalSet(qs, refs, pool, str(path))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def answer_all(bot: Answerer, questions: list[str]) -> tuple[list[Answer], list[float]]:
    """One question at a time, so each latency is what a user waits for one answer (after one warm-up)."""
    if questions:
        _ask_one(bot, questions[0], 1)  # first call pays one-off costs (kernel selection, caches)
    answers, seconds = [], []
    for n, q in enumerate(questions, 1):
        start = time.perf_counter()
        answers.append(_ask_one(bot, q, n))
        seconds.append(time.perf_counter() - start)
    return answers, seconds


def _ask_one(bot: Answerer, question: str, n: int) -> Answer:
    """The first answer to question `n`; a prompt too long for the model names which question, of hundreds."""
    try:
        return bot.ask(question)[0]
    except PromptTooLong as e:
        raise PromptTooLong(f"question {n} ({one_line(question[:50])}...): {e}") from None


def score_answers(answers: list[Answer], seconds: list[float],
                  es: EvalSet) -> tuple[dict[str, float], list[AnswerRow]]:
    """The answers' scores (the `Figures` fields measured from answers alone) and one row per answer."""
    texts = [a.text for a in answers]
    norm = [" ".join(tokens(t)) for t in texts]
    rows = [
        AnswerRow(a.text, match=matches_own_answer(a.text, ref, es.pool), rouge_l=rouge_l(a.text, ref),
                  token_f1=token_f1(a.text, ref), exact=n == " ".join(tokens(ref)), stopped=a.stopped,
                  tokens=a.new_tokens, seconds=s, source=a.source)
        for a, ref, n, s in zip(answers, es.references, norm, seconds, strict=True)
    ]
    n = max(1, len(rows))
    total_tokens = sum(r.tokens for r in rows)
    figures = {
        "answer_accuracy": sum(r.match for r in rows) / n,
        "mean_rouge_l": statistics.fmean(r.rouge_l for r in rows) if rows else 0.0,
        "mean_token_f1": statistics.fmean(r.token_f1 for r in rows) if rows else 0.0,
        "exact_match": sum(r.exact for r in rows) / n,
        "stop_rate": sum(r.stopped for r in rows) / n,
        "mean_answer_tokens": total_tokens / n,
        "template_leaks": sum(any(m in a.raw for m in TEMPLATE_MARKERS) for a in answers),
        "latency_p50_s": _percentile(seconds, 0.5),
        "latency_p95_s": _percentile(seconds, 0.95),
        "tokens_per_second": total_tokens / sum(seconds) if sum(seconds) > 0 else 0.0,
    }
    return figures, rows


@torch.inference_mode()
def answer_loss(model, tokenizer, questions: list[str], references: list[str], system_prompt: str | None,
                max_seq_length: int) -> float:
    """Mean NLL per answer token of the reference answers (prompt masked), given the question alone (no entries)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for q, a in zip(questions, references, strict=True):
        msgs = with_system([{"role": "user", "content": q}, {"role": "assistant", "content": a}], system_prompt)
        enc = encode_conversation(tokenizer, msgs, max_seq_length)
        scored = answer_token_loss(model, torch.tensor([enc.labels], device=device),
                                   input_ids=torch.tensor([enc.input_ids], device=device))
        total += float(scored.total)
        count += scored.tokens
    return total / max(1, count)


@torch.inference_mode()
def text_perplexity(model, tokenizer, text: str, window: int = 256) -> float:
    """Perplexity of plain text in non-overlapping windows (no template): a gauge of general language."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start:start + window]], device=device)
        if chunk.shape[1] < 2:
            continue
        out = model(input_ids=chunk, labels=chunk, use_cache=False)
        total += float(out.loss) * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return math.exp(total / max(1, count))


def _general_instructions() -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in packaged("general_eval_instructions.jsonl").read_text().splitlines()
            if line.strip()]
    return [r["question"] for r in rows], [r["answer"] for r in rows]


RECORD_SUFFIXES = (".json", ".jsonl", ".csv")  # off-topic files read as records; any other, one question a line


def read_offtopic(path: str | Path | None) -> list[str]:
    """Off-topic questions: one a line, or the question field of each record of a JSON/JSONL/CSV file (its
    lines were taken whole: a JSON object or a CSV header counted as a question)."""
    path = Path(path) if path else packaged("offtopic_questions.txt")
    if path.suffix.lower() not in RECORD_SUFFIXES:
        questions = [q.strip() for q in data_mod.read_text(path).splitlines() if q.strip()]
    else:
        questions = []
        for record, obj in _read_question_records(path):
            qkey = data_mod.pick_key(list(obj), None, data_mod.QUESTION_KEYS) if isinstance(obj, dict) else None
            if qkey is None:
                raise DataError(str(path), "missing (an off-topic file holds questions: records with a question "
                                           "field, or one question a line in a .txt file)", record, "question")
            questions.append(data_mod.text_field(obj[qkey], str(path), record, qkey))
    if not questions:
        raise DataError(str(path), "holds no questions")
    return questions


@dataclass
class Side:
    """One adapter state's answers to the eval set and the off-topic questions, scored."""
    figures: Figures
    rows: list[AnswerRow]
    offtopic: list[str]  # the answers to the off-topic questions
    citations_right: float | None  # share of citing answers whose entry's answer is the reference
    reached: float | None = None  # share answered right or with the right entry offered (grounding.related)


def _measure_side(bot: Answerer, model, tokenizer, es: EvalSet, offtopic: list[str], cfg) -> Side:
    """Every figure for whatever adapter state the model is in now."""
    answers, seconds = answer_all(bot, es.questions)
    scores, rows = score_answers(answers, seconds, es)
    loss = answer_loss(model, tokenizer, es.questions, es.references, cfg.data.system_prompt,
                       cfg.data.max_seq_length)
    off_answers, _ = answer_all(bot, offtopic)
    figures = Figures(**scores, answer_loss=loss, answer_perplexity=math.exp(loss),
                      offtopic_decline_rate=sum(is_decline(a.text) for a in off_answers) / len(off_answers),
                      false_decline_rate=sum(is_decline(a.text) for a in answers) / max(1, len(answers)))
    # a citation is right when the cited entry's answer is the reference
    cited = [(a.source["id"], ref) for a, ref in zip(answers, es.references, strict=True) if a.source]
    right = reached = None
    if getattr(bot, "index", None) is not None:
        texts = bot.index.answers([i for i, _ in cited] + [r["id"] for a in answers for r in a.related])
        right = sum(texts.get(i) == ref for i, ref in cited) / len(cited) if cited else None
        if bot.grounding.related:  # with none offered it would be answer accuracy again
            offered = [[texts.get(r["id"], "") for r in a.related] for a in answers]
            reached = sum(row.match or any(matches_own_answer(t, ref, es.pool) for t in shown)
                          for shown, row, ref in zip(offered, rows, es.references, strict=True)) / max(1, len(answers))
    return Side(figures, rows, [a.text for a in off_answers], right, reached)


def _forgetting_side(model, tokenizer, cfg) -> tuple[ForgettingSide, list[tuple[str, str]]]:
    """General text and general instructions, asked plainly: never through retrieval, whose threshold would
    decline every general instruction without generating (the figure then compared the decline with itself).
    Returns the figures and the (instruction, answer) pairs."""
    gq, gref = _general_instructions()
    answers, _ = answer_all(Answerer(model, tokenizer, cfg.generation, cfg.data.system_prompt), gq)
    side = ForgettingSide(
        general_text_perplexity=text_perplexity(model, tokenizer, packaged("general_text.txt").read_text()),
        general_instruction_rouge_l=statistics.fmean(rouge_l(a.text, r) for a, r in zip(answers, gref, strict=True)))
    return side, [(q, a.text) for q, a in zip(gq, answers, strict=True)]


def forgetting_flagged(base_ppl: float, tuned_ppl: float, threshold: float) -> bool:
    """Forgetting: general-text perplexity rose by more than `threshold` (a share, 0.2 = +20%)."""
    return tuned_ppl / base_ppl - 1 > threshold


def eval_accuracy(answers: list[Answer], es: EvalSet) -> float:
    """Answer accuracy of `answers` to the eval set's questions (metrics.answer_accuracy over its pool)."""
    return answer_accuracy([a.text for a in answers], es.references, es.pool)


def topk_recall(index, questions: list[str], references: list[str], pool: list[str], k: int) -> float:
    """Share of questions with their reference among the top-k retrieved entries: the ceiling of any reader
    shown those k entries (an entry counts when its answer matches the reference, as answer accuracy does)."""
    found = index.search_many(questions, k=k)
    right = sum(any(matches_own_answer(h.answer, ref, pool) for h in hits)
                for hits, ref in zip(found, references, strict=True))
    return right / max(1, len(questions))


def grounding_side_by_side(bot, model, tokenizer, cfg, es: EvalSet, offtopic: list[str], tuned: Side) -> Grounding:
    """(a) the tuned model without grounding, (b) retrieval alone (top-1 answer verbatim, with and without
    the threshold), the retriever's top-k recall (the ceiling of any reader), (c) tuned + grounded (the
    `tuned` figures already measured), with off-topic and false decline rates, and the questions where
    (b) and (c) differ."""
    plain = Answerer(model, tokenizer, cfg.generation, cfg.data.system_prompt)
    ungrounded = plain.ask_many(es.questions)
    top1 = retrieval_only(bot.index, es.questions)
    gated = retrieval_only(bot.index, es.questions, bot.threshold, cfg.grounding.decline_message)
    gated_off = retrieval_only(bot.index, offtopic, bot.threshold, cfg.grounding.decline_message)
    k = max(3, cfg.grounding.top_k)
    f = tuned.figures
    differ = []
    for q, ref, b, row in zip(es.questions, es.references, gated, tuned.rows, strict=True):
        b_match = matches_own_answer(b.text, ref, es.pool)
        if b_match != row.match:
            differ.append(Difference(q, ref, retrieval_only=b.text, retrieval_match=b_match, tuned=row.answer,
                                     tuned_match=row.match))
    return Grounding(
        threshold=bot.threshold,
        tuned_without_grounding=UngroundedFigures(
            answer_accuracy=eval_accuracy(ungrounded, es),
            false_decline_rate=sum(is_decline(a.text) for a in ungrounded) / max(1, len(ungrounded))),
        retrieval_only=RetrievalFigures(
            answer_accuracy=eval_accuracy(top1, es), answer_accuracy_with_threshold=eval_accuracy(gated, es),
            offtopic_decline_rate=sum(a.declined for a in gated_off) / max(1, len(offtopic)),
            false_decline_rate=sum(a.declined for a in gated) / max(1, len(gated))),
        retrieval_topk=TopkRecall(k, topk_recall(bot.index, es.questions, es.references, es.pool, k)),
        tuned_grounded=GroundedFigures(f.answer_accuracy, f.offtopic_decline_rate, f.false_decline_rate),
        citations_right=tuned.citations_right,
        related_reached=tuned.reached,
        differences=differ,
    )


# --- follow-ups: two-turn conversations ----------------------------------------------------------------------

def read_conversations(path: str | Path, faq_entries: list[data_mod.FaqEntry]) -> tuple[list[list[str]], list[str]]:
    """A JSONL file of {"turns": [question, follow-up, ...], "id": FAQ index the last turn's answer comes from}
    -> (turns, reference answers)."""
    path = Path(path)
    turns, refs = [], []
    for n, line in enumerate(data_mod.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        record = f"line {n}"
        obj = data_mod.parse_json(line, str(path), record)
        if not isinstance(obj, dict):
            raise DataError(str(path), f"must be an object, got {type(obj).__name__}", record)
        data_mod.refuse_repeated_keys(obj, str(path), record)
        tkey = data_mod.pick_key(list(obj), None, ("turns",)) or "turns"  # matched as an FAQ's fields are: Turns, ID
        ikey = data_mod.pick_key(list(obj), None, ("id",)) or "id"
        t = obj.get(tkey)
        if not isinstance(t, list) or len(t) < 2 or not all(isinstance(x, str) and x.strip() for x in t):
            raise DataError(str(path), "must be a list of two or more non-empty questions", record, tkey)
        idx = faq_index(obj.get(ikey))
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(faq_entries):
            raise DataError(str(path), f"must be an FAQ index in [0, {len(faq_entries)}), got {idx!r}", record, ikey)
        turns.append([x.strip() for x in t])
        refs.append(faq_entries[idx].answer)
    if not turns:
        raise DataError(str(path), "holds no conversations")
    return turns, refs


def load_conversations(run: RunDir, cfg, path: str | Path, faq: str | Path | None = None):
    """`read_conversations` against `faq` (default: the run's FAQ, as `build_eval_set` pairs questions)."""
    _pairable(_gone_faq(cfg, faq), Path(path), None, "id")
    return read_conversations(path, data_mod.load_faq_of_run(faq, cfg.data).entries if faq else
                              _faq_for_run(run, cfg))


def answer_conversation(bot: Answerer, turns: list[str]) -> Answer:
    """Ask the turns in order, each with the answers so far as history; the last answer."""
    history: list[tuple[str, str]] = []
    for turn in turns[:-1]:
        history.append((turn, bot.ask(turn, history)[0].text))
    return bot.ask(turns[-1], history)[0]


def follow_up_side(bot: Answerer, conversations: list[list[str]], references: list[str],
                   pool: list[str]) -> FollowUpSide:
    """Accuracy of the last answer of each conversation (the follow-up), with the answers."""
    answers = [answer_conversation(bot, turns) for turns in conversations]
    matches = [matches_own_answer(a.text, ref, pool) for a, ref in zip(answers, references, strict=True)]
    return FollowUpSide(sum(matches) / max(1, len(matches)),
                        [FollowUpRow(t, r, a.text, m)
                         for t, r, a, m in zip(conversations, references, answers, matches, strict=True)])


def retrieval_follow_ups(index, conversations: list[list[str]], references: list[str], pool: list[str],
                         threshold: float | None) -> float:
    """Follow-up accuracy of retrieval alone: the top entry for the last turn (searched as the grounded
    answerer searches it), verbatim; below `threshold` a decline (wrong)."""
    convs = [[{"role": "user", "content": t} for t in turns] for turns in conversations]
    found = retrieve_turns(index, convs, 1, threshold if threshold is not None else -1.0)
    right = sum(bool(hits) and (threshold is None or hits[0].score >= threshold)
                and matches_own_answer(hits[0].answer, ref, pool)
                for hits, ref in zip(found, references, strict=True))
    return right / max(1, len(conversations))


def check_merged(merged: str | None) -> None:
    """Refuse `eval --merged`: eval measures the base (forgetting, --compare-base) by turning the adapter
    off, which a model with the adapter merged in cannot do."""
    if merged is not None and merged.lower() != "none":  # spelt as the settings are read (validation.normalise)
        raise FaqtuneError(f"eval takes no --merged {merged}: it measures the base (forgetting, --compare-base) by "
                           "turning the adapter off, which a merged model cannot do; --merged is for ask, chat "
                           "and demo")


def evaluate_run(model, tokenizer, cfg, es: EvalSet, compare_base: bool, offtopic: list[str],
                 forgetting_threshold: float, bot: Answerer | None = None,
                 conversations: tuple[list[list[str]], list[str]] | None = None) -> EvalReport:
    """The whole evaluation of a loaded base+adapter (PeftModel); base figures via disable_adapter().

    `bot` answers (default: a plain Answerer); a GroundedAnswerer adds the grounding side-by-side figures.
    `conversations` (turns, references: `read_conversations`) adds the follow-up accuracy.
    """
    bot = bot or Answerer(model, tokenizer, cfg.generation, cfg.data.system_prompt)
    grounded = hasattr(bot, "index")
    tuned = _measure_side(bot, model, tokenizer, es, offtopic, cfg)
    grounding = grounding_side_by_side(bot, model, tokenizer, cfg, es, offtopic, tuned) if grounded else None
    pool = list(dict.fromkeys(es.pool + (conversations[1] if conversations else [])))
    follow = FollowUps(len(conversations[0]), follow_up_side(bot, *conversations, pool)) if conversations else None
    if follow and grounded:
        follow.retrieval_only = retrieval_follow_ups(bot.index, *conversations, pool, None)
        follow.retrieval_only_with_threshold = retrieval_follow_ups(bot.index, *conversations, pool, bot.threshold)
    tuned_forget, tuned_general = _forgetting_side(model, tokenizer, cfg)
    with model.disable_adapter():
        base = _measure_side(bot, model, tokenizer, es, offtopic, cfg) if compare_base else None
        if follow and compare_base:
            follow.base = follow_up_side(bot, *conversations, pool)
        base_forget, base_general = _forgetting_side(model, tokenizer, cfg)
    b_ppl, t_ppl = base_forget.general_text_perplexity, tuned_forget.general_text_perplexity
    forgetting = Forgetting(
        base=base_forget, tuned=tuned_forget, perplexity_ratio=t_ppl / b_ppl,
        general_instruction_rouge_drop=base_forget.general_instruction_rouge_l
        - tuned_forget.general_instruction_rouge_l,
        threshold=forgetting_threshold, flagged=forgetting_flagged(b_ppl, t_ppl, forgetting_threshold),
        general_answers=[GeneralAnswer(q, base=b, tuned=t)
                         for (q, b), (_, t) in zip(base_general, tuned_general, strict=True)])
    base_rows = base.rows if base else [None] * len(es.questions)
    base_offtopic = base.offtopic if base else [None] * len(offtopic)
    return EvalReport(
        source=es.source, questions_evaluated=len(es.questions), offtopic_questions=len(offtopic),
        tuned=tuned.figures, base=base.figures if base else None, grounding=grounding, follow_ups=follow,
        forgetting=forgetting,
        per_question=[QuestionResult(q, r, t, b)
                      for q, r, t, b in zip(es.questions, es.references, tuned.rows, base_rows, strict=True)],
        offtopic_answers=[OfftopicAnswer(q, t, b)
                          for q, t, b in zip(offtopic, tuned.offtopic, base_offtopic, strict=True)],
    )
