"""The error tree.  Every class carries the exit status qemu-img uses for it.

``cli.run`` is the one place that turns these into ``qimg: message`` and a status; library
callers catch them (all derive from :class:`QimgError`)::

    QimgError                    exit_code 1 unless noted
    +-- UsageError               a bad argument combination (the command line adds a --help hint)
    +-- InvalidArgument          a bad value given to a library call (also a ValueError)
    +-- OpenError                missing file, bad header, unknown driver or format
    |   +-- BackingChainError    a backing chain loops or is too deep
    |   +-- LockError            the image is in use (qimg.io.lock)
    +-- Unsupported              the format has no such operation
    |   +-- CheckUnsupported     check on a format without checks (exit_code 63)
    |   +-- ReadOnlyError        a write to an image opened read-only (also io.UnsupportedOperation)
    +-- CorruptImage             the image is damaged or hostile
    |   +-- LimitExceeded        a size or count read from an image exceeds its named limit
    +-- ClosedImage              an operation on a closed Image (also a ValueError)
    +-- Interrupted              the user interrupted the command (exit_code 130)

Warnings that qemu-img prints and goes on are issued as :class:`QimgWarning` through the
:mod:`warnings` module when a library call is given no ``warn`` callback.
"""

from __future__ import annotations

import io
from collections.abc import Iterable


class QimgError(Exception):
    """Base class: a one-line message and an exit code."""

    exit_code = 1
    #: lines reported before the error itself, as they are (a check's per-cluster findings): the
    #: layer that fails hands them up with the error and only ``cli.run`` writes them out
    diagnostics: tuple = ()

    def __init__(self, message: str, exit_code: int | None = None, diagnostics: Iterable[str] = ()):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
        if diagnostics:
            self.diagnostics = tuple(diagnostics)

    @property
    def message(self) -> str:
        """The one-line message (``str(error)``)."""
        return str(self)


#: separates the reports in one error message: each is printed as its own ``qimg: ...`` line, as
#: qemu-img does when it reports a failure and then the operation that failed
REPORT_SEP = "\x1e"


def reports(*messages: str) -> str:
    """One error message made of several reports (see REPORT_SEP)."""
    return REPORT_SEP.join(messages)


class UsageError(QimgError):
    """Bad command line: qemu-img adds a hint to run --help."""

    hint = True


class OpenError(QimgError):
    """An image could not be opened (missing file, bad header, unknown driver)."""


class Unsupported(QimgError):
    """The format has no such operation."""


class CorruptImage(QimgError):
    """The image is damaged or hostile: a field fails its limit or points outside the file."""


class LimitExceeded(CorruptImage):
    """A size or count read from an image is larger than the named limit allows."""


class BackingChainError(OpenError):
    """A backing chain loops or is deeper than allowed."""


class CheckUnsupported(Unsupported):
    """``check`` on a format without consistency checks (qemu-img exits 63)."""

    exit_code = 63


class InvalidArgument(QimgError, ValueError):
    """A value given to a library call is out of range (a negative offset or length, an unknown mode)."""


class ReadOnlyError(Unsupported, io.UnsupportedOperation):
    """A write to an image opened read-only."""


class ClosedImage(QimgError, ValueError):
    """An operation on an image that was closed."""


class QimgWarning(UserWarning):
    """A warning qemu-img prints and carries on after (probed raw formats, skipped snapshots...)."""


class WriteError(QimgError):
    """Writing the host file failed (a full disk, an I/O error).  The copy engine notes the guest offset
    of the write, so convert can report it as qemu-img does ("error while writing at byte N: ...")."""

    def __init__(self, message: str, exit_code: int | None = None, strerror: str | None = None):
        super().__init__(message, exit_code)
        self.strerror = strerror
        self.guest_offset: int | None = None


class Interrupted(QimgError):
    """The user interrupted the command."""

    exit_code = 130


def check_limit(name: str, value: int, limit: int, what: str = "") -> int:
    """Refuse ``value`` above ``limit`` (or negative) with a message naming the limit."""
    if value < 0 or value > limit:
        where = f" in {what}" if what else ""
        raise LimitExceeded(f"{name} {value}{where} exceeds the limit {limit}")
    return value
