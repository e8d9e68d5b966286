"""Checkpoints that survive faults: sealed by a manifest, verified before resuming, stopped cleanly.

The Trainer writes a checkpoint (adapter, optimizer, scheduler, RNG, trainer_state.json with the data
position) file by file; a crash, a full disk or `kill -9` can stop it halfway. So a checkpoint counts only
once faqtune has *sealed* it: every file fsynced, then `faqtune-manifest.json` (size and SHA-256 of each
file) written to a temporary name, fsynced and renamed into place, last. A folder without a manifest, or
whose files no longer match it, is partial or corrupt: it is named, set aside and the previous checkpoint
used. Older checkpoints are rotated away only after the new one is sealed, so one good checkpoint always
exists on disk. A resume keeps the settings the checkpoint was trained with (`check_resume_settings`).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# torch is imported where a tensor is touched, inside the Trainer's calls: this module is also imported without
# training (checkpoint checks, resume, the fast tests), and torch costs seconds to import.
from faqtune.config import FaqtuneConfig
from faqtune.data import FaqEntry, load_faq
from faqtune.errors import CheckpointError, FaqtuneError, TrainingStopped
from faqtune.run import LOCK_NAME, RUN_HEADER, RunDir, holds_run, load_saved_settings

MANIFEST = "faqtune-manifest.json"
PREFIX = "checkpoint-"
# What a resumable checkpoint holds (save_only_model=False): adapter, optimizer, scheduler, RNG, state.
REQUIRED = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
_CHUNK = 1 << 20


def checkpoint_step(path: Path) -> int | None:
    """`checkpoint-40` -> 40; None for anything else (e.g. a set-aside `checkpoint-40.partial`)."""
    tail = path.name[len(PREFIX):]
    return int(tail) if path.name.startswith(PREFIX) and tail.isdigit() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the data files were synced already
    finally:
        os.close(fd)


def seal(folder: Path) -> Path:
    """Mark a fully written checkpoint complete: fsync its files, then write the manifest atomically."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    tmp = folder / f".{MANIFEST}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump({"format": 1, "step": checkpoint_step(folder), "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    _fsync(folder)
    return folder / MANIFEST


def unseal(folder: Path) -> None:
    """Drop the manifest before a folder is (re)written, so a crash mid-write cannot pass for complete."""
    with contextlib.suppress(FileNotFoundError):
        (folder / MANIFEST).unlink()


def problem(folder: Path, checksums: bool = True) -> str | None:
    """Why `folder` is not a usable checkpoint, or None when it is (sizes always, hashes when `checksums`)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        return "partial: no manifest (the write did not finish, or a faqtune without manifests wrote it)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"corrupt: {MANIFEST} is unreadable"
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        return f"incomplete: the manifest lists no {', '.join(missing)}"
    for name, meta in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"corrupt: {name} is missing"
        if size != meta.get("size"):
            return f"corrupt: {name} is {size} bytes, the manifest says {meta.get('size')}"
        if checksums and _sha256(path) != meta.get("sha256"):
            return f"corrupt: {name} does not match its SHA-256 checksum"
    return None


@dataclass
class Scan:
    """The newest usable checkpoint, and the newer ones that were not usable (with the reason)."""

    usable: Path | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def describe(self) -> list[str]:
        return [f"{path}: {why}; skipped" for path, why in self.skipped]


def scan(checkpoints_dir: Path, checksums: bool = True) -> Scan:
    """Walk checkpoints newest first; stop at the first one that verifies."""
    out = Scan()
    if not checkpoints_dir.is_dir():
        return out
    found = sorted((p for p in checkpoints_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                   key=checkpoint_step, reverse=True)
    for path in found:
        why = problem(path, checksums)
        if why is None:
            out.usable = path
            break
        out.skipped.append((path, why))
    return out


def last_checkpoint(checkpoints_dir: Path, checksums: bool = False) -> Path | None:
    """Newest complete checkpoint (sealed by its manifest; file sizes checked, hashes when `checksums`).
    Partial or corrupt ones are passed over; `scan` names them and why."""
    return scan(checkpoints_dir, checksums).usable


def set_aside(path: Path) -> Path:
    """Rename a bad checkpoint out of the way (`checkpoint-40.partial`), so it is never mistaken or overwritten."""
    target = path.with_name(path.name + ".partial")
    try:
        if target.exists():
            shutil.rmtree(target)  # an older bad copy of the same step
        os.replace(path, target)
    except OSError:
        return path  # e.g. a read-only folder: left in place (unsealed, it is never resumed from)
    return target


def rotate(checkpoints_dir: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete the oldest sealed checkpoints beyond `keep` (never `protect`, the best one); returns them."""
    sealed = sorted((p for p in checkpoints_dir.iterdir()
                     if p.is_dir() and checkpoint_step(p) is not None and (p / MANIFEST).exists()),
                    key=checkpoint_step)
    doomed = [p for p in sealed[:-keep] if protect is None or p.resolve() != protect.resolve()] if keep else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def drop_set_aside(checkpoints_dir: Path, sealed_step: int) -> list[Path]:
    """Delete set-aside checkpoints (`checkpoint-N.partial`) of step N <= `sealed_step`, just sealed.

    A set-aside checkpoint is kept for a post-mortem only while it is the newest trace of the fault: once a
    checkpoint of the same or a later step is sealed, nothing can resume from or compare with it, and it
    costs a checkpoint's disk. One newer than every sealed checkpoint (the run has not got past it yet) stays."""
    doomed = []
    for p in checkpoints_dir.iterdir():
        step = p.name[len(PREFIX):-len(".partial")]
        if p.is_dir() and p.name.startswith(PREFIX) and p.name.endswith(".partial") and step.isdigit() \
                and int(step) <= sealed_step:
            shutil.rmtree(p, ignore_errors=True)
            doomed.append(p)
    return doomed


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _write_failure(exc: BaseException) -> str | None:
    """A short reason when `exc` is a failed file write (torch and safetensors do not raise OSError)."""
    if isinstance(exc, OSError):
        return "no space left on device" if exc.errno in _DISK_FULL else (exc.strerror or str(exc))
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) or type(exc).__name__ == "SafetensorError":
        if "no space" in text or "disk quota" in text:
            return "no space left on device"
        if "write" in text and "fail" in text:
            return "the write failed (is the disk full?)"
    return None


@contextlib.contextmanager
def named_write_errors(path: Path, advice: str = "", cleanup: Path | None = None) -> Iterator[None]:
    """Turn a failed write under `path` (disk full, I/O error) into a CheckpointError naming it."""
    try:
        yield
    except Exception as e:
        why = _write_failure(e)
        if why is None:
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise CheckpointError(f"{path}: cannot write ({why}){advice}") from e


def resume_point(checkpoints_dir: Path, say) -> Path:
    """The checkpoint to resume from; newer partial or corrupt ones are named (via `say`) and set aside."""
    found = scan(checkpoints_dir)
    for path, why in found.skipped:
        moved = set_aside(path)
        say(f"checkpoint {path.name} is {why}; " + (f"set aside as {moved.name}" if moved != path else "skipped")
            + (f", resuming from {found.usable.name}" if found.usable else ""))
    if found.usable is None:
        raise CheckpointError(f"{checkpoints_dir.parent}: --resume given but no checkpoint found in {checkpoints_dir}"
                              + (f"; {len(found.skipped)} partial or corrupt one(s) set aside" if found.skipped else ""))
    return found.usable


def forget_after(metrics_path: Path, step: int) -> int:
    """Drop the metrics.jsonl rows logged after `step`: a run resumed from checkpoint-`step` logs them again."""
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return 0

    def after(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError):
            return True  # a line cut short by the crash

    kept = [line for line in lines if not after(line)]
    if len(kept) < len(lines):
        tmp = metrics_path.with_name(metrics_path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, metrics_path)
    return len(lines) - len(kept)


def _previous(checkpoints_dir: Path, before: Path, why: str) -> str:
    fix = "free some space" if "disk" in why or "space" in why else "fix that"
    usable = scan(checkpoints_dir, checksums=False).usable
    if usable is not None and usable != before:
        return f"the previous checkpoint {usable} is intact; {fix} and resume with " \
               f"`faqtune train --output {checkpoints_dir.parent} --resume`"
    return f"no earlier checkpoint exists; {fix} and train again"


class SafeCheckpoints:
    """Trainer mixin: sealed checkpoints, rotation after sealing, named write errors, non-finite loss stops.

    Set `keep_checkpoints` (the run's `train.save_total_limit`) and give the Trainer `save_total_limit=None`:
    the Trainer's own rotation runs before faqtune seals, and could leave no complete checkpoint behind.
    """

    keep_checkpoints: int | None = None

    # Trainer has no public hook around writing a checkpoint (callbacks' on_save runs after it is written and
    # rotated), so sealing and named write errors override the private method. transformers' own answer to
    # half-written checkpoints (huggingface/transformers#35782, PR #35580) skips incomplete folders on resume
    # but still rotates before a checkpoint is complete.
    def _save_checkpoint(self, model, trial):
        import torch

        folder = Path(self._get_output_dir(trial)) / f"{PREFIX}{self.state.global_step}"
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise TrainingStopped(
                f"training stopped: the adapter weights became nan/inf at step {self.state.global_step} "
                f"({bad[0]}); {folder.name} was not written. {self._advice(folder.parent)}"
            )
        unseal(folder)
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                seal(folder)
        except Exception as e:
            why = _write_failure(e)
            if why is None:
                raise
            shutil.rmtree(folder, ignore_errors=True)  # half a checkpoint is useless, and the disk may be full
            raise CheckpointError(f"{folder}: cannot write the checkpoint ({why}); "
                                  f"{_previous(folder.parent, folder, why)}") from e
        if self.args.should_save:
            drop_set_aside(folder.parent, self.state.global_step)
        if self.args.should_save and self.keep_checkpoints:
            best = self.state.best_model_checkpoint
            rotate(folder.parent, self.keep_checkpoints, Path(best) if best else None)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # PEFT's load_adapter re-casts the adapter to fp32 (autocast_adapter_dtype), while TRL trains QLoRA
        # adapters in bf16 (trl sft_trainer, peft#2889): restore the trained dtype, or a resumed run
        # computes differently from an uninterrupted one.
        dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, param in self.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])

    def restore(self, checkpoint: Path):
        """Load a final checkpoint's adapter and state without training (nothing is left to train)."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        self._load_from_checkpoint(str(checkpoint))
        self.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        return TrainOutput(self.state.global_step, float("nan"), {})

    def training_step(self, model, inputs, num_items_in_batch=None):
        import torch

        loss = super().training_step(model, inputs, num_items_in_batch)
        # Checked before the optimizer step, so the weights (and the checkpoints) stay finite.
        if not torch.isfinite(loss).all():
            step = self.state.global_step + 1
            raise TrainingStopped(
                f"training stopped: the loss is {loss.float().mean().item()} at step {step} "
                f"(train.learning_rate={self.args.learning_rate:g} may be too high). "
                f"{self._advice(Path(self.args.output_dir))}"
            )
        return loss

    def _advice(self, checkpoints_dir: Path) -> str:
        usable = scan(checkpoints_dir, checksums=False).usable
        if usable is None:
            return "No checkpoint was written before it."
        return f"The last good checkpoint is {usable} (resume: `faqtune train --output {checkpoints_dir.parent} " \
               "--resume`)."


def is_final(checkpoint: Path, max_steps: int, epochs: float) -> bool:
    """Whether `checkpoint` ends the training that `max_steps` (or `epochs`, when max_steps <= 0) asks for."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        step, planned = int(state["global_step"]), int(state["max_steps"])
        same_plan = max_steps > 0 or int(state["num_train_epochs"]) == math.ceil(epochs)  # the Trainer ceils
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return step >= (max_steps if max_steps > 0 else planned) and same_plan


