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
