"""Checks and conversions of the arguments the commands share (cache modes, ``-o``, ``-l``, progress).

The command line and the library call the same checks, so both refuse the same things with the
same message.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import QimgError

#: qemu-img's -t / -T cache modes
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")

#: what ``progress=`` takes: a ``callable(done, total)`` (bytes)
ProgressCallback = Callable[[int, int], None]


def check_cache(mode: str | None, what: str = "cache", exit_code: int = 1) -> None:
    """-t (what="cache") or -T (what="source cache"): qemu-img's message."""
    if mode is not None and mode not in CACHE_MODES:
        raise QimgError(f"Invalid {what} option: {mode}", exit_code)


def check_src_cache(mode: str | None, exit_code: int = 1) -> None:
    """-T: qemu-img names it the source cache option."""
    check_cache(mode, "source cache", exit_code)


def refuse_shared_write(filename: str) -> None:
    """force-share (-U) is for read-only opens: a repair or a snapshot change refuses it."""
    raise QimgError(f"Could not open '{filename}': force-share=on can only be used with read-only images")


def as_opts(options: dict[str, Any] | str | list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """``-o`` options from a dict, a ``"k=v,k2=v2"`` string or a list of such strings (merged as -o
    given several times)."""
    from ..options import merge_opts

    if options is None:
        return {}
    if isinstance(options, dict):
        return {str(k): _opt_text(v) for k, v in options.items()}
    if isinstance(options, str):
        options = [options]
    return merge_opts(list(options))


def _opt_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def snapshot_spec(param: str | dict | None, strict: bool = True) -> dict | None:
    """``-l``: "snapshot.id=..,snapshot.name=.." or a plain id or name, as a snapshot spec dict.

    ``strict`` (convert) refuses other ``snapshot.`` keys as qemu-img 7.2 does."""
    if param is None or isinstance(param, dict):
        return param
    from ..options import parse_opts

    if not param.startswith("snapshot."):
        return {"id_or_name": param}
    opts = parse_opts(param)
    if strict:
        for key in opts:
            if key not in ("snapshot.id", "snapshot.name"):
                raise QimgError(f"Invalid parameter '{key}'\nqimg: Failed in parsing snapshot param '{param}'")
    return {key[len("snapshot."):]: value for key, value in opts.items()}


def engine_progress(progress: Any) -> Any:
    """A ``progress=`` argument for the engine: None, a callable(done, total), or already an engine
    progress (the command line's renderer, which has ``update`` and ``finish``)."""
    if progress is None:
        return None
    if callable(getattr(progress, "update", None)) and callable(getattr(progress, "finish", None)):
        return progress
    if not callable(progress):
        raise QimgError("progress must be a callable(done, total)")
    from ..engine.progress import Tracker

    return Tracker(progress)