def _ignore_event(*args, **kwargs) -> None:
    return None


class GracefulStop:
    """On SIGINT/SIGTERM: finish the current optimizer step, write a checkpoint, then stop training.

    A Trainer callback without transformers' `TrainerCallback` as its base: importing that class imports
    transformers' trainer (torch, peft, bitsandbytes: ~10 s) into everything that imports this module. The
    Trainer calls each callback's `on_<event>` for every event; the ones other than `on_step_end` do nothing
    here, as in `TrainerCallback`."""

    def __init__(self):
        self.received: int | None = None

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return _ignore_event
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process must stop after the same step, or the others wait forever in the next all-reduce.
            flag = torch.tensor([0.0 if self.received is None else 1.0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and self.received is None:
                self.received = signal.SIGTERM  # another process was signalled
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now, without a checkpoint
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: finishing the current step and writing a checkpoint "
              f"({name} again stops at once, without one)", file=sys.stderr, flush=True)

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or 0)


@contextlib.contextmanager
def stop_on_signals(stop: GracefulStop) -> Iterator[None]:
    """Route SIGINT and SIGTERM to `stop` while training (main thread only, as Python requires)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def interrupted_message(stop: GracefulStop, state, checkpoints_dir: Path) -> str:
    usable = scan(checkpoints_dir, checksums=False).usable
    where = f"checkpoint saved to {usable}" if usable else "no checkpoint could be written"
    return (f"{signal.Signals(stop.received).name}: training stopped after step {state.global_step} of "
            f"{state.max_steps}; {where}. Resume with: faqtune train --output {checkpoints_dir.parent} --resume")


RESUMABLE = {"output_dir", "trust_remote_code", "train.epochs", "train.max_steps", "train.num_threads",
             "train.logging_steps", "train.eval_steps", "train.save_steps", "train.save_total_limit"}  # --resume may change


def check_resume_settings(cfg: FaqtuneConfig, saved_path: Path) -> None:
    """Refuse to resume with settings the checkpoint was not trained with (another `lora.r` cannot load; another
    `data.path` rewrote the run's splits and index over a run trained on the old ones): only `RESUMABLE` may
    change. Checked before anything of the run is written."""
    if not saved_path.exists():
        return
    # read as the resume read it (run.load_saved_settings: a run saved before a setting existed keeps its old
    # behaviour); trust_remote_code is resumable, so True only spares the file's warning a second time
    saved = load_saved_settings(saved_path, trust_remote_code=True)
    now = copy.deepcopy(cfg)
    now.make_paths_absolute()

    def flat(d: dict, prefix: str = "") -> dict:
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(f"{prefix}{k}", v)])}

    before, after = flat(saved.to_dict()), flat(now.to_dict())
    changed = [f"`{k}` ({before.get(k)!r} -> {after.get(k)!r})" for k in sorted(set(before) | set(after))
               if k not in RESUMABLE and before.get(k) != after.get(k)]
    if changed:
        raise FaqtuneError(f"--resume continues {saved_path.parent} with its own settings, but these differ from "
                           f"{saved_path}: {', '.join(changed)}; only {', '.join(sorted(RESUMABLE - {'output_dir'}))} "
                           "may change. Train into a new --output to change the others.")


def check_resume_split(run: RunDir, data_path: str, train_entries: list[FaqEntry],
                       eval_entries: list[FaqEntry]) -> None:
    """A resume trains on the split its checkpoint was trained on: an FAQ edited since reshuffles it (entries
    trained on would move into the held-out half), so that is refused before anything is written."""
    for path, entries in ((run.train_split, train_entries), (run.eval_split, eval_entries)):
        if not path.exists():  # no split saved to compare with
            continue
        saved = load_faq(path).entries if path.stat().st_size else []
        if [e.messages for e in saved] != [e.messages for e in entries]:
            raise FaqtuneError(f"{data_path} has changed since this run was trained (its split in {path} no longer "
                               "matches): resuming would train on another split; train the edited FAQ into a new "
                               "--output")


def check_run_dir(run: RunDir, resume: bool) -> None:
    """Refuse a directory holding a finished run (no `resume`) or files that are not a run's; checked before
    the base loads, and again as the directory is prepared."""
    theirs = [p for p in run.root.iterdir() if p.name != LOCK_NAME] if run.root.is_dir() else []
    if theirs and not resume:
        if run.has_adapter() or last_checkpoint(run.checkpoints_dir) is not None:
            raise FaqtuneError(
                f"{run.root} already holds a run; pass --resume to continue it or choose another --output"
            )
        if not holds_run(run):  # not an attempt that died before its first checkpoint: someone's folder
            raise FaqtuneError(f"{run.root} is not empty and holds no faqtune run (e.g. {sorted(theirs)[0].name}): "
                               "training writes data/, tb/, adapter/ and more there and would replace files of "
                               "yours; choose a new or empty --output")


def prepare_run_dir(cfg: FaqtuneConfig, run: RunDir, resume: bool) -> None:
    """The run directory made ready to train in (`check_run_dir`), its settings saved; a fresh start clears the
    logs of an attempt that died early."""
    check_run_dir(run, resume)
    run.root.mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh start: logs of an earlier attempt that died before its first checkpoint would mix in
        run.metrics_path.unlink(missing_ok=True)
        shutil.rmtree(run.tb_dir, ignore_errors=True)
    cfg.make_paths_absolute()  # `eval` (ids pair with the FAQ file) and `--resume` may run from elsewhere
    cfg.save(run.config_path, RUN_HEADER)
