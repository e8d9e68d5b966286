"""Fixtures of the reliability suite: a small FAQ, the tiny-Llama training settings, and one uninterrupted
reference run that every faulted-then-resumed run must reproduce bit for bit.

(The suite is a package, so this conftest does not replace the root one in `sys.modules["conftest"]`.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import settings

from .support import SETTINGS

# On CI the fuzzers replay the same examples (no flaky builds); elsewhere each run explores new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def faq_file(tmp_path_factory) -> Path:
    rows = [{"question": f"How do I change setting number {i}?",
             "answer": f"Open the settings page, choose section {i} and press save."} for i in range(15)]
    path = tmp_path_factory.mktemp("reliability-faq") / "faq.json"
    path.write_text(json.dumps({"questions": rows}), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def train_argv(tiny_base, faq_file):
    """`faqtune train` arguments for a run in OUTPUT (extra settings appended)."""
    def argv(output: Path, *extra: str) -> list[str]:
        return ["train", "--base", str(tiny_base), "--data", str(faq_file), "--output", str(output),
                *SETTINGS, *extra]
    return argv


@pytest.fixture(scope="session")
def reference(train_argv, tmp_path_factory) -> Path:
    """The uninterrupted run (same seed, same settings)."""
    from faqtune.cli import main

    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_argv(run)) == 0
    return run
