"""A served run picks up its rebuilt FAQ index without a restart.

`faqtune index FAQ --out RUN/index` builds the new index in a sibling folder and swaps it into place, so a
changed `index.json` (another inode, mtime or size) means a complete new index. The worker thread, the only
user of the answerer's index, checks before each batch (one os.stat; `every` can space the checks) and
reloads; an index that fails to load is reported once and the previous one is kept (as long as its files
are still there: the swap removes the old folder, so a batch that was searching it during the swap fails, and
the worker checks again before it answers that batch's requests one by one).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from faqtune.retrieval import FaqIndex

log = logging.getLogger("faqtune.serve")


class IndexWatcher:
    """Reloads a GroundedAnswerer's FaqIndex from `root` when its index.json changes."""

    def __init__(self, name: str, answerer, root: str | Path, every: float = 0.0):
        self.name, self.answerer, self.root, self.every = name, answerer, Path(root), every
        self.stamp = self._stamp()
        self.next_check = 0.0
        self.reloads = 0

    def _stamp(self) -> tuple | None:
        try:
            st = os.stat(self.root / "index.json")
        except OSError:
            return None  # mid-swap or removed: keep what is loaded
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def check(self) -> bool:
        """Reload when the index changed on disk; True when it did."""
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + self.every
        stamp = self._stamp()
        if stamp is None or stamp == self.stamp:
            return False
        self.stamp = stamp  # a broken index is reported once, not before every batch
        try:
            index = FaqIndex(self.root)
            size = len(index)
        except Exception as e:  # noqa: BLE001 -- any failure keeps the working index
            log.warning("%s: the FAQ index in %s changed but does not load (%s); still serving the previous one",
                        self.name, self.root, str(e).splitlines()[0] if str(e) else type(e).__name__)
            return False
        self.answerer.index = index
        if self.answerer.grounding.threshold is None:  # the run's threshold comes from its index
            self.answerer.threshold = index.threshold
        self.reloads += 1
        log.info("%s: reloaded the FAQ index from %s (%d entries)", self.name, self.root, size)
        return True
