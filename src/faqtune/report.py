"""The eval report (what `evaluate.evaluate_run` returns, report.json's shape) and its renderings: the summary,
report.md, report.json and PNG charts (matplotlib, headless)."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

OMIT = {"omit": True}  # a field report.json leaves out while it is None (not measured), rather than writing null


@dataclass
class Figures:
    """One side's figures: the tuned model, or the base with the adapter off (report.json's "tuned", "base")."""
    answer_accuracy: float
    mean_rouge_l: float
    mean_token_f1: float
    exact_match: float
    stop_rate: float  # answers that ended with EOS before max_new_tokens
    mean_answer_tokens: float
    template_leaks: int
    latency_p50_s: float
    latency_p95_s: float
    tokens_per_second: float
    answer_loss: float  # nats per reference answer token
    answer_perplexity: float
    offtopic_decline_rate: float
    false_decline_rate: float


@dataclass
class AnswerRow:
    """One answer to an eval question, scored against its reference."""
    answer: str
    match: bool  # closest of the FAQ's answers to its own reference (metrics.matches_own_answer)
    rouge_l: float
    token_f1: float
    exact: bool
    stopped: bool
    tokens: int
    seconds: float
    source: dict | None = None  # grounding: {"id", "question", "score", ...} of the FAQ entry it cites


@dataclass
class QuestionResult:
    question: str
    reference: str
    tuned: AnswerRow
    base: AnswerRow | None = field(default=None, metadata=OMIT)


@dataclass
class OfftopicAnswer:
    question: str
    tuned: str
    base: str | None = field(default=None, metadata=OMIT)


@dataclass
class ForgettingSide:
    general_text_perplexity: float
    general_instruction_rouge_l: float


@dataclass
class GeneralAnswer:
    question: str
    base: str
    tuned: str


@dataclass
class Forgetting:
    """General text and general instructions, base vs tuned (always measured: the base via the adapter off)."""
    base: ForgettingSide
    tuned: ForgettingSide
    perplexity_ratio: float  # tuned / base general-text perplexity
    general_instruction_rouge_drop: float
    threshold: float  # flagged when the perplexity rose by more than this share
    flagged: bool
    general_answers: list[GeneralAnswer]


@dataclass
class UngroundedFigures:
    answer_accuracy: float
    false_decline_rate: float


@dataclass
class RetrievalFigures:
    """Retrieval alone: the top-1 entry's answer verbatim, without and with the decline threshold."""
    answer_accuracy: float
    answer_accuracy_with_threshold: float
    offtopic_decline_rate: float
    false_decline_rate: float


@dataclass
class TopkRecall:
    k: int
    recall: float  # questions with their reference among the top k: the ceiling of a reader shown k


@dataclass
class GroundedFigures:
    answer_accuracy: float
    offtopic_decline_rate: float
    false_decline_rate: float


@dataclass
class Difference:
    """A question where retrieval alone (with the threshold) and the tuned reader differ."""
    question: str
    reference: str
    retrieval_only: str
    retrieval_match: bool
    tuned: str
    tuned_match: bool


@dataclass
class Grounding:
    """Retrieval alone, its top-k ceiling and the tuned reader side by side (a grounded run)."""
    threshold: float
    tuned_without_grounding: UngroundedFigures
    retrieval_only: RetrievalFigures
    retrieval_topk: TopkRecall | None  # None in reports written before it was measured
    tuned_grounded: GroundedFigures
    citations_right: float | None  # None when no answer cited an entry
    differences: list[Difference] = field(default_factory=list)
    # answered right, or the right entry offered as a related question (None in reports written before)
    related_reached: float | None = field(default=None, metadata=OMIT)


@dataclass
class FollowUpRow:
    turns: list[str]
    reference: str
    answer: str
    match: bool


@dataclass
class FollowUpSide:
    accuracy: float  # of the last answer of each conversation
    rows: list[FollowUpRow]


@dataclass
class FollowUps:
    conversations: int
    tuned: FollowUpSide
    retrieval_only: float | None = field(default=None, metadata=OMIT)  # grounded runs only
    retrieval_only_with_threshold: float | None = field(default=None, metadata=OMIT)
    base: FollowUpSide | None = field(default=None, metadata=OMIT)  # with --compare-base


