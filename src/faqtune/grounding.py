"""Grounded answers: the retrieved FAQ entries go into the prompt, at training and at inference.

Training (`ground_entries`) shows each question with its top-k retrieved entries -- the right one at a
random place among real distractors, or withheld with a decline as the target -- so the model learns to
answer from the entries and to say so when none fits. Inference (`GroundedAnswerer`) retrieves for each
question, declines below the run's calibrated similarity threshold, and cites the entry it answered from.
"""

from __future__ import annotations

import random
import re
import sys
import uuid
from dataclasses import replace
from pathlib import Path

from faqtune.config import FaqtuneConfig, GenerationConfig
from faqtune.data import FaqEntry, packaged
from faqtune.embedder_tuning import tune_embedder
from faqtune.generate import Answer, Answerer
from faqtune.metrics import rouge_l
from faqtune.prompting import encode_prompt
from faqtune.reader import NONE, check_choice, choice_target, pick, score_choices
from faqtune.retrieval import FaqIndex, Hit, IndexError_, building_dir, calibrate_threshold, swap_into_place
from faqtune.run import RunDir

MIN_ANSWER_TOKENS = 32  # a grounded prompt leaving less room in the context is answered with its top entry verbatim
RELATED_MARGIN = 0.05  # related entries score within this of the top one (benchmarks/README.md, "Related questions")
INSTRUCTION = "Answer the customer's question from the FAQ entries above. If none of them answers it, say so."
DECLINE = re.compile(
    r"\b(i'?m sorry|i am sorry|sorry, (but )?i|i can only (help|answer|assist)|i can'?t (help|assist|answer)|"
    r"i cannot (help|assist|answer)|i'?m (not able|unable) to|i am (not able|unable) to|outside (of )?(my|the) "
    r"scope|not something i can help)",
    re.IGNORECASE,
)
_STOPWORDS = set(
    "a an the i me my we our you your is are am was were be been do does did can could would should will "
    "how what when where which who why to of in on for with at by from it its this that there if or and "
    "have has had get please any some".split()
)


def grounded_question(question: str, hits: list[Hit]) -> str:
    """The user turn the model sees: the entries, the instruction, then the customer's question."""
    shown = "\n\n".join(f"[{i}] Q: {h.question}\nA: {h.answer}" for i, h in enumerate(hits, 1))
    return f"FAQ entries:\n{shown}\n\n{INSTRUCTION}\nQuestion: {question}"


# --- question noise: realistic customer spellings of an FAQ question (training and calibration) -----------

def is_decline(text: str) -> bool:
    """A polite refusal: an apology or a statement of what the bot can help with."""
    return bool(DECLINE.search(text))


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]


def starts_decline(text: str, decline_message: str) -> bool:
    """`text` is the start of the decline message, case and spacing aside: a decline cut short (by max_tokens),
    or one still being streamed."""
    return " ".join(decline_message.lower().split()).startswith(" ".join(text.lower().split()))


def opens_with_decline(text: str, decline_message: str) -> bool:
    """The answer opens with the configured decline's first sentence and goes on ("I'm sorry, I can't find
    that in our FAQ... Please contact our support team with your order number"): the model declined, then
    mixed in an entry's words (seen after 2 epochs on the shared FAQ). Its overlap with the entry must not
    turn it into an answer."""
    return rouge_l(first_sentence(text), first_sentence(decline_message)) >= 0.8


def keywords(question: str) -> str:
    words = re.findall(r"[\w'-]+", question.lower())
    kept = [w for w in words if w not in _STOPWORDS]
    return " ".join(kept or words)


def typo(question: str, rng: random.Random) -> str:
    words = question.split()
    long = [i for i, w in enumerate(words) if len(w) > 3]
    if not long:
        return question
    i = rng.choice(long)
    w = words[i]
    j = rng.randrange(1, len(w) - 1)
    words[i] = w[:j] + w[j + 1:] if rng.random() < 0.5 else w[:j - 1] + w[j] + w[j - 1] + w[j + 1:]
    return " ".join(words)


def casual(question: str) -> str:
    return re.sub(r"[?.!]+$", "", question.strip()).lower()


