"""`faqtune train` in a child process, with the faults the reliability tests inject from outside.

    python harness.py [faqtune train arguments]

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

from transformers import Trainer, TrainerCallback

import faqtune.checkpoints as checkpoints
import faqtune.train as train_mod
from faqtune.cli import main


class SlowSteps(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    sleep = float(os.environ.get("HARNESS_STEP_SLEEP", "0"))
    if sleep:
        build = train_mod._build_trainer

        def slow_build(*args, **kwargs):
            trainer = build(*args, **kwargs)
            trainer.add_callback(SlowSteps(sleep))
            return trainer

        train_mod._build_trainer = slow_build
    where, _, step = os.environ.get("HARNESS_KILL_AT", "").partition(":")
    if where == "optimizer":
        save = Trainer._save_optimizer_and_scheduler

        def save_then_maybe_die(self, output_dir):
            if self.state.global_step == int(step):
                _die()
            return save(self, output_dir)

        Trainer._save_optimizer_and_scheduler = save_then_maybe_die
    elif where == "seal":
        seal = checkpoints.seal

        def die_before_seal(folder):
            if folder.name == f"checkpoint-{step}":
                _die()
            return seal(folder)

        checkpoints.seal = die_before_seal


if __name__ == "__main__":
    install()
    sys.exit(main(sys.argv[1:]))
