"""Interactive chat: a REPL with history over an Answerer; works on a terminal and on piped stdin."""

from __future__ import annotations

import sys
from typing import TextIO

from faqtune.errors import FaqtuneError
from faqtune.grounding import cite, offer

HELP = "commands: /reset clears the history, /exit (or Ctrl-D) quits"


def repl(bot, stdin: TextIO, stdout: TextIO, interactive: bool, max_turns: int = 4) -> int:
    """Read questions line by line and print answers; the last `max_turns` exchanges are kept as context."""
    history: list[tuple[str, str]] = []
    if interactive:
        print(f"faqtune chat. {HELP}", file=sys.stderr)
    n = 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        n += 1
        line = _read_line(stdin, n)
        if not line:
            break
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
        reply = bot.ask(question, history[-max_turns:])[0]
        answer = reply.text
        print(("bot> " if interactive else "") + answer, file=stdout, flush=True)
        for line in (cite(reply), offer(reply)) if interactive else ():
            if line:
                print(line, file=sys.stderr)
        history.append((question, answer))
    return 0


def _read_line(stdin: TextIO, n: int) -> str:
    """One line of input; bytes that are not UTF-8 are one error naming the line (a C locale reads them as
    surrogate escapes, a UTF-8 one raises)."""
    try:
        line = stdin.readline()
        line.encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise FaqtuneError(f"stdin line {n}: not valid UTF-8 text; check the terminal's or the file's encoding") \
            from None
    return line
