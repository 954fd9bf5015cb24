"""Progress as qemu-img shows it: ``    (xx.xx/100%)\\r`` lines, or a tqdm bar on a terminal."""

from __future__ import annotations

import sys


class Progress:
    """Counts bytes done out of a total and prints at most every 1%."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total = max(total, 0)
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._last = -100.0
        self._bar = None
        if not enabled:
            return
        if sys.stderr.isatty() and stream is None:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, unit="B", unit_scale=True, unit_divisor=1024,
                                 file=sys.stderr, leave=False)
                return
            except ImportError:
                pass
        self._print(0.0)

    def _print(self, pct: float) -> None:
        self.stream.write("    (%3.2f/100%%)\r" % pct)
        self.stream.flush()
        self._last = pct

    def update(self, n: int) -> None:
        if not self.enabled or n <= 0:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        pct = 100.0 * self.done / self.total if self.total else 100.0
        if pct - self._last >= 1.0:
            self._print(min(pct, 100.0))

    def finish(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        self._print(100.0)
        self.stream.write("\n")
        self.stream.flush()
        self.enabled = False