@dataclass
class EvalReport:
    """One `faqtune eval`: report.json is `to_dict()`; `from_dict`/`load` read it back, older reports too (a field
    a report lacks reads as its default, else None: reports before grounding have no `grounding`, say)."""
    source: str
    questions_evaluated: int
    offtopic_questions: int
    tuned: Figures
    base: Figures | None  # with --compare-base
    grounding: Grounding | None
    follow_ups: FollowUps | None  # with --conversations
    forgetting: Forgetting
    per_question: list[QuestionResult]
    offtopic_answers: list[OfftopicAnswer]
    run_dir: str | None = field(default=None, metadata=OMIT)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        """Raises ValueError when `data` does not have a report's shape (an object where an object belongs...)."""
        return _read(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def to_dict(obj: Any) -> Any:
    """A report object as JSON-able dicts and lists, fields in their order; an OMIT field left out while None."""
    if is_dataclass(obj):
        return {f.name: to_dict(value) for f in fields(obj)
                if (value := getattr(obj, f.name)) is not None or not f.metadata.get("omit")}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def _read(hint: Any, value: Any) -> Any:
    """`value` (parsed JSON) as the type `hint`: dataclasses from objects, lists item by item, the rest as is."""
    if value is None:
        return None
    if isinstance(hint, types.UnionType):  # `X | None`
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {type(value).__name__}")
        return [_read(typing.get_args(hint)[0], v) for v in value]
    if not is_dataclass(hint):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"expected an object for {hint.__name__}, got {type(value).__name__}")
    hints = typing.get_type_hints(hint)
    kwargs = {}
    for f in fields(hint):
        if f.name in value:
            kwargs[f.name] = _read(hints[f.name], value[f.name])
        elif f.default is MISSING and f.default_factory is MISSING:
            kwargs[f.name] = None  # missing from an older (or hand-written) report
    return hint(**kwargs)


# (Figures field, label, format, higher is better)
FIGURES = [
    ("answer_accuracy", "answer accuracy", "{:.3f}", True),
    ("mean_rouge_l", "mean ROUGE-L", "{:.3f}", True),
    ("mean_token_f1", "mean token F1", "{:.3f}", True),
    ("exact_match", "exact match", "{:.3f}", True),
    ("stop_rate", "stop rate (EOS before max_new_tokens)", "{:.3f}", True),
    ("mean_answer_tokens", "mean answer length (tokens)", "{:.1f}", None),
    ("template_leaks", "answers leaking template markers", "{:d}", False),
    ("answer_loss", "answer loss (nats/token; the question alone, no FAQ entries)", "{:.3f}", False),
    ("answer_perplexity", "answer perplexity (the question alone)", "{:.2f}", False),
    ("offtopic_decline_rate", "off-topic questions declined", "{:.3f}", True),
    ("false_decline_rate", "in-scope questions declined", "{:.3f}", False),
    ("latency_p50_s", "latency p50 (s)", "{:.2f}", False),
    ("latency_p95_s", "latency p95 (s)", "{:.2f}", False),
    ("tokens_per_second", "generation tokens/s", "{:.1f}", True),
]
BAR_KEYS = ["answer_accuracy", "mean_rouge_l", "mean_token_f1", "exact_match", "stop_rate",
            "offtopic_decline_rate", "false_decline_rate"]


