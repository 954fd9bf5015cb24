"""Progress: the engine counts bytes and calls back; renderers draw what a caller picked.

The engine and the library only ever call ``callback(done, total)`` (bytes).  What a user sees is
chosen by the command line:

- ``QemuLines``: qemu-img's ``    (xx.xx/100%)\\r`` lines (stdout, when it is not a terminal), at
  least every 1%, 100% repeated at the end, then a newline -- what scripts such as KubeVirt CDI
  scrape with a regular expression;
- ``Bar``: a tqdm bar on a terminal (percentage, bytes done and total, rate, ETA), left in place;
  on a terminal of width 0 it keeps only the numbers;
- ``JsonLines``: one JSON object per line, ``{"done", "total", "elapsed", "rate"}``, at most ten a
  second, and a final line that adds ``"status"`` (a stable format, see the README).
"""

from __future__ import annotations

import sys
import time


class Tracker:
    """What the engine updates: bytes done out of a total, handed to ``callback(done, total)``."""

    def __init__(self, callback=None, total: int = 0):
        self.callback = callback
        self.total = max(total, 0)
        self.done = 0

    def update(self, n: int) -> None:
        if n <= 0:
            return
        self.done += n
        if self.callback is not None:
            self.callback(min(self.done, self.total) if self.total else self.done, self.total)

    def finish(self) -> None:
        """All done: the callback sees done == total once more."""
        self.done = self.total or self.done
        if self.callback is not None:
            self.callback(self.done, self.total)


def tracker(progress) -> Tracker | None:
    """What ops hand the engine: None, a Tracker (or anything with update/finish), or a plain callable."""
    if progress is None or hasattr(progress, "update"):
        return progress
    return Tracker(progress)


class QemuLines:
    """qemu-img's progress lines, printed at least every 1%."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self._last = -100.0
        self._print(0.0)

    def _print(self, pct: float) -> None:
        self.stream.write("    (%3.2f/100%%)\r" % pct)
        self.stream.flush()
        self._last = pct

    def __call__(self, done: int, total: int) -> None:
        if not total:
            return  # the size is not known yet (a raw stream): 100% comes at the end
        pct = 100.0 * done / total
        if pct - self._last >= 1.0:
            self._print(min(pct, 100.0))

    def close(self, status: str = "completed") -> None:
        if status == "completed":
            self._print(100.0)
        self.stream.write("\n")
        self.stream.flush()


class Bar:
    """A tqdm bar on a terminal: percentage, bytes done/total, rate and ETA; left in place at the end."""

    FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"
    NUMBERS = "{percentage:3.0f}% {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"

    def __init__(self, total: int, stream=None):
        from tqdm import tqdm

        stream = stream or sys.stderr
        width = _columns(stream)
        self._done = 0
        # a terminal of width 0 (a serial console, some CI logs) gets the numbers without a bar
        fmt = self.FORMAT if width else self.NUMBERS
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=stream, leave=True,
                         dynamic_ncols=bool(width), ncols=None if width else 0, bar_format=fmt,
                         mininterval=0.1)

    def __call__(self, done: int, total: int) -> None:
        if total != self._bar.total:
            self._bar.total = total
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done

    def close(self, status: str = "completed") -> None:
        self._bar.close()


def _columns(stream) -> int:
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80


class JsonLines:
    """One JSON object per line; at most ``per_second`` lines a second, and always a final line."""

    def __init__(self, stream=None, per_second: float = 10.0, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = clock()
        self.interval = 1.0 / per_second
        self._next = self.start
        self.done = 0
        self.total = 0

    def _record(self, status: str | None = None) -> dict:
        elapsed = max(self.clock() - self.start, 0.0)
        rec = {"done": self.done, "total": self.total, "elapsed": round(elapsed, 3),
               "rate": round(self.done / elapsed) if elapsed > 0 else 0}
        if status is not None:
            rec["status"] = status
        return rec

    def _emit(self, rec: dict) -> None:
        import json  # (here: only --progress=json needs it, and it costs 2 ms at start-up)

        self.stream.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.stream.flush()

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        now = self.clock()
        if now >= self._next:
            self._next = now + self.interval
            self._emit(self._record())

    def close(self, status: str = "completed") -> None:
        self._emit(self._record(status))


def status_line(done: int, total: int, elapsed: float) -> str:
    """One human line about a running copy (what SIGUSR1 prints)."""
    pct = 100.0 * done / total if total else 0.0
    rate = done / elapsed if elapsed > 0 else 0.0
    return f"{pct:.2f}% ({done}/{total} bytes, {rate / (1 << 20):.1f} MiB/s, {elapsed:.1f} s)"


class Progress(Tracker):
    """A Tracker drawing qemu-img's lines (or a tqdm bar when ``stream`` is None and stderr is a terminal);
    silent when not ``enabled``.  The commands other than convert use it as it is."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        super().__init__(None, total)
        self.enabled = enabled
        self._view = None
        if not enabled:
            return
        if stream is None and sys.stderr.isatty():
            try:
                self._view = Bar(self.total)
            except ImportError:
                pass
        if self._view is None:
            self._view = QemuLines(stream)
        self.callback = self._view

    def finish(self) -> None:
        if self._view is None:
            return
        super().finish()
        self._view.close()
        self._view = self.callback = None
