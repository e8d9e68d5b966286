"""Training survives faults: kill -9, SIGINT/SIGTERM, a full disk, a non-finite loss; resumed runs end with
the adapter of the uninterrupted run: bit for bit within one process, to the last float bits across two
(see support.ACROSS_PROCESSES)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback

from faqtune.checkpoints import problem
from faqtune.cli import main
from faqtune.errors import TrainingStopped
from faqtune.train import train

from .support import ACROSS_PROCESSES, assert_same_adapter, error_line, sealed, train_config

pytestmark = pytest.mark.pipeline  # every test here trains the tiny Llama

HARNESS = Path(__file__).with_name("harness.py")


def start(argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    """`faqtune train` in a child process (see harness.py); stderr goes to `log` (a pipe could fill up)."""
    with log.open("w") as err:
        return subprocess.Popen([sys.executable, str(HARNESS), *argv], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, **env})


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def resume(run: Path) -> int:
    return main(["train", "--output", str(run), "--resume"])


def test_kill_9_mid_run_then_resume_equals_uninterrupted(train_argv, reference, tmp_path):
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = start(train_argv(run), log, HARNESS_STEP_SLEEP="0.2")
    wait_for(lambda: "checkpoint-4" in sealed(run) and logged_step(run) >= 6, proc, log)
    proc.kill()  # SIGKILL, between checkpoint-4 and checkpoint-8
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert sealed(run) == ["checkpoint-4"] and not (run / "adapter").exists()

    assert resume(run) == 0
    assert_same_adapter(run, reference, tolerance=ACROSS_PROCESSES)  # started in a child process
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == list(range(1, 11))  # steps 5-6+ logged once, not twice


@pytest.mark.parametrize("where", ["optimizer", "seal"])
def test_kill_9_while_writing_a_checkpoint_keeps_the_previous_one(train_argv, reference, tmp_path, capsys, where):
    """Killed halfway through checkpoint-8 (or with every file written but not sealed): checkpoint-4 stays
    usable even with save_total_limit=1, checkpoint-8 is named as partial and set aside on resume."""
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = start(train_argv(run, "--train.save_total_limit", "1"), log, HARNESS_KILL_AT=f"{where}:8")
    assert proc.wait(timeout=240) == -signal.SIGKILL, log.read_text()[-3000:]
    assert sealed(run) == ["checkpoint-4"]
    assert problem(run / "checkpoints" / "checkpoint-4") is None
    assert "partial" in problem(run / "checkpoints" / "checkpoint-8")

    assert resume(run) == 0
    err = capsys.readouterr().err
    assert "checkpoint-8 is partial" in err and "set aside as checkpoint-8.partial" in err
    assert "resuming from checkpoint-4" in err
    assert_same_adapter(run, reference, tolerance=ACROSS_PROCESSES)  # started in a child process
    assert sealed(run) == ["checkpoint-10"]  # rotation (limit 1) ran only once the new ones were sealed


def test_sigint_finishes_the_step_checkpoints_and_says_how_to_resume(train_argv, reference, tmp_path, capsys):
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = start(train_argv(run), log, HARNESS_STEP_SLEEP="0.2")
    wait_for(lambda: logged_step(run) >= 2, proc, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    line = error_line(log.read_text())
    last = sealed(run)[-1]
    assert int(last.split("-")[1]) in (2, 3, 4)  # the step running when the signal came, written at its end
    assert f"checkpoint saved to {run / 'checkpoints' / last}" in line
    assert f"faqtune train --output {run} --resume" in line
    assert not (run / "adapter").exists()

    assert resume(run) == 0
    assert_same_adapter(run, reference, tolerance=ACROSS_PROCESSES)  # started in a child process


class SignalAt(TrainerCallback):
    """Sends this process `signum` at the end of optimizer step `step`."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def stopped_by(argv: list[str], callback: TrainerCallback) -> TrainingStopped:
    """Train as `faqtune ARGV` would, with `callback` added (train's public hook); the TrainingStopped raised."""
    with pytest.raises(TrainingStopped) as info:
        train(train_config(argv), callbacks=(callback,))
    assert "\n" not in str(info.value)  # the CLI prints it as one `error: ` line
    return info.value


