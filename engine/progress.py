"""A progress line on stderr for long operations with a known total (tensors, bytes, steps)."""

from __future__ import annotations

import sys
import time


class Progress:
    """`label: 12/40 tensors (30%) | 1.2 GB | 3.4 s`, redrawn in place at most twice a second."""

    def __init__(self, label: str, total: int, unit: str, *, enabled: bool = True):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.done, self.bytes = 0, 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        self.done += n
        self.bytes += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self.last >= 0.5 or self.done == self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        pct = 100 * self.done / max(self.total, 1)
        size = f" | {self.bytes / 1e9:.2f} GB" if self.bytes else ""
        sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%)"
                         f"{size} | {now - self.start:.1f} s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            if self.done != self.total:  # the last update drew the final state already
                self._draw(time.perf_counter())
            sys.stderr.write("\n")
