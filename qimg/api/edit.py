"""The commands that change an image in place: ``commit``, ``rebase``, ``resize``, ``amend`` and the
internal snapshot operations.

Each flushes the image before it returns (qemu-img's writeback policy), so a finished call is on disk.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..errors import QimgError, UsageError
from .args import ProgressCallback, as_opts, check_cache, check_src_cache, engine_progress, refuse_shared_write
from .sources import as_policy, call_scope, default_warn, path_of

WarnCallback = Callable[[str], None]
Path = str | os.PathLike[str]


def check_commit_args(cache: str | None, rate: int | str | None) -> None:
    """commit's own checks: the cache mode (``-t``) and the rate limit (``-r``)."""
    check_cache(cache)
    if rate is not None:
        from ..units import parse_size

        if isinstance(rate, bool) or (parse_size(rate) if isinstance(rate, str) else rate) is None:
            raise QimgError("Invalid rate limit specified")


def check_rebase_args(backing_file: str | None, unsafe: bool, cache: str | None, src_cache: str | None) -> None:
    """rebase's own checks: cache modes, and a backing file unless ``unsafe``."""
    check_cache(cache)
    check_src_cache(src_cache)
    if backing_file is None and not unsafe:
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)")


def commit(src: Path, *, fmt: str | None = None, base: str | None = None, drop: bool = False,
           cache: str | None = None, rate: int | str | None = None, image_options: dict | None = None,
           secrets: dict[str, str | bytes] | None = None, progress: ProgressCallback | None = None,
           warn: WarnCallback | None = None, untrusted: Any = False) -> None:
    """``qimg commit``: copy an overlay's data into its backing file (or ``base``), then empty it.

    Args:
        src: the overlay.
        base: the layer of the chain to commit into (``-b``; implies ``drop``).
        drop: leave the overlay as it is instead of emptying it (``-d``).
        cache: the cache mode (``-t``).
        rate: a rate limit in bytes per second (``-r``; accepted and checked, not enforced).
    """
    from ..ops.commit import commit as run_commit

    check_commit_args(cache, rate)
    with call_scope(secrets):
        run_commit(path_of(src), fmt, base=base, drop=drop, options=dict(image_options or {}),
                   progress=engine_progress(progress), warn=warn or default_warn, policy=as_policy(untrusted))


def rebase(src: Path, backing_file: str | None, *, fmt: str | None = None, backing_fmt: str | None = None,
           unsafe: bool = False, cache: str | None = None, src_cache: str | None = None,
           image_options: dict | None = None, force_share: bool = False,
           secrets: dict[str, str | bytes] | None = None, progress: ProgressCallback | None = None,
           warn: WarnCallback | None = None, untrusted: Any = False) -> None:
    """``qimg rebase``: give ``src`` a new backing file (``""`` removes it).

    In safe mode (the default) the data that would change in the guest view is first copied into
    ``src``; ``unsafe=True`` (``-u``) only rewrites the name.  ``force_share`` (``-U``) shares the
    backing files; the image itself is opened read-write.
    """
    from ..ops.rebase import rebase as run_rebase

    check_rebase_args(backing_file, unsafe, cache, src_cache)
    with call_scope(secrets, force_share):
        run_rebase(path_of(src), backing_file, backing_fmt, fmt, unsafe=unsafe, options=dict(image_options or {}),
                   progress=engine_progress(progress), warn=warn or default_warn, policy=as_policy(untrusted))


def resize(src: Path, size: int | str, *, fmt: str | None = None, shrink: bool = False,
           preallocation: str | None = None, image_options: dict | None = None,
           secrets: dict[str, str | bytes] | None = None, warn: WarnCallback | None = None,
           untrusted: Any = False) -> int:
    """``qimg resize``: set the virtual size; returns it.

    ``size`` is bytes (an int) or a string: ``"10G"`` absolute, ``"+1G"``/``"-1G"`` relative.  Shrinking
    needs ``shrink=True``; ``preallocation`` is off, metadata, falloc or full.
    """
    from ..io.lock import TAKE_RESIZE
    from ..ops.resize import resize as run_resize

    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise QimgError(f"Invalid image size specified: {size!r}")
    text = str(size)
    opts = dict(image_options or {})
    opts[TAKE_RESIZE] = True  # qemu-img resize also takes the "resize" permission on a raw image
    with call_scope(secrets):
        return run_resize(path_of(src), text, fmt, shrink=shrink, prealloc=preallocation, options=opts,
                          warn=warn or default_warn, policy=as_policy(untrusted))


def amend_check_args(cache: str | None, options: dict) -> None:
    """amend's own checks: the cache mode (``-t``) and at least one option (``-o``)."""
    check_cache(cache)
    if not options:
        raise UsageError("Must specify options (-o)")


def amend(src: Path, options: dict[str, Any] | str | list[str], *, fmt: str | None = None, force: bool = False,
          cache: str | None = None, image_options: dict | None = None,
          secrets: dict[str, str | bytes] | None = None, warn: WarnCallback | None = None,
          untrusted: Any = False) -> None:
    """``qimg amend``: change format options of an existing image (``-o``, e.g. ``{"compat": "1.1"}``)."""
    from ..ops.amend import amend as run_amend

    opts = as_opts(options)
    amend_check_args(cache, opts)
    with call_scope(secrets):
        run_amend(path_of(src), opts, fmt, force=force, open_options=dict(image_options or {}),
                  warn=warn or default_warn, policy=as_policy(untrusted))


def _snapshot(action: str, src: Path, name: str, fmt: str | None, image_options: dict | None,
              force_share: bool, secrets: dict | None, warn: WarnCallback | None, untrusted: Any = False) -> None:
    from ..ops.snapshot import snapshot

    filename = path_of(src)
    if force_share:
        refuse_shared_write(filename)
    with call_scope(secrets):
        snapshot(action, name, filename, fmt, dict(image_options or {}), warn=warn or default_warn,
                 policy=as_policy(untrusted))


def snapshot_create(src: Path, name: str, *, fmt: str | None = None, image_options: dict | None = None,
                    force_share: bool = False, secrets: dict[str, str | bytes] | None = None,
                    warn: WarnCallback | None = None, untrusted: Any = False) -> None:
    """``qimg snapshot -c NAME``: save the current state as an internal snapshot (qcow2)."""
    _snapshot("create", src, name, fmt, image_options, force_share, secrets, warn, untrusted)


def snapshot_apply(src: Path, name: str, *, fmt: str | None = None, image_options: dict | None = None,
                   force_share: bool = False, secrets: dict[str, str | bytes] | None = None,
                   warn: WarnCallback | None = None, untrusted: Any = False) -> None:
    """``qimg snapshot -a NAME``: return the image to an internal snapshot (by id or name)."""
    _snapshot("apply", src, name, fmt, image_options, force_share, secrets, warn, untrusted)


def snapshot_delete(src: Path, name: str, *, fmt: str | None = None, image_options: dict | None = None,
                    force_share: bool = False, secrets: dict[str, str | bytes] | None = None,
                    warn: WarnCallback | None = None, untrusted: Any = False) -> None:
    """``qimg snapshot -d NAME``: delete an internal snapshot (by id or name)."""
    _snapshot("delete", src, name, fmt, image_options, force_share, secrets, warn, untrusted)