def noisy(question: str, rng: random.Random) -> str:
    """One of: keywords only, a typo, lower case without punctuation (or two of them)."""
    style = rng.randrange(4)
    if style == 0:
        return keywords(question)
    if style == 1:
        return typo(question, rng)
    if style == 2:
        return casual(question)
    return typo(casual(question), rng)


# --- training ---------------------------------------------------------------------------------------------

def answer_words(answer: str, n: int = 6) -> str:
    """A keyword query from the answer's first sentence: customers often ask with the words of the answer
    they expect ("refund 5-7 business days"), not of the FAQ's question."""
    return " ".join(keywords(first_sentence(answer)).split()[:n])


def question_forms(entry: FaqEntry, n: int, noisy_share: float, rng: random.Random) -> list[str]:
    """`n` ways a customer could ask `entry`: one form (the question, noisy for `noisy_share` of entries), or
    the question, a noisy spelling of it, the answer's key words, then further noisy spellings."""
    if n == 1:
        return [noisy(entry.question, rng) if rng.random() < noisy_share else entry.question]
    forms = [entry.question, noisy(entry.question, rng), answer_words(entry.answer) or keywords(entry.question)]
    while len(forms) < n:
        forms.append(noisy(entry.question, rng))
    return forms[:n]


def ground_entries(index: FaqIndex, entries: list[FaqEntry], ids: list[int], cfg: FaqtuneConfig,
                   seed: int) -> list[FaqEntry]:
    """Training conversations with retrieved entries in the prompt (see the module docstring): for each
    entry, `grounding.questions` wordings (`question_forms`), each shown with the entries retrieved for it
    (hard negatives), the right one at a random place or withheld for `absent_share` of them (a decline).

    Only single-turn Q/A entries are grounded; multi-turn conversations are kept as they are.
    """
    g = cfg.grounding
    if g.choice:
        check_choice(g.top_k)
    rng = random.Random(seed)
    single = [(e, i) for e, i in zip(entries, ids, strict=True) if len(e.messages) == 2 or
              (len(e.messages) == 3 and e.messages[0][0] == "system")]
    asked = [(entry, own_id, q) for entry, own_id in single
             for q in question_forms(entry, g.questions, g.noisy_share, rng)]
    found = index.search_many([q for _, _, q in asked], k=g.top_k + 1, hybrid=g.hybrid)
    out = [e for e in entries if all(e is not s for s, _ in single)]
    for (entry, own_id, question), hits in zip(asked, found, strict=True):
        others = [h for h in hits if h.id != own_id]
        if rng.random() < g.absent_share:
            shown, target = others[:g.top_k], g.decline_message
            if g.choice:
                target = choice_target(NONE, "" if g.choice_only else target)
        else:
            own = next((h for h in hits if h.id == own_id), None) or Hit(own_id, entry.question, entry.answer, 1.0)
            shown = others[:g.top_k - 1]
            position = rng.randrange(len(shown) + 1)
            shown.insert(position, own)
            target = (choice_target(position + 1, "" if g.choice_only else entry.answer) if g.choice
                      else entry.answer)
        messages = tuple(m for m in entry.messages if m[0] == "system")
        messages += (("user", grounded_question(question, shown)), ("assistant", target))
        out.append(FaqEntry(messages, entry.record))
    return out


def calibration_questions(entries: list[FaqEntry], seed: int) -> tuple[list[str], list[str]]:
    """The threshold's two sides: noisy spellings and key words of the FAQ's own questions (in scope), and a
    bundled set of off-topic questions kept apart from the evaluation's off-topic set."""
    rng = random.Random(seed)
    in_scope = [noisy(e.question, rng) for e in entries] + [keywords(e.question) for e in entries]
    off_topic = [q.strip() for q in packaged("offtopic_calibration.txt").read_text(encoding="utf-8").splitlines()
                 if q.strip()]
    return in_scope, off_topic


def calibrate(index: FaqIndex, entries: list[FaqEntry], seed: int, off_topic: list[str] | None = None) -> float:
    """The decline threshold: separates the calibration's in-scope questions from its off-topic ones
    (`calibration_questions`; `off_topic` replaces the bundled set)."""
    in_scope, bundled = calibration_questions(entries, seed)
    return calibrate_threshold(index, in_scope, bundled if off_topic is None else off_topic)


