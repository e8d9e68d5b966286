"""The run directory: one place that knows where each artifact of a training run lives."""

from __future__ import annotations

from pathlib import Path

from faqtune.config import FaqtuneConfig, load_config
from faqtune.errors import FaqtuneError


class RunDir:
    """Paths inside a run directory: adapter/, tokenizer/, config.yaml, metrics.jsonl, tb/, checkpoints/, data/."""

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
    summary_path = property(lambda self: self.root / "summary.json")

    def load_config(self) -> FaqtuneConfig:
        if not self.root.is_dir():
            raise FaqtuneError(f"{self.root}: no such run directory")
        if not self.config_path.exists():
            raise FaqtuneError(f"{self.root}: not a faqtune run directory (no config.yaml)")
        return load_config(self.config_path)

    def last_checkpoint(self) -> Path | None:
        """Newest complete checkpoint (highest step holding trainer_state.json), or None."""
        if not self.checkpoints_dir.is_dir():
            return None
        done = [
            p for p in self.checkpoints_dir.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()
        ]
        return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)
