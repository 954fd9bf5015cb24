"""qimg: a pure-Python qemu-img, as a command and as a library.

Open any disk image as a binary stream with :func:`qimg.open`, or run any qemu-img command as a
function (:func:`qimg.convert`, :func:`qimg.info`, ...).  Every error is a :class:`qimg.QimgError`
carrying the exit status qemu-img would use.

Importing ``qimg`` loads almost nothing: each public name is imported on first use.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (a few ms at start-up)

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "open": "qimg.api.image", "Image": "qimg.api.image", "Layer": "qimg.api.image",
    "ImageInfo": "qimg.api.results", "CheckResult": "qimg.api.results", "CompareResult": "qimg.api.outcomes",
    "MeasureResult": "qimg.api.outcomes", "CreateResult": "qimg.api.outcomes", "ConvertResult": "qimg.api.outcomes",
    "SnapshotInfo": "qimg.api.results", "MapEntry": "qimg.ops.map",
    "convert": "qimg.api.commands", "create": "qimg.api.commands", "info": "qimg.api.query",
    "check": "qimg.api.query", "compare": "qimg.api.commands", "map": "qimg.api.query",
    "measure": "qimg.api.commands", "commit": "qimg.api.edit", "rebase": "qimg.api.edit",
    "resize": "qimg.api.edit", "amend": "qimg.api.edit", "dd": "qimg.api.commands",
    "snapshot_create": "qimg.api.edit", "snapshot_apply": "qimg.api.edit",
    "snapshot_delete": "qimg.api.edit", "snapshot_list": "qimg.api.query",
    "QimgError": "qimg.errors", "UsageError": "qimg.errors", "InvalidArgument": "qimg.errors",
    "OpenError": "qimg.errors", "BackingChainError": "qimg.errors", "Unsupported": "qimg.errors",
    "CheckUnsupported": "qimg.errors", "ReadOnlyError": "qimg.errors", "CorruptImage": "qimg.errors",
    "LimitExceeded": "qimg.errors", "ClosedImage": "qimg.errors", "Interrupted": "qimg.errors",
    "QimgWarning": "qimg.errors", "LockError": "qimg.io.lock",
}

__all__ = [
    "BackingChainError", "CheckResult", "CheckUnsupported", "ClosedImage", "CompareResult", "ConvertResult",
    "CorruptImage", "CreateResult", "Image", "ImageInfo", "Interrupted", "InvalidArgument", "Layer",
    "LimitExceeded", "LockError", "MapEntry", "MeasureResult", "OpenError", "QimgError", "QimgWarning",
    "ReadOnlyError", "SnapshotInfo", "Unsupported", "UsageError", "amend", "check", "commit", "compare",
    "convert", "create", "dd", "info", "map", "measure", "open", "rebase", "resize", "snapshot_apply",
    "snapshot_create", "snapshot_delete", "snapshot_list", "__version__",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from .api.commands import compare, convert, create, dd, measure
    from .api.edit import amend, commit, rebase, resize, snapshot_apply, snapshot_create, snapshot_delete
    from .api.image import Image, Layer, open
    from .api.outcomes import CompareResult, ConvertResult, CreateResult, MeasureResult
    from .api.query import check, info, map, snapshot_list
    from .api.results import CheckResult, ImageInfo, SnapshotInfo
    from .errors import (
        BackingChainError,
        CheckUnsupported,
        ClosedImage,
        CorruptImage,
        Interrupted,
        InvalidArgument,
        LimitExceeded,
        OpenError,
        QimgError,
        QimgWarning,
        ReadOnlyError,
        Unsupported,
        UsageError,
    )
    from .io.lock import LockError
    from .ops.map import MapEntry


def __getattr__(name: str) -> object:
    """Import a public name's module on first use (keeps ``import qimg`` cheap)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qimg' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