def build_index(root: str | Path, entries: list[FaqEntry], cfg: FaqtuneConfig, seed: int = 0,
                tune_on: list[int] | None = None) -> FaqIndex:
    """Index `entries` (ids = FAQ positions) and store the threshold: the configured one, else calibrated.
    With `grounding.embedder_epochs`, the embedder is first tuned on the question forms of the entries at
    positions `tune_on` (default: every entry; training passes its training split's) and stored in the index
    (`embedder_tuning`).

    Built in a sibling folder and swapped into place when complete (index.json written once, with its
    threshold), so a build killed halfway leaves the previous index as it was, never a half-written one.
    """
    root = Path(root)
    several = [e.record for e in entries if sum(r == "user" for r, _ in e.messages) > 1]
    if several:  # an entry is found by its last question and says its last answer
        print(f"note: {len(several)} conversation record(s) have several turns (e.g. {several[0]}): the index "
              "finds each by its last question and answers with its last answer; the earlier turns are trained "
              "on but cannot be retrieved (make them records of their own to have them answered)", file=sys.stderr)
    tmp = building_dir(root)
    embedder = cfg.grounding.embedder
    if cfg.grounding.embedder_epochs > 0:
        embedder = _tuned_embedder(tmp, entries, range(len(entries)) if tune_on is None else tune_on, cfg, seed)
    index = FaqIndex.build(entries, tmp, embedder, question_weight=cfg.grounding.question_weight,
                           joint_weight=cfg.grounding.joint_weight)
    threshold = cfg.grounding.threshold
    index.set_threshold(calibrate(index, entries, seed) if threshold is None else threshold)
    swap_into_place(tmp, root)
    return FaqIndex(root)


def _tuned_embedder(folder: Path, entries: list[FaqEntry], tune_on, cfg: FaqtuneConfig, seed: int) -> str:
    """Tune the embedder on the question forms of the entries at positions `tune_on` (the question, two noisy
    spellings, the answer's and the question's key words); stored in `folder` (the index being built); returns
    its `./` name."""
    rng = random.Random(seed)
    anchors = [(form, i) for i in tune_on for e in (entries[i],)
               for form in (e.question, noisy(e.question, rng), noisy(e.question, rng),
                            answer_words(e.answer) or keywords(e.question), keywords(e.question))]
    name = f"embedder-{uuid.uuid4().hex[:8]}"  # a new path at each build: loaded embedders are cached by path
    folder.mkdir(parents=True, exist_ok=True)
    tune_embedder(cfg.grounding.embedder, entries, anchors, folder / name, cfg.grounding.embedder_epochs,
                  cfg.grounding.embedder_mix, seed)
    return f"./{name}"


def ground_splits(index_dir: str | Path, faq: list[FaqEntry], splits: list[tuple[list[FaqEntry], list[int]]],
                  cfg: FaqtuneConfig, build: bool = True) -> tuple[float, list[list[FaqEntry]]]:
    """Index `faq` in `index_dir` (`build`; else open the index another process built there) and ground each
    split, given as (entries, their FAQ positions); returns the index's threshold and the grounded splits.

    Training calls it in a child process (`memory.in_fresh_process`), so that the embedder and LanceDB leave
    with the child."""
    tune_on = splits[0][1] if splits else None  # the embedder learns the training split's forms only
    index = build_index(index_dir, faq, cfg, seed=cfg.data.seed, tune_on=tune_on) if build else FaqIndex(index_dir)
    grounded = [ground_entries(index, entries, ids, cfg, seed=cfg.data.seed + k)
                for k, (entries, ids) in enumerate(splits)]
    return index.threshold, grounded


# --- inference --------------------------------------------------------------------------------------------

_FOLLOW_UP_START = re.compile(r"^(and|or|also|plus|but|so|then|what about|how about|same (for|with)|what if)\b")
_REFERENCE = re.compile(r"\b(it|its|that|this|those|these|them|they|their|there|one|ones)\b")
_EXISTENTIAL = re.compile(r"\b(is|are|was|were|isn't|aren't) there\b")


def is_follow_up(turn: str, max_words: int = 8) -> bool:
    """A turn that cannot stand alone: it opens like a continuation ("and to Canada?", "what about
    returns?") or is short and refers back ("can I change it?", "how long does that take?"; the "there" of
    "is there" does not count)."""
    text = " ".join(turn.lower().split())
    if _FOLLOW_UP_START.match(text):
        return True
    return len(text.split()) <= max_words and bool(_REFERENCE.search(_EXISTENTIAL.sub(" ", text)))