def _fmt(fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    return fmt.format(int(value)) if fmt == "{:d}" else fmt.format(value)


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mark(match: bool) -> str:
    return "✅" if match else "❌"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash must not stop the report
    return rows


def plot_losses(metrics: list[dict[str, Any]], out: Path) -> Path | None:
    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_comparison(report: EvalReport, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k.replace("_", " ") for k in BAR_KEYS]
    tuned = [getattr(report.tuned, k) for k in BAR_KEYS]
    base = [getattr(report.base, k) for k in BAR_KEYS] if report.base else None
    fig, ax = plt.subplots(figsize=(8, 3.8))
    xs = range(len(BAR_KEYS))
    width = 0.38 if base else 0.6
    if base:
        bars = ax.bar([x - width / 2 for x in xs], base, width, label="base", color="#9aa5b1")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    bars = ax.bar([x + (width / 2 if base else 0) for x in xs], tuned, width, label="tuned", color="#2f6fdf")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def summary(report: EvalReport) -> str:
    """The report's head: title, run, and the headline figures. report.md opens with it; `faqtune eval` prints it."""
    t, b, f = report.tuned, report.base, report.forgetting
    verdict = "**FORGETTING FLAGGED**" if f.flagged else "no forgetting flagged"
    return "\n".join([
        "# faqtune evaluation", "", f"Run: `{report.run_dir or ''}`", "",
        f"- **Answer accuracy {t.answer_accuracy:.2f}**" + (f" (base {b.answer_accuracy:.2f})" if b else "")
        + f" on {report.questions_evaluated} questions from `{report.source}`.",
        f"- Stops on its own in {t.stop_rate:.0%} of answers (mean {t.mean_answer_tokens:.0f} tokens); "
        f"{t.template_leaks} leak template markers.",
        f"- Declines {t.offtopic_decline_rate:.0%} of {report.offtopic_questions} off-topic questions; "
        f"declines {t.false_decline_rate:.0%} of in-scope ones.",
        f"- General-text perplexity {f.base.general_text_perplexity:.1f} -> {f.tuned.general_text_perplexity:.1f} "
        f"(x{f.perplexity_ratio:.2f}, threshold +{f.threshold:.0%}): {verdict}.",
    ])


def _figure_lines(t: Figures, b: Figures | None) -> list[str]:
    out = ["## Figures", "", "| figure | base | tuned | change |", "| --- | ---: | ---: | ---: |"]
    for key, label, fmt, _ in FIGURES:
        tv, bv = getattr(t, key), getattr(b, key) if b else None
        delta = "" if bv is None else (f"{int(tv - bv):+d}" if fmt == "{:d}" else f"{tv - bv:+.3f}")
        out.append(f"| {label} | {_fmt(fmt, bv)} | {_fmt(fmt, tv)} | {delta} |")
    return out


def _forgetting_lines(f: Forgetting) -> list[str]:
    out = ["", "## Forgetting", "", "| figure | base | tuned |", "| --- | ---: | ---: |",
           f"| general-text perplexity | {f.base.general_text_perplexity:.2f} | {f.tuned.general_text_perplexity:.2f} |",
           f"| general-instruction ROUGE-L | {f.base.general_instruction_rouge_l:.3f} | "
           f"{f.tuned.general_instruction_rouge_l:.3f} |", "",
           f"Flagged when perplexity rises more than {f.threshold:.0%}: **{'yes' if f.flagged else 'no'}**.",
           "", "| general instruction | base | tuned |", "| --- | --- | --- |"]
    return out + [f"| {_cell(g.question, 80)} | {_cell(g.base)} | {_cell(g.tuned)} |" for g in f.general_answers]


def _grounding_lines(g: Grounding | None) -> list[str]:
    """Retrieval alone, the retriever's top-k ceiling and the tuned reader, side by side, and where they differ."""
    if not g:
        return []
    r, t, k, u = g.retrieval_only, g.tuned_grounded, g.retrieval_topk, g.tuned_without_grounding
    out = ["", "## Retrieval alone vs the tuned reader", "",
           f"Decline threshold (top-1 similarity): {g.threshold:.3f}.", "",
           "| | answer accuracy | off-topic declined | in-scope declined |", "| --- | ---: | ---: | ---: |",
           f"| tuned, no retrieval | {u.answer_accuracy:.3f} | - | {u.false_decline_rate:.3f} |",
           f"| retrieval alone, top-1 verbatim | {r.answer_accuracy:.3f} | - | 0.000 |",
           f"| retrieval alone, top-1 verbatim, with the threshold | {r.answer_accuracy_with_threshold:.3f} | "
           f"{r.offtopic_decline_rate:.3f} | {r.false_decline_rate:.3f} |"]
    if k:
        out.append(f"| retrieval top-{k.k} recall (ceiling of a reader shown {k.k}) | {k.recall:.3f} | - | - |")
    out.append(f"| **tuned reader (grounded)** | **{t.answer_accuracy:.3f}** | {t.offtopic_decline_rate:.3f} | "
               f"{t.false_decline_rate:.3f} |")
    if g.related_reached is not None:
        out.append(f"| tuned reader, right entry answered or offered as a related question | "
                   f"{g.related_reached:.3f} | - | - |")
    differ = g.differences or []
    out += ["", f"Questions where retrieval alone (with the threshold) and the tuned reader differ: {len(differ)}."]
    if differ:
        out += ["", "| question | reference | retrieval alone | tuned reader |", "| --- | --- | --- | --- |"]
        out += [f"| {_cell(d.question, 80)} | {_cell(d.reference, 80)} | "
                f"{_mark(d.retrieval_match)} {_cell(d.retrieval_only, 80)} | "
                f"{_mark(d.tuned_match)} {_cell(d.tuned, 80)} |" for d in differ]
    return out


def _follow_up_lines(f: FollowUps | None) -> list[str]:
    """Follow-up accuracy: the last answer of each conversation."""
    if not f:
        return []
    out = ["", "## Follow-ups", "", f"{f.conversations} conversations; accuracy of the last answer:", "",
           "| | follow-up accuracy |", "| --- | ---: |"]
    if f.base is not None:
        out.append(f"| base | {f.base.accuracy:.3f} |")
    for value, label in ((f.retrieval_only, "retrieval alone, top-1 verbatim"),
                         (f.retrieval_only_with_threshold, "retrieval alone, with the threshold")):
        if value is not None:
            out.append(f"| {label} | {value:.3f} |")
    out += [f"| **tuned** | **{f.tuned.accuracy:.3f}** |", "",
            "| conversation | reference | tuned answer | match |", "| --- | --- | --- | --- |"]
    out += [f"| {_cell(' / '.join(r.turns), 100)} | {_cell(r.reference, 80)} | {_cell(r.answer)} | "
            f"{_mark(r.match)} |" for r in f.tuned.rows]
    return out


def _per_question_lines(report: EvalReport) -> list[str]:
    b = report.base
    head = "| # | question | reference | " + ("base answer | " if b else "") + "tuned answer | match |"
    out = ["", "## Per question", "", head, "|" + " --- |" * (5 + bool(b))]
    for i, row in enumerate(report.per_question, 1):
        base_cell = f"{_cell(row.base.answer)} | " if b else ""
        mark = _mark(row.tuned.match) + (f" (base {_mark(row.base.match)})" if b else "")
        out.append(f"| {i} | {_cell(row.question, 100)} | {_cell(row.reference)} | {base_cell}"
                   f"{_cell(row.tuned.answer)} | {mark} |")
    return out


def render_markdown(report: EvalReport, charts: dict[str, str]) -> str:
    out = [summary(report), ""]
    for name, title in (("comparison", "Base vs tuned"), ("losses", "Training curves")):
        if name in charts:
            out += [f"![{title}]({charts[name]})", ""]
    out += _figure_lines(report.tuned, report.base) + _forgetting_lines(report.forgetting)
    out += _grounding_lines(report.grounding) + _follow_up_lines(report.follow_ups) + _per_question_lines(report)
    out += ["", "## Off-topic questions", "", "| question | tuned answer |", "| --- | --- |"]
    out += [f"| {_cell(r.question, 80)} | {_cell(r.tuned)} |" for r in report.offtopic_answers]
    return "\n".join(out) + "\n"


def write_report(report: EvalReport, out_dir: str | Path, metrics_path: Path | None = None) -> Path:
    """Write report.json, report.md and the PNG charts into `out_dir`; returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts: dict[str, str] = {}
    if plot_losses(read_metrics(metrics_path) if metrics_path else [], out / "loss_curves.png"):
        charts["losses"] = "loss_curves.png"
    plot_comparison(report, out / "comparison.png")
    charts["comparison"] = "comparison.png"
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    md = out / "report.md"
    md.write_text(render_markdown(report, charts), encoding="utf-8")
    return md
