"""Interactive chat: a REPL with history over an Answerer; works on a terminal and on piped stdin."""

from __future__ import annotations

import sys
from typing import TextIO

from faqtune.errors import FaqtuneError, PromptTooLong, is_utf8
from faqtune.grounding import cite, offer

HELP = "commands: /reset clears the history, /exit (or Ctrl-D) quits"


def repl(bot, stdin: TextIO, stdout: TextIO, interactive: bool, max_turns: int = 4) -> int:
    """Read questions line by line and print answers; the last `max_turns` exchanges are kept as context.
    A line that is not UTF-8, or too long for the model's context, is skipped with an error naming it, and the
    chat goes on; the exit code is then 1."""
    history: list[tuple[str, str]] = []
    if interactive:
        print(f"faqtune chat. {HELP}", file=sys.stderr)
    n, skipped = 0, 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        n += 1
        line = _read_line(stdin, n)
        if not line:
            break
        if not is_utf8(line):
            print(f"error: stdin line {n}: not valid UTF-8 text, skipped; check the terminal's or the file's "
                  "encoding", file=sys.stderr)
            skipped += 1
            continue
        question = line.strip()
        if not question:
            continue
        if question in ("/exit", "/quit"):
            break
        if question == "/reset":
            history.clear()
            if interactive:
                print("(history cleared)", file=sys.stderr)
            continue
        if question == "/help":
            print(HELP, file=sys.stderr)
            continue
        try:
            reply = bot.ask(question, history[-max_turns:])[0]
        except PromptTooLong as e:
            print(f"error: stdin line {n}: {e}; skipped", file=sys.stderr)
            skipped += 1
            continue
        answer = reply.text
        print(("bot> " if interactive else "") + answer, file=stdout, flush=True)
        for line in (cite(reply), offer(reply)) if interactive else ():
            if line:
                print(line, file=sys.stderr)
        history.append((question, answer))
    return 1 if skipped else 0


def _read_line(stdin: TextIO, n: int) -> str:
    """One line of input. Bytes that are not UTF-8 come back as surrogate escapes where stdin decodes with
    `surrogateescape` (`faqtune chat` sets it, as does a C locale); a strict stream raises on them, and cannot
    be read on after that, so that is one error naming the line."""
    try:
        return stdin.readline()
    except UnicodeDecodeError:
        raise FaqtuneError(f"stdin line {n}: not valid UTF-8 text; check the terminal's or the file's encoding") \
            from None

