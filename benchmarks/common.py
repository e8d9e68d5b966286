"""What every benchmark does with its figures: stamp them with the date, the commit and the machine measured,
and write them as JSON to benchmarks/results/<date><suffix>.json."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
OFFTOPIC_SETS = [DATA / "offtopic_heldout.txt", DATA / "offtopic_validation.txt"]  # never used for calibration


def heldout_parser(doc: str | None) -> argparse.ArgumentParser:
    """A retrieval benchmark's parser, with the options they all take: --name (its key in the results), --faq and
    --in-scope (held-out sets, read with `read_sets`)."""
    from faqtune import data as data_mod  # here: benchmarks measuring a bare process import this module

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--faq", default=str(data_mod.bundled_faq_path()))
    p.add_argument("--in-scope", action="append", required=True, help="held-out questions (jsonl: id, question)")
    return p


def read_sets(args: argparse.Namespace) -> tuple[list, list[str], dict[str, tuple[list[str], list[str]]]]:
    """(the FAQ's entries, its distinct answers, {set name: (questions, reference answers)}) of `heldout_parser`'s
    --faq and --in-scope."""
    from faqtune import data as data_mod

    entries = data_mod.load_faq(args.faq).entries
    return (entries, list(dict.fromkeys(e.answer for e in entries)),
            {Path(path).stem: read_heldout(path, entries) for path in args.in_scope})


def scratch_index(entries, overrides: dict | None = None):
    """The product's index of `entries` (`grounding.build_index`, its threshold calibrated), built in a temporary
    folder with the settings' defaults and `overrides` (dotted keys)."""
    import tempfile

    from faqtune.config import load_config
    from faqtune.grounding import build_index

    return build_index(Path(tempfile.mkdtemp()) / "index", entries, load_config(None, overrides or {}))


class DenseScores:
    """An index's own entry score (`FaqIndex._score`: w x cosine to the question + (1 - w) x [j x to question and
    answer as one text + (1 - j) x to the answer]) of a batch of query vectors against every entry, as one matrix
    (queries x entries)."""

    def __init__(self, index, entries):
        from faqtune.retrieval import embed, entry_text

        self.weight, self.joint_weight = index.question_weight, index.joint_weight
        self.questions = embed(index.embedder, [e.question for e in entries])
        self.answers = embed(index.embedder, [e.answer for e in entries])
        self.joint = embed(index.embedder, [entry_text(e) for e in entries]) if self.joint_weight else None

    def __call__(self, vecs):
        j, rest = self.joint_weight, vecs @ self.answers.T
        if j:
            rest = (1 - j) * rest + j * vecs @ self.joint.T
        return self.weight * vecs @ self.questions.T + (1 - self.weight) * rest


def read_heldout(path: str | Path, entries) -> tuple[list[str], list[str]]:
    """(questions, the answers of the entries they were written for) of a held-out JSONL set (id, question)."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["question"] for r in rows], [entries[r["id"]].answer for r in rows]


def ranked_figures(scores, entries, refs: list[str], kept, pool: list[str]) -> dict:
    """Top 1, top 1 under the threshold (`kept`: each question answered, not declined) and top-3 recall of a
    (questions x entries) score matrix, each question's reference answer in `refs`."""
    from faqtune.metrics import matches_own_answer

    top = (-scores).argsort(1)[:, :3]
    ok = [[matches_own_answer(entries[i].answer, ref, pool) for i in row] for row, ref in zip(top, refs, strict=True)]
    n = len(refs)
    return {"top1": round(sum(o[0] for o in ok) / n, 3),
            "top1_under_threshold": round(sum(o[0] and k for o, k in zip(ok, kept, strict=True)) / n, 3),
            "top3_recall": round(sum(any(o) for o in ok) / n, 3)}


def status_gib(key: str, pid: int | str = "self") -> float:
    """A memory figure of process `pid` (this one by default) from /proc/PID/status (VmRSS, VmHWM, ...) in GiB;
    0 where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def descendants() -> list[str]:
    """The pids of this process's live child processes and theirs."""
    out, todo = [], [str(os.getpid())]
    while todo:
        for children in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                kids = children.read_text().split()
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def pss_gib(pid: int | str = "self") -> float:
    """Process `pid`'s proportional set size in GiB (each page it shares with other processes, such as library
    code, counted as its share), from /proc/PID/smaps_rollup; 0 where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def tree_gib() -> tuple[float, float]:
    """What this process and its descendants hold, in GiB: (summed RSS, an upper bound: shared pages count in
    each process; summed PSS: shared pages split between them, the physical memory they take)."""
    pids = ["self", *descendants()]
    return sum(status_gib("VmRSS", p) for p in pids), sum(pss_gib(p) for p in pids)


def commit() -> str:
    """The short hash of the commit the working tree is on (empty outside git)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()


FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")  # those that decide bf16's speed


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return model, [f for f in FLAGS if f in flags]


def matmul_gflops(dtype_name: str, n: int = 1024, reps: int = 5) -> float:
    """Best-of-`reps` GFLOP/s of an n^3 matmul in fp32 or bf16 with torch's current threads."""
    import torch

    from faqtune.models import matmul_seconds

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    return round(2 * n**3 / matmul_seconds(dtype, (n, n, n), reps) / 1e9, 1)


@lru_cache(maxsize=1)
def machine() -> dict:
    """The machine a figure comes from: CPU model, the flags that decide bf16's speed, threads, and the
    measured fp32/bf16 matmul rates (on CPUs without native bf16, bf16 matmuls run ~100x slower)."""
    import torch

    model, flags = _cpu_model_and_flags()
    info = {"cpu": model, "flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    info["matmul_gflops"] = {d: matmul_gflops(d) for d in ("fp32", "bf16")}
    return info


def machine_line(info: dict | None = None) -> str:
    """One line naming the machine, for a benchmark's printed table."""
    info = info or machine()
    rates = info["matmul_gflops"]
    return (f"machine: {info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads; "
            f"{' '.join(info['flags']) or 'no avx2'}); matmul fp32 {rates['fp32']} / bf16 {rates['bf16']} GFLOP/s"
            + (f"; GPU {info['gpu']}" if info.get("gpu") else ""))


def write_result(result: dict, suffix: str = "") -> Path:
    """Add `date`, `commit` and `machine` when absent, write results/<date><suffix>.json, say where; returns
    the path."""
    result.setdefault("date", str(datetime.date.today()))
    result.setdefault("commit", commit())
    result.setdefault("machine", machine())
    out = ROOT / "benchmarks" / "results" / f"{result['date']}{suffix}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written: {out}")
    return out


def add_to_result(suffix: str, name: str, figures: dict) -> Path:
    """Put `figures` under faqs.<name> of today's results/<date><suffix>.json, keeping the other FAQs there
    (and the machine first recorded), with the commit of this run."""
    path = ROOT / "benchmarks" / "results" / f"{datetime.date.today()}{suffix}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.setdefault("faqs", {})[name] = figures
    result["commit"] = commit()
    result.pop("date", None)
    return write_result(result, suffix)