def user_turns(conversation: list[dict[str, str]]) -> tuple[str, str | None]:
    """The last user turn and the user turn before it (None for a first turn)."""
    users = [m["content"] for m in conversation if m["role"] == "user"]
    return users[-1], (users[-2] if len(users) > 1 else None)


FOLLOW_UP_WEIGHT = 0.6  # weight of the turn alone against the turn with the previous one (measured 0.5-0.8)


def fuse_hits(alone: list[Hit], combined: list[Hit], k: int, weight: float = FOLLOW_UP_WEIGHT) -> list[Hit]:
    """Rank the entries found for a turn alone and for the turn with the previous one by
    weight * cosine(turn) + (1 - weight) * cosine(both). The previous question alone would dominate the
    combined search (it is the longer text): "and how much does it cost?" after "How long does shipping
    take?" must find the shipping-cost entry, not the shipping-time one again. An entry missing from one
    list gets that list's lowest score."""
    floor_a = alone[-1].score if alone else 0.0
    floor_c = combined[-1].score if combined else 0.0
    by_id = {h.id: h for h in combined} | {h.id: h for h in alone}
    sa, sc = {h.id: h.score for h in alone}, {h.id: h.score for h in combined}
    fused = {i: weight * sa.get(i, floor_a) + (1 - weight) * sc.get(i, floor_c) for i in by_id}
    ranked = sorted(fused, key=lambda i: -fused[i])[:k]
    return [replace(by_id[i], score=fused[i]) for i in ranked]


def choose_hits(turn: str, previous: str | None, alone: list[Hit], combined: list[Hit] | None, k: int,
                threshold: float) -> tuple[list[Hit], bool]:
    """The hits to answer a turn from, and whether the previous turn was used: fused (`fuse_hits`) for a
    follow-up (`is_follow_up`) or when the turn alone is weak (its top hit below the threshold); else the
    turn alone (a new topic: "where is my stuff" after "Do you ship internationally?" is about tracking,
    not international shipping)."""
    if previous is None or not combined:
        return alone[:k], False
    weak = not alone or alone[0].score < threshold
    if is_follow_up(turn) or weak:
        return fuse_hits(alone, combined, k), True
    return alone[:k], False


def retrieve_turns(index: FaqIndex, conversations: list[list[dict[str, str]]], k: int, threshold: float,
                   hybrid: bool = False, depth: int = 10) -> list[list[Hit]]:
    """Top-k entries for each conversation's last user turn (`choose_hits`), in one batched search."""
    turns = [user_turns(c) for c in conversations]
    later = [i for i, (_, previous) in enumerate(turns) if previous is not None]
    wide = max(k, depth) if later else k
    found = index.search_many([t for t, _ in turns] + [f"{turns[i][1]} {turns[i][0]}" for i in later],
                              k=wide, hybrid=hybrid)
    combined = dict(zip(later, found[len(turns):], strict=True))
    return [choose_hits(t, previous, found[i], combined.get(i), k, threshold)[0]
            for i, (t, previous) in enumerate(turns)]


def grounded_conversation(conversation: list[dict[str, str]], hits: list[Hit], history: bool) -> list[dict[str, str]]:
    """What the model reads: the last user turn with the entries put into it, after the system prompt and,
    with `history`, the earlier turns. Without them (the default) the model reads what it was trained on, one
    grounded question; the earlier turns have already done their work in finding the entries
    (`retrieve_turns`). Shown, the 135M default answers a follow-up with the previous answer copied from the
    history ("and can I get it faster?" after "How long does shipping take?")."""
    last = max(j for j, m in enumerate(conversation) if m["role"] == "user")
    kept = [dict(m) for j, m in enumerate(conversation[:last + 1])
            if history or j == last or m["role"] == "system"]
    kept[-1]["content"] = grounded_question(conversation[last]["content"], hits)
    return kept + [dict(m) for m in conversation[last + 1:]]


