"""The run directory: one place that knows where each artifact of a training run lives, loads its settings,
checks output paths and locks a run against a second writer."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from faqtune.config import FaqtuneConfig, load_config
from faqtune.errors import FaqtuneError, ModelError, one_line

LOCK_NAME = ".lock"


class RunDir:
    """Every artifact's place in a run directory: adapter/, tokenizer/, config.yaml, metrics.jsonl, tb/,
    checkpoints/, data/ (the split, what the model saw, the general-text mix), index/ (a grounded run's FAQ
    index), eval/ (`faqtune eval`'s reports), merged/ (`faqtune push --merged`'s model), summary.json."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    adapter_dir = property(lambda self: self.root / "adapter")
    tokenizer_dir = property(lambda self: self.root / "tokenizer")
    config_path = property(lambda self: self.root / "config.yaml")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    tb_dir = property(lambda self: self.root / "tb")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    train_split = property(lambda self: self.root / "data" / "train.jsonl")
    eval_split = property(lambda self: self.root / "data" / "eval.jsonl")
    mix_split = property(lambda self: self.root / "data" / "mix.jsonl")
    grounded_split = property(lambda self: self.root / "data" / "train_grounded.jsonl")  # what the model saw
    index_dir = property(lambda self: self.root / "index")
    eval_dir = property(lambda self: self.root / "eval")
    merged_dir = property(lambda self: self.root / "merged")
    summary_path = property(lambda self: self.root / "summary.json")
    lock_path = property(lambda self: self.root / LOCK_NAME)

    def has_adapter(self) -> bool:
        """Training finished: the adapter was written."""
        return is_adapter_folder(self.adapter_dir)

    def load_config(self, overrides: dict[str, Any] | None = None, trust_remote_code: bool = False) -> FaqtuneConfig:
        """The run's saved settings (+ `overrides`); `trust_remote_code` comes from the caller, never the file."""
        if not self.root.is_dir():
            raise FaqtuneError(f"{self.root}: no such run directory")
        if not self.config_path.exists():
            raise FaqtuneError(f"{self.root}: not a faqtune run directory (no config.yaml)")
        return load_saved_settings(self.config_path, overrides, trust_remote_code)


def is_adapter_folder(path: str | Path) -> bool:
    """An adapter is there: adapter_config.json at the folder's root (a run's adapter/, or what `faqtune push`
    uploads)."""
    return (Path(path) / "adapter_config.json").exists()


# settings added after runs were saved (train writes every setting): the value a saved file without one means
SAVED_BEFORE = {  # the run's index is rebuilt as it was trained:
    "grounding.joint_weight": 0.0,  # no joint vectors
    "grounding.embedder_epochs": 0,  # the embedder as shipped (the default until session 18)
}


def load_saved_settings(path: Path | None, overrides: dict[str, Any] | None = None,
                        trust_remote_code: bool = False) -> FaqtuneConfig:
    """Settings a run (config.yaml) or a pushed adapter (faqtune.yaml, maybe downloaded) carries.

    Such a file may come from anyone, so it cannot turn on `trust_remote_code` (which runs the base model's
    Python files): only the person at the command line can, with `--trust-remote-code`. A `true` in the file
    is ignored with a one-line warning."""
    cfg = load_config(path, overrides)
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) if path is not None else {}  # parsed above: no error
    if path is not None and not saved:
        raise FaqtuneError(f"{path}: no settings (damaged?); training writes every one, they cannot be guessed")
    for key, value in SAVED_BEFORE.items():  # a file saved before the setting existed means its old behaviour
        section, name = key.split(".")
        part = saved.get(section)  # saved is a mapping: load_config refused any other top level
        if isinstance(part, dict) and name not in part and key not in (overrides or {}):
            setattr(getattr(cfg, section), name, value)
    if cfg.trust_remote_code and not trust_remote_code:
        print(f"warning: {path}: `trust_remote_code: true` ignored (a run's saved settings cannot enable remote "
              "code; pass --trust-remote-code to allow it for this command)", file=sys.stderr)
    cfg.trust_remote_code = bool(trust_remote_code)
    return cfg


# ---- output paths -----------------------------------------------------------------------------------

MANAGED = ("adapter", "checkpoints", "tokenizer", "data", "tb", "index")  # folders a run's commands replace whole


def _outside_managed(path: Path, what: str, replaces: str = "") -> None:
    """Refuse a path inside, or being, a folder a run's commands replace whole (RUN/adapter/merged was deleted by
    the next `train --resume`; a merge into RUN/checkpoints/checkpoint-99 was renamed .partial; `eval --out
    RUN/index` by the next `index`); `replaces`: the one such folder this command writes itself (index's)."""
    parts = path.resolve().parts
    for i in range(1, len(parts)):
        if i == len(parts) - 1 and parts[i] == replaces:
            continue
        if parts[i] in MANAGED and _is_run(RunDir(Path(*parts[:i]))):
            raise FaqtuneError(f"{what} {path}: inside {Path(*parts[:i + 1])}, which faqtune replaces whole "
                               "(training, indexing); choose a path outside it")


def _is_run(run: RunDir) -> bool:
    """A training run (its settings, and its split, checkpoints or adapter): not any folder with a config.yaml."""
    return run.config_path.is_file() and any(p.exists() for p in (run.train_split, run.checkpoints_dir,
                                                                  run.adapter_dir))


RUN_HEADER = "# faqtune run settings, written by `faqtune train`; every command on this run reads them\n"


