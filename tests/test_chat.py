"""The chat REPL: history, /reset, /exit, piped input."""

from __future__ import annotations

import io

from faqtune.chat import repl
from faqtune.generate import Answer, clean


class EchoBot:
    """Answers with the question and the number of history turns it was given."""

    def __init__(self):
        self.calls = []

    def ask(self, question, history):
        self.calls.append((question, list(history)))
        return [Answer(f"{question} ({len(history)})", True, 3, 10)]


def test_history_reset_and_exit():
    bot = EchoBot()
    stdin = io.StringIO("a\nb\n/reset\nc\n/exit\nnever\n")
    out = io.StringIO()
    assert repl(bot, stdin, out, interactive=False) == 0
    assert out.getvalue().splitlines() == ["a (0)", "b (1)", "c (0)"]
    assert bot.calls[1][1] == [("a", "a (0)")]


def test_history_is_bounded():
    bot = EchoBot()
    repl(bot, io.StringIO("".join(f"q{i}\n" for i in range(7))), io.StringIO(), interactive=False, max_turns=2)
    assert [len(h) for _, h in bot.calls] == [0, 1, 2, 2, 2, 2, 2]


def test_interactive_prompts():
    out = io.StringIO()
    repl(EchoBot(), io.StringIO("hello\n"), out, interactive=True)
    assert out.getvalue().startswith("you> bot> hello (0)")


def test_clean_cuts_template_markers():
    assert clean(" Refunds take 5 days.<|im_end|>\\n<|im_start|>user") == "Refunds take 5 days."
    assert clean("Yes.\n<human>: and then?") == "Yes."
    assert clean("  plain  ") == "plain"


def test_a_stdin_line_that_is_not_utf8_is_skipped_naming_it_and_the_chat_goes_on(capsys):
    """It ended the chat: every question after it was lost."""
    stdin = io.TextIOWrapper(io.BytesIO(b"a\ncaf\xe9?\nb\n"), encoding="utf-8", errors="surrogateescape")
    out = io.StringIO()
    assert repl(EchoBot(), stdin, out, interactive=False) == 1  # a script piping questions sees the skip
    assert out.getvalue().splitlines() == ["a (0)", "b (1)"]
    assert "stdin line 2: not valid UTF-8 text, skipped" in capsys.readouterr().err


def test_a_strict_stdin_that_is_not_utf8_is_one_error_naming_the_line():
    import pytest

    from faqtune.errors import FaqtuneError

    stdin = io.TextIOWrapper(io.BytesIO(b"a\ncaf\xe9?\n"), encoding="utf-8", errors="strict")
    with pytest.raises(FaqtuneError, match="not valid UTF-8"):
        repl(EchoBot(), stdin, io.StringIO(), interactive=False)


def test_chat_refuses_several_answers_a_turn_before_loading(tmp_path, capsys):
    """`chat --num-return-sequences 3` generated three answers a turn and showed the first, with no word."""
    from conftest import one_error_line

    from faqtune.cli import main
    from faqtune.config import FaqtuneConfig
    from faqtune.run import RUN_HEADER

    FaqtuneConfig(output_dir=str(tmp_path), base_model=str(tmp_path / "no-base")).save(tmp_path / "config.yaml",
                                                                                       RUN_HEADER)
    assert main(["chat", str(tmp_path), "--num-return-sequences", "3", "--temperature", "0.7"]) == 2
    assert one_error_line(capsys) == "error: chat answers once a turn: --num-return-sequences is for `faqtune ask`"
