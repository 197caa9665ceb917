"""A text progress bar for long operator commands (seed, rehydrate): no dependency, and it reads
well in CI logs too."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """A one-line text progress bar (on stderr by default), redrawn at most ten times a second."""

    def __init__(self, what: str, out: TextIO | None = None, width: int = 40) -> None:
        self.what = what
        self.out = out or sys.stderr
        self.width = width
        self._last = 0.0
        self._started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        share = done / total if total else 1.0
        filled = int(share * self.width)
        rate = done / max(now - self._started, 1e-9)
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if done >= total else ""
        self.out.write(f"\r[{bar}] {share:6.1%} {done}/{total} {self.what} ({rate:,.0f}/s){end}")
        self.out.flush()
