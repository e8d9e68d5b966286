"""Render an evaluation (from `evaluate.evaluate_run`) as report.md + report.json + PNG charts (headless)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# (key, label, format, higher is better)
FIGURES = [
    ("answer_accuracy", "answer accuracy", "{:.3f}", True),
    ("mean_rouge_l", "mean ROUGE-L", "{:.3f}", True),
    ("mean_token_f1", "mean token F1", "{:.3f}", True),
    ("exact_match", "exact match", "{:.3f}", True),
    ("stop_rate", "stop rate (EOS before max_new_tokens)", "{:.3f}", True),
    ("mean_answer_tokens", "mean answer length (tokens)", "{:.1f}", None),
    ("template_leaks", "answers leaking template markers", "{:d}", False),
    ("answer_loss", "answer loss (nats/token)", "{:.3f}", False),
    ("answer_perplexity", "answer perplexity", "{:.2f}", False),
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


def plot_comparison(report: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k.replace("_", " ") for k in BAR_KEYS]
    tuned = [report["tuned"][k] for k in BAR_KEYS]
    base = [report["base"][k] for k in BAR_KEYS] if report.get("base") else None
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


def _summary_lines(report: dict[str, Any]) -> list[str]:
    t, b, f = report["tuned"], report.get("base"), report["forgetting"]
    lines = [f"- **Answer accuracy {t['answer_accuracy']:.2f}**" + (f" (base {b['answer_accuracy']:.2f})" if b else "")
             + f" on {report['questions_evaluated']} questions from `{report['source']}`."]
    lines.append(f"- Stops on its own in {t['stop_rate']:.0%} of answers (mean {t['mean_answer_tokens']:.0f} tokens); "
                 f"{t['template_leaks']} leak template markers.")
    lines.append(f"- Declines {t['offtopic_decline_rate']:.0%} of {report['offtopic_questions']} off-topic questions; "
                 f"declines {t['false_decline_rate']:.0%} of in-scope ones.")
    verdict = "**FORGETTING FLAGGED**" if f["flagged"] else "no forgetting flagged"
    lines.append(f"- General-text perplexity {f['base']['general_text_perplexity']:.1f} -> "
                 f"{f['tuned']['general_text_perplexity']:.1f} (x{f['perplexity_ratio']:.2f}, threshold "
                 f"+{f['threshold']:.0%}): {verdict}.")
    return lines


def _grounding_lines(g: dict[str, Any] | None) -> list[str]:
    """Retrieval alone, the retriever's top-k ceiling and the tuned reader, side by side, and where they differ."""
    if not g:
        return []
    r, t, k = g["retrieval_only"], g["tuned_grounded"], g.get("retrieval_topk")
    out = ["", "## Retrieval alone vs the tuned reader", "",
           f"Decline threshold (top-1 similarity): {g['threshold']:.3f}.", "",
           "| | answer accuracy | off-topic declined | in-scope declined |", "| --- | ---: | ---: | ---: |",
           f"| tuned, no retrieval | {g['tuned_without_grounding']['answer_accuracy']:.3f} | - | "
           f"{g['tuned_without_grounding']['false_decline_rate']:.3f} |",
           f"| retrieval alone, top-1 verbatim | {r['answer_accuracy']:.3f} | - | 0.000 |",
           f"| retrieval alone, top-1 verbatim, with the threshold | {r['answer_accuracy_with_threshold']:.3f} | "
           f"{r['offtopic_decline_rate']:.3f} | {r['false_decline_rate']:.3f} |"]
    if k:
        out.append(f"| retrieval top-{k['k']} recall (ceiling of a reader shown {k['k']}) | {k['recall']:.3f} | - | - |")
    out.append(f"| **tuned reader (grounded)** | **{t['answer_accuracy']:.3f}** | {t['offtopic_decline_rate']:.3f} | "
               f"{t['false_decline_rate']:.3f} |")
    differ = g.get("differences") or []
    out += ["", f"Questions where retrieval alone (with the threshold) and the tuned reader differ: {len(differ)}."]
    if differ:
        out += ["", "| question | reference | retrieval alone | tuned reader |", "| --- | --- | --- | --- |"]
        out += [f"| {_cell(d['question'], 80)} | {_cell(d['reference'], 80)} | "
                f"{'✅' if d['retrieval_match'] else '❌'} {_cell(d['retrieval_only'], 80)} | "
                f"{'✅' if d['tuned_match'] else '❌'} {_cell(d['tuned'], 80)} |" for d in differ]
    return out