class GroundedAnswerer(Answerer):
    """An Answerer that retrieves for the last user turn, declines below the threshold, and cites."""

    def __init__(self, model, tokenizer, gen: GenerationConfig, system_prompt: str | None, index: FaqIndex,
                 cfg: FaqtuneConfig):
        super().__init__(model, tokenizer, gen, system_prompt)
        self.index, self.grounding = index, cfg.grounding
        self.threshold = cfg.grounding.threshold if cfg.grounding.threshold is not None else index.threshold

    def unanswered(self, context) -> Answer:
        """Said without generating (`context` = (picked, near)): the entry the choice step picked (`picked` =
        (choice, hit); choice None: the top entry of a prompt too long to read), verbatim and cited, else the decline (no FAQ entry is similar enough, or the choice step
        picked none); with the related entries of `near`."""
        picked, near = context
        if picked is not None:
            choice, hit = picked
            source = {**hit.citation(), **({"choice": choice} if choice is not None else {}), "verbatim": True}
            return Answer(hit.answer, True, 0, 0, hit.answer, source, related=self.related(near, hit))
        msg = self.grounding.decline_message
        return Answer(msg, True, 0, 0, msg, None, True, self.related(near, None))

    def related(self, near: list[Hit], cited: Hit | None) -> tuple[dict, ...]:
        """Up to `grounding.related` of `near` (`related_hits`) other than the cited entry."""
        return tuple(h.citation() for h in near if cited is None or h.id != cited.id)[:self.grounding.related]

    def retrieve(self, conversations: list[list[dict[str, str]]]) -> list[list[Hit]]:
        """The entries for each conversation's last user turn (see `choose_hits`): one batched search of every
        turn alone, and of every turn after an earlier one together with it; the top_k shown and, after
        them, enough for `grounding.related`."""
        k = max(self.grounding.top_k, self.grounding.related + 1)  # top_k >= 1: related 0 asks for no more
        return retrieve_turns(self.index, conversations, k, self.threshold, self.grounding.hybrid)

    def prepare(self, conversations: list[list[dict[str, str]]]):
        """Retrieve for each conversation; below the threshold -> (None, (None, near)) (declined), else the
        conversation with the entries put into its last user turn, and (the entries shown, near): `near`, the
        entries close enough to be offered as related (`related_hits`)."""
        found = self.retrieve(conversations)
        out = []
        for conv, hits in zip(conversations, found, strict=True):
            near = related_hits(hits, self.threshold) if self.grounding.related else []
            if not hits or hits[0].score < self.threshold:
                out.append((None, (None, near)))
                continue
            shown = hits[:self.grounding.top_k]
            grounded = grounded_conversation(conv, shown, self.grounding.history)
            if self.too_long(grounded):  # long entries: answered with the top one as it is, not refused
                out.append((None, ((None, shown[0]), near)))
                continue
            out.append((grounded, (shown, near)))
        return self.choose(out) if self.grounding.choice else out

    def too_long(self, conversation: list[dict[str, str]]) -> bool:
        """The prompt leaves the model's context fewer than MIN_ANSWER_TOKENS (or max_new_tokens) to answer in."""
        room = min(self.gen.max_new_tokens, MIN_ANSWER_TOKENS)
        return bool(self.context) and len(encode_prompt(self.tokenizer, conversation)) > self.context - room

    def choose(self, prepared: list[tuple]) -> list[tuple]:
        """`grounding.choice`: the scored choice step instead of generating (see reader.py); the choice's
        decline is final (no `fallback`)."""
        todo = [i for i, (conv, _) in enumerate(prepared) if conv is not None]
        if not todo:
            return prepared
        out = list(prepared)
        scores = score_choices(self.model, self.tokenizer, [prepared[i][0] for i in todo], self.grounding.top_k)
        for i, logp in zip(todo, scores, strict=True):
            hits, near = prepared[i][1]
            choice = pick(logp, [h.score for h in hits], self.grounding.retrieval_prior)
            out[i] = (None, (None if choice == NONE else (choice, hits[choice - 1]), near))
        return out

    def finish(self, answer: Answer, context: tuple[list[Hit], list[Hit]]) -> Answer:
        """Cite the entry the answer came from (`context` = (the entries shown, near)): the shown entry its
        text overlaps most; offer the related entries of `near` other than it.

        A model decline (or its start, cut by max_new_tokens) of a question retrieval found in scope is
        answered with the top entry verbatim when `grounding.fallback` is on (measured: a small model declines
        rephrased questions it cannot match to an entry far more often than retrieval misses them)."""

        hits, near = context
        overlap = [rouge_l(answer.text, h.answer) for h in hits]
        best = max(range(len(hits)), key=overlap.__getitem__)
        decline = self.grounding.decline_message
        # a few words at least: "" or "I" cut short is no decline yet
        cut_decline = not answer.stopped and len(answer.text.split()) >= 3 and starts_decline(answer.text, decline)
        declined = cut_decline or opens_with_decline(answer.text, decline) or (
            overlap[best] < 0.3 and (is_decline(answer.text) or rouge_l(answer.text, decline) >= 0.5))
        if declined and self.grounding.fallback:
            top = hits[0]
            return replace(answer, text=top.answer, source={**top.citation(), "overlap": 1.0, "verbatim": True},
                           related=self.related(near, top))
        if declined:
            msg = self.grounding.decline_message
            return replace(answer, text=msg, source=None, declined=True, related=self.related(near, None))
        return replace(answer, source={**hits[best].citation(), "overlap": round(overlap[best], 4)},
                       related=self.related(near, hits[best]))