def holds_run(run: RunDir) -> bool:
    """`run.root` holds a run, finished or not: its config.yaml was written by `train` (RUN_HEADER), or, saved
    before that header, the run's layout is there. A config.yaml of the user's own is not a run's."""
    try:
        with open(run.config_path, encoding="utf-8", errors="replace") as f:
            if f.read(len(RUN_HEADER)) == RUN_HEADER:
                return True
    except OSError:  # none, or unreadable
        return False
    return _is_run(run)


def check_output(path: str | Path, kind: str = "dir", what: str = "output", replaces: str = "") -> Path:
    """Fail early, in one line naming the path, when `path` cannot be written: checked before any expensive
    work. `kind` "dir": an existing directory or one that can be created; "file": a file (not a directory)
    in such a directory. `replaces`: the run's folder this command may write (index: "index")."""
    path = Path(path)
    try:
        _outside_managed(path, what, replaces)
        exists = path.exists()
        if kind == "file":
            if path.is_dir():
                raise FaqtuneError(f"{what} {path}: is a directory, expected a file path")
            if exists and not os.access(path, os.W_OK):
                raise FaqtuneError(f"{what} {path}: the file is not writable")
            check_output(path.parent if str(path.parent) else Path("."), "dir", what)
            return path
        if exists and not path.is_dir():
            raise FaqtuneError(f"{what} {path}: is a file, expected a directory")
        if exists:
            if not _writable(path):
                raise FaqtuneError(f"{what} {path}: the directory is not writable")
            return path
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise FaqtuneError(f"{what} {path}: cannot be created, {ancestor} is a file")
        if not _writable(ancestor):
            raise FaqtuneError(f"{what} {path}: cannot be created, {ancestor} is not writable")
    except ValueError:  # e.g. a NUL byte in the path
        raise FaqtuneError(one_line(f"{what} {path}: not a valid path")) from None
    except OSError as e:  # e.g. a name too long
        raise FaqtuneError(one_line(f"{what} {path}: {e.strerror or e}")) from None
    return path


def share_as_umask(folder: Path) -> None:
    """Add to what faqtune wrote in `folder` the mode bits any other file gets (0o666 and 0o777 less the umask):
    safetensors writes its files 0600 through a temp file (safetensors/safetensors#782, since 0.8), so another
    user (a server's, a container's) could read the config but not the weights; a tempfile folder is 0700."""
    umask = _umask()
    for path in (folder, *folder.rglob("*")):  # bits added, none taken (a shared folder's setgid stays)
        if path.is_dir():
            path.chmod(path.stat().st_mode | (0o777 & ~umask))
        elif path.suffix == ".safetensors":
            path.chmod(path.stat().st_mode | (0o666 & ~umask))


def _umask() -> int:
    """The process umask, read without setting it where Linux shows it (os.umask sets it, for all threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _writable(folder: Path) -> bool:
    """A folder can be written in: tried (a folder made and removed), as os.access says yes to root on
    read-only mounts and /proc, where a merge failed after its work."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".faqtune-probe-", dir=folder))
    except OSError:
        return False
    return True


# ---- damaged run files ------------------------------------------------------------------------------

@contextlib.contextmanager
def named_damage(path: str | Path, what: str = "file", fix: str = "") -> Iterator[None]:
    """Turn a failure to read a run's file (truncated weights, bad JSON, unreadable tokenizer) into one line
    naming it, and how to `fix` it when given. Our own errors pass through unchanged."""
    try:
        yield
    except FaqtuneError:
        raise
    except Exception as e:  # safetensors, tokenizers, json and lancedb raise their own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(one_line(f"{path}: damaged or unreadable {what} ({first[:200]})"
                                  + (f"; {fix}" if fix else ""))) from e


def sibling_to_build(dest: Path, tag: str) -> Path:
    """A fresh hidden folder beside `dest` (same file system, so it can be renamed into place when whole), named
    for this process; those of the same `tag` left by killed processes (SIGKILL, power loss) are removed."""
    import shutil

    for stale in dest.parent.glob(f".{dest.name}.{tag}-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    fresh = dest.parent / f".{dest.name}.{tag}-{os.getpid()}"
    shutil.rmtree(fresh, ignore_errors=True)
    return fresh


# ---- the run lock -----------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _holder(lock: Path) -> tuple[int | None, str]:
    try:
        pid, _, host = lock.read_text(encoding="utf-8").strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError, UnicodeDecodeError):
        return None, ""


def _is_launcher_main() -> bool:
    """Whether this process takes the lock: the only one, or rank 0 of a torchrun/accelerate launch (the other
    processes of the same run share its directory)."""
    return os.environ.get("RANK", "0") in ("0", "")


@contextlib.contextmanager
def run_lock(root: str | Path, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold RUN/.lock (pid and host, created with O_EXCL) while a command writes into the run; a second
    writer is refused in one line naming the holder. A lock left by a dead process of this host is taken
    over with a note. An empty directory this created is removed again on the way out."""
    root = Path(root)
    if not _is_launcher_main():
        yield
        return
    check_output(root, "dir", "run directory")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lock = root / LOCK_NAME
    me, host = os.getpid(), socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, their_host = _holder(lock)
            if pid is not None and their_host == host and not _alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                (say or (lambda m: print(m, file=sys.stderr)))(
                    f"note: {lock}: left by process {pid}, which is no longer running; taken over")
                continue
            who = f"process {pid} on {their_host}" if pid is not None else "another process (unreadable lock)"
            raise FaqtuneError(f"{root} is in use by {who}: wait for it to finish, or remove {lock} if no faqtune "
                               "runs there") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{me} {host}\n")
        break
    else:
        raise FaqtuneError(f"{lock}: could not take the lock; remove it if no faqtune runs there")
    try:
        yield
    finally:
        if _holder(lock) == (me, host):
            with contextlib.suppress(OSError):
                lock.unlink()
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()  # only when empty: nothing was written