def _follow_up_lines(f: dict[str, Any] | None) -> list[str]:
    """Follow-up accuracy: the last answer of each conversation."""
    if not f:
        return []
    out = ["", "## Follow-ups", "", f"{f['conversations']} conversations; accuracy of the last answer:", "",
           "| | follow-up accuracy |", "| --- | ---: |"]
    if "base" in f:
        out.append(f"| base | {f['base']['accuracy']:.3f} |")
    for key, label in (("retrieval_only", "retrieval alone, top-1 verbatim"),
                       ("retrieval_only_with_threshold", "retrieval alone, with the threshold")):
        if key in f:
            out.append(f"| {label} | {f[key]:.3f} |")
    out += [f"| **tuned** | **{f['tuned']['accuracy']:.3f}** |", "",
            "| conversation | reference | tuned answer | match |", "| --- | --- | --- | --- |"]
    out += [f"| {_cell(' / '.join(r['turns']), 100)} | {_cell(r['reference'], 80)} | {_cell(r['answer'])} | "
            f"{'✅' if r['match'] else '❌'} |" for r in f["tuned"]["rows"]]
    return out


def render_markdown(report: dict[str, Any], charts: dict[str, str]) -> str:
    t, b = report["tuned"], report.get("base")
    out = ["# faqtune evaluation", "", f"Run: `{report.get('run_dir', '')}`", "", *_summary_lines(report), ""]
    for name, title in (("comparison", "Base vs tuned"), ("losses", "Training curves")):
        if name in charts:
            out += [f"![{title}]({charts[name]})", ""]
    out += ["## Figures", "", "| figure | base | tuned | change |", "| --- | ---: | ---: | ---: |"]
    for key, label, fmt, _ in FIGURES:
        bv = b[key] if b else None
        delta = "" if bv is None else (f"{int(t[key] - bv):+d}" if fmt == "{:d}" else f"{t[key] - bv:+.3f}")
        out.append(f"| {label} | {_fmt(fmt, bv)} | {_fmt(fmt, t[key])} | {delta} |")
    f = report["forgetting"]
    out += ["", "## Forgetting", "", "| figure | base | tuned |", "| --- | ---: | ---: |",
            f"| general-text perplexity | {f['base']['general_text_perplexity']:.2f} | "
            f"{f['tuned']['general_text_perplexity']:.2f} |",
            f"| general-instruction ROUGE-L | {f['base']['general_instruction_rouge_l']:.3f} | "
            f"{f['tuned']['general_instruction_rouge_l']:.3f} |", "",
            f"Flagged when perplexity rises more than {f['threshold']:.0%}: **{'yes' if f['flagged'] else 'no'}**.",
            "", "| general instruction | base | tuned |", "| --- | --- | --- |"]
    out += [f"| {_cell(g['question'], 80)} | {_cell(g['base'])} | {_cell(g['tuned'])} |" for g in f["general_answers"]]
    out += _grounding_lines(report.get("grounding")) + _follow_up_lines(report.get("follow_ups"))
    out += ["", "## Per question", ""]
    head = "| # | question | reference | " + ("base answer | " if b else "") + "tuned answer | match |"
    out += [head, "|" + " --- |" * (5 + bool(b))]
    for i, row in enumerate(report["per_question"], 1):
        base_cell = f"{_cell(row['base']['answer'])} | " if b else ""
        mark = "✅" if row["tuned"]["match"] else "❌"
        if b:
            mark += " (base " + ("✅" if row["base"]["match"] else "❌") + ")"
        out.append(f"| {i} | {_cell(row['question'], 100)} | {_cell(row['reference'])} | {base_cell}"
                   f"{_cell(row['tuned']['answer'])} | {mark} |")
    out += ["", "## Off-topic questions", "", "| question | tuned answer |", "| --- | --- |"]
    out += [f"| {_cell(r['question'], 80)} | {_cell(r['tuned'])} |" for r in report["offtopic_answers"]]
    return "\n".join(out) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path, metrics_path: Path | None = None) -> Path:
    """Write report.json, report.md and the PNG charts into `out_dir`; returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts: dict[str, str] = {}
    if plot_losses(read_metrics(metrics_path) if metrics_path else [], out / "loss_curves.png"):
        charts["losses"] = "loss_curves.png"
    plot_comparison(report, out / "comparison.png")
    charts["comparison"] = "comparison.png"
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    md = out / "report.md"
    md.write_text(render_markdown(report, charts), encoding="utf-8")
    return md
