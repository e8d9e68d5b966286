"""The README cannot go stale (as litgpt's test_readme.py): its module map names every module, its run layout is
what a training run writes, and every command and flag it shows parses with the CLI's own parser."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from faqtune.cli import build_parser, parse_overrides
from faqtune.errors import ConfigError
from faqtune.run import RunDir

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SRC = ROOT / "src" / "faqtune"
# Written after training, by the command named on their README line.
LATER = {"eval/": "faqtune eval", "merged/": "faqtune push"}


def _section(title: str) -> str:
    """The text of a `## ` / `### ` section, up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def _code_block(text: str) -> str:
    match = re.search(r"```\w*\n(.*?)```", text, re.S)
    assert match
    return match.group(1)


# ---- the module map ----------------------------------------------------------------------------------------

def test_module_map_names_every_module_and_nothing_else():
    block = _code_block(_section("Architecture"))
    named, package = set(), ""
    for line in block.splitlines():  # `  serve/` opens a package; its modules are the more indented lines
        depth = len(line) - len(line.lstrip())
        if depth <= 2:
            package = m.group(1) + "/" if (m := re.match(r"\s*(\w+)/\s", line + " ")) else ""
        named |= {(package if depth > 2 else "") + n for n in re.findall(r"\b(\w+)\.py\b", line)}
    modules = {p.relative_to(SRC).with_suffix("").as_posix() for p in SRC.rglob("*.py")} - {"__main__"}
    modules = {m for m in modules if not m.endswith("__init__")}
    assert sorted(modules - named) == [], "modules missing from the README's module map"
    assert sorted(named - modules) == [], "the README's module map names modules that do not exist"


# ---- the run layout ----------------------------------------------------------------------------------------

def _documented_layout() -> dict[str, str]:
    """Entry (`adapter/`, `config.yaml`) -> its line, from the README's run-directory block (one entry a line)."""
    lines = _code_block(_section("The run directory")).splitlines()[1:]
    return {line.split()[0]: line for line in lines if line.strip()}


def _written(root: Path) -> set[str]:
    return {p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def evaluated_run(tiny_runs, tmp_path_factory):
    """A tiny grounded training run (2 steps), then `faqtune eval` on a copy of it: everything a run holds."""
    import shutil

    from faqtune.cli import main

    run = tmp_path_factory.mktemp("readme") / "run"
    shutil.copytree(tiny_runs("--train.max_steps", "2", "--train.save_steps", "1", "--lora.r", "4",
                              "--data.eval_fraction", "0.2"), run)
    assert main(["eval", str(run), "--limit", "1", "--max-new-tokens", "2"]) == 0
    return run


def test_run_layout_is_what_training_and_eval_write(evaluated_run):
    documented = _documented_layout()
    written = _written(evaluated_run)
    assert sorted(written - set(documented)) == [], "written by train/eval but not in the README's run layout"
    assert sorted(set(documented) - written) == sorted(set(LATER) - written)
    for entry, command in LATER.items():
        assert command in documented.get(entry, command), f"the README should say which command writes {entry}"
    data_line = documented["data/"]
    assert all(f in data_line for f in _written(evaluated_run / "data")), data_line
    run = RunDir(evaluated_run)  # every place RunDir knows is in a documented entry
    places = [getattr(run, name) for name in dir(RunDir) if isinstance(getattr(RunDir, name), property)]
    for path in places:
        top = path.relative_to(run.root).parts[0]
        assert top.startswith(".") or top in documented or top + "/" in documented, path


# ---- commands and flags ------------------------------------------------------------------------------------

def _fenced(text: str) -> tuple[list[str], str]:
    """(the code blocks, the text outside them)."""
    blocks, prose, current = [], [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
        else:
            prose.append(line)
    return blocks, "\n".join(prose)


BLOCKS, PROSE = _fenced(README)
SPANS = re.findall(r"`([^`\n]+)`", PROSE)
OTHER_TOOLS_FLAGS = {
    "--no-deps",  # pip's, in "installed with `--no-deps`"
    "--enable-lora", "--lora-modules", "--max-lora-rank", "--quantization",  # vLLM's, in the serve --backend paragraph
    "--section.key", "--key",  # the notation of "overridden ... as `--section.key value` (or `--key value` ...)"
}


def _commands() -> list[str]:
    """Every `faqtune ...` command line of the README's code blocks."""
    return [line for block in BLOCKS for line in block.splitlines() if re.search(r"(^\s*|\|\s*|-m\s+)faqtune\s", line)]


def _argv(command: str) -> list[str]:
    """The arguments after `faqtune` (also after `-m faqtune` or a pipe), with the README's notation undone:
    `[--opt X]` optional parts kept, `a|b|c` alternatives as their first."""
    words = shlex.split(command.replace("[", " ").replace("]", " "), comments=True)
    start = max(i for i, w in enumerate(words) if w == "faqtune") + 1
    argv = []
    for word in words[start:]:
        if word == "|":
            break
        argv.append(word.split("|")[0] if re.fullmatch(r"[\w.-]+(\|[\w.-]+)+", word) else word)
    return argv


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # argparse has no public walk
    return dict(subs.choices)


def test_inline_commands_name_real_subcommands():
    named = [span.split()[1] for span in SPANS if span.startswith("faqtune ") and len(span.split()) > 1]
    assert len(named) > 5 and sorted(set(named) - set(_subcommands())) == []


@pytest.mark.parametrize("command", _commands())
def test_readme_command_parses(command):
    parser = build_parser()
    argv = _argv(command)
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit:
        if "--help" in argv:
            return
        raise AssertionError(f"the CLI rejects the README's `faqtune {' '.join(argv)}`") from None
    assert args.command, command
    if args.command in ("train", "demo"):
        parse_overrides(extra)  # settings such as --train.epochs 4 exist (ConfigError otherwise)
    else:
        assert extra == [], f"`faqtune {args.command}` has no {extra}"


def test_every_flag_the_readme_shows_exists():
    """Each `--flag` the README shows for faqtune (in its commands, or alone in inline code): an option of some
    subcommand, or a setting (`--lora.r`, `--epochs`)."""
    shown = [w for command in _commands() for w in _argv(command)]
    shown += [w for span in SPANS if span.startswith(("--", "faqtune ")) for w in span.split()]
    flags = {m.group(1) for w in shown if (m := re.match(r"(--[a-z][\w.-]*)", w))} - OTHER_TOOLS_FLAGS
    options = {opt for p in _subcommands().values() for a in p._actions for opt in a.option_strings}
    unknown = []
    for flag in sorted(flags - options):
        try:
            parse_overrides([flag, "1"])
        except ConfigError:
            unknown.append(flag)
    assert unknown == [], "flags in the README that no command takes"
    assert len(flags) > 30  # the parser found the README's flags
