"""`faqtune train` in a child process, with the faults the reliability tests inject from outside.

    python harness.py [faqtune train arguments]

It trains through `faqtune.train.train`, its faults passed as trainer callbacks (the public `callbacks`
hook), and ends as the CLI does: `error: ...` on stderr and the error's exit code.

Environment:
  HARNESS_STEP_SLEEP=S    sleep S seconds after each optimizer step (so a test can signal it mid-run)
  HARNESS_KILL_AT=WHERE:N SIGKILL this process while it writes checkpoint-N; WHERE is `optimizer` (adapter
                          written, optimizer/scheduler/RNG/state not) or `seal` (every file written, the
                          manifest not yet)
"""

from __future__ import annotations

import os
import signal
import sys
import time

from support import train_config  # run as a script: this folder is on sys.path
from transformers import Trainer, TrainerCallback

from faqtune.errors import FaqtuneError
from faqtune.train import train


class SlowSteps(TrainerCallback):
    """Sleeps after every optimizer step."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(where: str, step: int) -> None:
    """SIGKILL partway through writing checkpoint-`step`. No trainer callback runs while a checkpoint is
    written (`on_save` comes after faqtune sealed and rotated), so these two wrap transformers' writers:
    faqtune's `SafeCheckpoints._save_checkpoint` seals the folder once `Trainer._save_checkpoint` returns."""
    if where == "optimizer":
        save = Trainer._save_optimizer_and_scheduler

        def save_then_maybe_die(self, output_dir):
            if self.state.global_step == step:
                _die()
            return save(self, output_dir)

        Trainer._save_optimizer_and_scheduler = save_then_maybe_die
    elif where == "seal":
        save_checkpoint = Trainer._save_checkpoint

        def save_then_die_before_seal(self, model, trial):
            save_checkpoint(self, model, trial)
            if self.state.global_step == step:
                _die()

        Trainer._save_checkpoint = save_then_die_before_seal


def main(argv: list[str]) -> int:
    sleep = float(os.environ.get("HARNESS_STEP_SLEEP", "0"))
    where, _, step = os.environ.get("HARNESS_KILL_AT", "").partition(":")
    if where:
        install_kill(where, int(step))
    try:
        train(train_config(argv), callbacks=(SlowSteps(sleep),) if sleep else ())
    except FaqtuneError as e:  # reported as `faqtune train` reports it (cli.main)
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
