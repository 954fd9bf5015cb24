"""qimg: a pure-Python qemu-img."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import QimgError  # noqa: F401


def open_image(filename: str, fmt: str | None = None, writable: bool = False, backing: bool = True):
    """Open an image with its backing chain as a ``Chain`` (a context manager)."""
    from .core.chain import Chain

    return Chain.open(filename, fmt, writable=writable, backing=backing)
