"""Signals, as the command line (never the library) handles them.

SIGINT and SIGTERM unwind the running command (its ``finally`` blocks remove a partial target), then
qimg ends *by that signal*, so a shell sees 130 or 143 and a ``for`` loop stops as it does with
qemu-img.  SIGHUP does the same.  SIGUSR1 prints one progress line to stderr and the command goes on.
"""

from __future__ import annotations

import os
import signal
import sys
import time


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP raised in the main thread: every cleanup written for Ctrl-C runs for it too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _State:
    """What SIGUSR1 reports: the running command's progress, if it has any."""

    prog = "qimg"
    command = ""
    tracker = None
    started = 0.0


STATE = _State()


def watch(command: str, tracker) -> None:
    """Let SIGUSR1 report ``tracker`` (an engine Tracker) for ``command``."""
    STATE.command, STATE.tracker, STATE.started = command, tracker, time.monotonic()


def _terminate(signum, frame):
    raise Terminated(signum)


def _report(signum, frame):
    from ..engine.progress import status_line

    t = STATE.tracker
    if t is None:
        line = "no progress to report"
    else:
        line = status_line(min(t.done, t.total) if t.total else t.done, t.total, time.monotonic() - STATE.started)
    try:
        sys.stderr.write(f"{STATE.prog}: {STATE.command or 'progress'}: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def install(prog: str) -> None:
    """Called by ``qimg.cli.main`` only (``prog``: the name its lines start with)."""
    STATE.prog = prog
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    signal.signal(signal.SIGUSR1, _report)


def signal_of(exc: KeyboardInterrupt) -> int:
    return exc.signum if isinstance(exc, Terminated) else signal.SIGINT


def die_by(signum: int) -> None:
    """End the process by ``signum`` with its default action (the exit status a shell expects)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(1)  # the signal is delivered before this returns
    os._exit(128 + signum)
