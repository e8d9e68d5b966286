"""What every benchmark does with its figures: stamp them with the date and the commit measured, and write
them as JSON to benchmarks/results/<date><suffix>.json."""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The short hash of the commit the working tree is on (empty outside git)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()


def write_result(result: dict, suffix: str = "") -> Path:
    """Add `date` and `commit` when absent, write results/<date><suffix>.json, say where; returns the path."""
    result.setdefault("date", str(datetime.date.today()))
    result.setdefault("commit", commit())
    out = ROOT / "benchmarks" / "results" / f"{result['date']}{suffix}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written: {out}")
    return out
