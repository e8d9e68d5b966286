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

    def last_checkpoint(self, checksums: bool = False) -> Path | None:
        """Newest complete checkpoint (sealed by its manifest; file sizes checked, hashes when `checksums`).

        Partial or corrupt ones are passed over; `checkpoints.scan` names them and why.
        """
        from faqtune.checkpoints import scan

        return scan(self.checkpoints_dir, checksums).usable
