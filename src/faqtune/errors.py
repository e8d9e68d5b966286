"""The project's own errors: library code raises these, only the CLI turns them into exit codes."""

from __future__ import annotations


class FaqtuneError(Exception):
    """A mistake the user can fix; its message is one clear sentence (or a list of them)."""


class ConfigError(FaqtuneError):
    """Invalid configuration; carries every problem found, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class DataError(FaqtuneError):
    """Invalid input data, pointing at the file, the record and the field."""

    def __init__(self, file: str, message: str, record: str | None = None, field: str | None = None):
        self.file, self.record, self.field = str(file), record, field
        where = self.file + (f" {record}" if record else "")
        what = f"field '{field}': " if field else ""
        super().__init__(one_line(f"{where}: {what}{message}"))


def is_utf8(text: str) -> bool:
    """False for text holding a lone surrogate (undecodable bytes read with `surrogateescape`, "\\ud800" in JSON):
    no UTF-8 can carry it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def one_line(text: str) -> str:
    """Escape line breaks and other unprintable characters (user data can hold any), so a message stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ModelError(FaqtuneError):
    """A base model or adapter that cannot be found or loaded."""


class PromptTooLong(FaqtuneError):
    """A prompt (the question with its system prompt, FAQ entries and history) longer than the model's context."""


class CheckpointError(FaqtuneError):
    """A checkpoint or adapter that cannot be written or read (disk full, corrupt); names the path."""


class TrainingStopped(FaqtuneError):
    """Training stopped before its end (a signal, a non-finite loss); the message says how to go on."""

    def __init__(self, message: str, exit_code: int = 1):
        self.exit_code = exit_code
        super().__init__(message)
