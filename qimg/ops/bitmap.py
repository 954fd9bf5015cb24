"""bitmap: change the persistent dirty bitmaps of an image, as qemu-img bitmap does."""

from __future__ import annotations

from ..core import registry
from ..errors import QimgError


def bitmap(filename: str, fmt: str | None, options: dict, name: str, actions: list, granularity: int | None,
           source: str | None = None, source_fmt: str | None = None, warn=None) -> None:
    """Run ``actions`` ((kind, argument) in command-line order) on bitmap ``name`` of the image."""
    drv = registry.open_image(filename, fmt, writable=True, options=options, warn=warn)
    try:
        src = registry.open_image(source, source_fmt, writable=False, warn=warn) if source else None
        try:
            if hasattr(drv, "edit_bitmap"):
                drv.edit_bitmap(name, actions, granularity, src)
            else:
                _unsupported(filename, name, actions)
        finally:
            if src is not None:
                src.close()
    finally:
        drv.close()


def _unsupported(filename: str, name: str, actions: list) -> None:
    """A format without persistent bitmaps: the first action fails with qemu-img's message."""
    kind, _arg = actions[0]
    if kind == "add":
        msg = f"Can't store persistent bitmaps to '{filename}': Operation not supported"
    else:
        msg = f"Dirty bitmap '{name}' not found"
    raise QimgError(f"Operation {kind} on bitmap {name} failed: {msg}")
