"""bitmap: change the persistent dirty bitmaps of an image, as qemu-img bitmap does."""

from __future__ import annotations

from ..core import registry


def bitmap(filename: str, fmt: str | None, options: dict, name: str, actions: list, granularity: int | None,
           source: str | None = None, source_fmt: str | None = None, warn=None, policy=None) -> None:
    """Run ``actions`` ((kind, argument) in command-line order) on bitmap ``name`` of the image.

    Like qemu-img, the images open without their backing files."""
    drv = registry.open_image(filename, fmt, writable=True, options=options, warn=warn, policy=policy)
    try:
        src = registry.open_image(source, source_fmt, writable=False, warn=warn, policy=policy) if source else None
        try:
            drv.edit_bitmap(name, actions, granularity, src)
        finally:
            if src is not None:
                src.close()
    finally:
        drv.close()