def related_hits(hits: list[Hit], threshold: float, margin: float = RELATED_MARGIN) -> list[Hit]:
    """The ranked `hits` close enough to offer as related questions: scoring within `margin` of the top one,
    and no more than `margin` below the decline threshold (a declined question's "did you mean")."""
    if not hits:
        return []
    floor = max(max(h.score for h in hits), threshold) - margin  # the max: `hybrid` ranks by fused rank
    return [h for h in hits if h.score >= floor]


def open_run_index(run_root: str | Path) -> FaqIndex | None:
    """The run's index when it was trained with grounding, else None."""
    root = RunDir(run_root).index_dir
    return FaqIndex(root) if (root / "index.json").exists() else None


def make_answerer(run_root: str | Path, model, tokenizer, cfg: FaqtuneConfig, grounded: bool = True) -> Answerer:
    """The run's answerer: grounded when the run was trained with retrieval (and `grounded`), else plain.

    A run that had an index (its folder is there, or it trained on grounded examples) whose index.json is gone
    is an error, never a bot that quietly answers without its FAQ. One that never had one (a plain PEFT
    adapter, a run from before grounding, an upload without its index) answers plainly, as it always did."""
    retrieves = grounded and cfg.grounding.mode == "retrieval"
    index = open_run_index(run_root) if retrieves else None
    run = RunDir(run_root)
    if index is None and retrieves and (run.index_dir.exists() or run.grounded_split.exists()):
        raise IndexError_(f"{run.index_dir}: no FAQ index (index.json), but this run answers from one; rebuild "
                          "it with `faqtune index FAQ --out DIR` (ask, chat and eval also take --no-grounding)")
    if index is None:
        return Answerer(model, tokenizer, cfg.generation, cfg.data.system_prompt)
    return GroundedAnswerer(model, tokenizer, cfg.generation, cfg.data.system_prompt, index, cfg)


def retrieval_only(index: FaqIndex, questions: list[str], threshold: float | None = None,
                   decline: str = "") -> list[Answer]:
    """Baseline (b): the top-1 entry's answer verbatim (a decline below `threshold` when given)."""
    out = []
    for hits in index.search_many(questions, k=1):
        top = hits[0] if hits else None
        if top is None or (threshold is not None and top.score < threshold):
            out.append(Answer(decline, True, 0, 0, decline, None, True))
        else:
            out.append(Answer(top.answer, True, 0, 0, top.answer, top.citation()))
    return out


def cite(answer) -> str:
    """One line naming the FAQ entry an answer came from (or why there is none)."""
    if answer.declined:
        return "source: none (no FAQ entry fits; declined)"
    if answer.source is None:
        return ""
    s = answer.source
    return f"source: FAQ entry #{s['id']} \"{s['question']}\" (similarity {s['score']:.2f})"


def offer(answer) -> str:
    """One line offering the related FAQ questions an answer came with ("did you mean" after a decline), or ''."""
    if not answer.related:
        return ""
    listed = "; ".join(f"#{r['id']} \"{r['question']}\"" for r in answer.related)
    return f"{'did you mean' if answer.declined else 'related'}: {listed}"