def test_sigterm_stops_after_the_step_with_a_checkpoint(train_argv, reference, tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed from the main thread only; SIGTERM would end the test run")
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    stopped = stopped_by(train_argv(run), SignalAt(3, signal.SIGTERM))
    assert stopped.exit_code == 128 + signal.SIGTERM  # what `faqtune train` exits with
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
    assert "SIGTERM: training stopped after step 3 of 10" in str(stopped) and "--resume" in str(stopped)
    assert sealed(run) == ["checkpoint-3"]

    assert resume(run) == 0
    assert_same_adapter(run, reference)


@pytest.mark.parametrize("failure", ["ENOSPC", "torch.save"])
def test_disk_full_while_checkpointing_names_the_path_and_keeps_the_previous(
        train_argv, reference, tmp_path, monkeypatch, capsys, failure):
    run = tmp_path / "run"
    if failure == "ENOSPC":
        original = Trainer._save_optimizer_and_scheduler

        def full(self, output_dir):
            if self.state.global_step == 8:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "optimizer.pt"))
            return original(self, output_dir)

        monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full)
    else:  # what torch really raises on a full disk, after a partial write
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if str(f).endswith(os.path.join("checkpoint-8", "optimizer.pt")):
                Path(f).write_bytes(b"PK\x03\x04 half a zip")
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                                   "PytorchStreamWriter failed writing file data/0: file write failed")
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)

    assert main(train_argv(run)) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{run / 'checkpoints' / 'checkpoint-8'}: cannot write the checkpoint" in line
    assert ("no space left on device" if failure == "ENOSPC" else "is the disk full?") in line
    assert f"the previous checkpoint {run / 'checkpoints' / 'checkpoint-4'} is intact" in line
    assert sealed(run) == ["checkpoint-4"] and problem(run / "checkpoints" / "checkpoint-4") is None
    assert not (run / "checkpoints" / "checkpoint-8").exists()  # the half-written one is removed
    monkeypatch.undo()

    assert resume(run) == 0
    assert_same_adapter(run, reference)


def test_disk_full_while_writing_the_adapter(train_argv, reference, tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    run = tmp_path / "run"
    original = PeftModel.save_pretrained

    def full(self, save_directory, *args, **kwargs):
        if str(save_directory).endswith(".adapter.tmp"):
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    assert main(train_argv(run)) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{run / 'adapter'}: cannot write (no space left on device)" in line and "--resume" in line
    assert not (run / ".adapter.tmp").exists() and not (run / "adapter").exists()
    assert problem(run / "checkpoints" / "checkpoint-10") is None
    monkeypatch.undo()

    assert resume(run) == 0
    assert "checkpoint-10 is the end of training: writing the adapter from it" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["steps"] == 10  # not one step past the end
    assert sealed(run) == ["checkpoint-4", "checkpoint-8", "checkpoint-10"]
    assert_same_adapter(run, reference)


class NanLossAt(TrainerCallback):
    """Makes optimizer step `step`'s loss nan: a forward hook turns the input embeddings into nan for that
    step's training forward passes only (evaluations run between steps)."""

    def __init__(self, step: int):
        self.step, self.hook = step, None

    @staticmethod
    def poison(module, inputs, output):
        return output * float("nan")

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.hook = model.get_input_embeddings().register_forward_hook(self.poison)

    def on_step_end(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(train_argv, tmp_path):
    run = tmp_path / "run"
    stopped = stopped_by(train_argv(run), NanLossAt(6))
    assert stopped.exit_code == 1
    assert "the loss is nan at step 6" in str(stopped)
    assert f"The last good checkpoint is {run / 'checkpoints' / 'checkpoint-4'}" in str(stopped)
    assert sealed(run) == ["checkpoint-4"] and not (run / "adapter").exists()


def test_huge_learning_rate_stops_with_finite_checkpoints(train_argv, tmp_path, capsys):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert main(train_argv(run, "--train.learning_rate", "1e30", "--train.save_steps", "1",
                           "--train.save_total_limit", "20")) == 1
    line = error_line(capsys.readouterr().err)
    assert "training stopped: the loss is" in line and " at step " in line and "learning_rate=1e+30" in line
    assert sealed(run)
    for name in sealed(run):
        weights = load_file(run / "checkpoints" / name / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), name


class PoisonWeightsAt(TrainerCallback):
    """Sets a trainable weight to inf in the optimizer step that ends at step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            next(p for p in model.parameters() if p.requires_grad).data.fill_(float("inf"))


def test_non_finite_weights_are_never_checkpointed(train_argv, tmp_path):
    run = tmp_path / "run"
    stopped = stopped_by(train_argv(run), PoisonWeightsAt(4))
    assert stopped.exit_code == 1
    assert "the adapter weights became nan/inf at step 4" in str(stopped)
    assert "checkpoint-4 was not written" in str(stopped)
    assert sealed(run) == [] and not (run / "checkpoints" / "checkpoint-4").exists()
