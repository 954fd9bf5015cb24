"""amend: change format options of an existing image through the driver's ``amend`` hook."""

from __future__ import annotations

from ..core import registry
from ..errors import QimgError


def amend_help(fmt: str) -> str:
    cls = registry.get_driver(fmt)
    hook = getattr(cls, "amend_help", None)
    if hook is None:
        raise QimgError(f"Format driver '{fmt}' does not support option amendment")
    return hook()


def amend(filename: str, options: dict, fmt: str | None = None, force: bool = False, open_options=None,
          warn=None) -> None:
    drv = registry.open_image(filename, fmt, writable=True, options=open_options, warn=warn)
    try:
        hook = getattr(drv, "amend", None)
        if hook is None:
            raise QimgError(f"Format driver '{drv.format_name}' does not support option amendment")
        hook(options, force)
        drv.flush()
    finally:
        drv.close()
