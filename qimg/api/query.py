"""The commands that read metadata: ``info``, ``check``, ``map`` and ``snapshot_list``.

None of them imports numpy, tqdm, cryptography or zstandard for the common formats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal, overload

from ..options import DISPLAY_NAME
from .args import check_src_cache, refuse_shared_write
from .results import CheckResult, ImageInfo, SnapshotInfo
from .sources import Source, as_policy, call_scope, open_chain, path_of, source_name

if TYPE_CHECKING:
    from ..ops.map import MapEntry


@overload
def info(src: Source, *, fmt: str | None = ..., backing_chain: Literal[False] = ...,
         image_options: dict | None = ..., force_share: bool = ...,
         secrets: dict[str, str | bytes] | None = ..., untrusted: Any = ...) -> ImageInfo: ...


@overload
def info(src: Source, *, fmt: str | None = ..., backing_chain: Literal[True],
         image_options: dict | None = ..., force_share: bool = ...,
         secrets: dict[str, str | bytes] | None = ..., untrusted: Any = ...) -> list[ImageInfo]: ...


def info(src: Source, *, fmt: str | None = None, backing_chain: bool = False, image_options: dict | None = None,
         force_share: bool = False, secrets: dict[str, str | bytes] | None = None,
         untrusted: Any = False) -> ImageInfo | list[ImageInfo]:
    """``qimg info``: what an image is (format, sizes, backing file, snapshots, format details).

    Returns one :class:`~qimg.ImageInfo` whose ``to_dict()`` is ``qimg info --output=json``, or with
    ``backing_chain=True`` one per layer, the image first (``--backing-chain``).  ``untrusted`` opens
    the image (and the chain it names) with the confined rules for hostile images.
    """
    from ..io.fileobj import is_file_object
    from ..ops.info import image_info, layer_info
    from ..options import NO_IO

    policy = as_policy(untrusted)
    with call_scope(secrets, force_share):
        if not is_file_object(src):
            infos = image_info(path_of(src), fmt, backing_chain=backing_chain, options=dict(image_options or {}),
                               policy=policy)
        else:
            # the top layer lives in the file object; its backing files (if any) open by name
            chain = open_chain(src, fmt, backing=False, options={**(image_options or {}), NO_IO: True},
                               untrusted=policy)
            try:
                top = chain.top
                infos = [layer_info(top, chain.filenames[0])]
                nxt = top.backing
            finally:
                chain.close()
            if backing_chain and nxt is not None and nxt.filename:
                from ..core.policy import Guard
                from ..core.registry import admit_backing

                name = source_name(src)
                path, bfmt = admit_backing(Guard(policy, name), name, nxt.filename, nxt.fmt, 1)
                infos += image_info(path, bfmt, backing_chain=True, policy=policy)
    result = [ImageInfo.from_dict(i) for i in infos]
    return result if backing_chain else result[0]


def check(src: Source, *, fmt: str | None = None, repair: str | None = None, src_cache: str | None = None,
          image_options: dict | None = None, force_share: bool = False,
          secrets: dict[str, str | bytes] | None = None, warn: Callable[[str], None] | None = None,
          untrusted: Any = False) -> CheckResult:
    """``qimg check``: the image's consistency, optionally repaired (``repair`` "leaks" or "all").

    The result's ``exit_code`` is check's status (0 clean, 2 corruptions, 3 leaks only, 1 failed) and
    ``to_dict()`` its ``--output=json``.  A format without checks raises
    :class:`~qimg.CheckUnsupported` (exit_code 63).
    """
    from ..io.fileobj import is_file_object
    from ..ops.check import check_image, validate_repair

    validate_repair(repair)
    check_src_cache(src_cache)
    if is_file_object(src):
        from .image import open as open_image

        with open_image(src, fmt, writable=bool(repair), secrets=secrets, options=image_options,
                        untrusted=untrusted) as image:
            return image.check(repair)
    name = path_of(src)
    if repair and force_share:
        refuse_shared_write(name)
    with call_scope(secrets, force_share):
        res, fmt_name = check_image(name, fmt, repair, dict(image_options or {}), warn=warn if repair else None,
                                    policy=as_policy(untrusted))
    # qemu-img names the image as it was given (a whole --image-opts string or json: name stays one)
    return CheckResult.from_result(res, (image_options or {}).get(DISPLAY_NAME) or name, fmt_name)


def map(src: Source, *, fmt: str | None = None, start_offset: int | str = 0, max_length: int | str | None = None,
        image_options: dict | None = None, force_share: bool = False,
        secrets: dict[str, str | bytes] | None = None, untrusted: Any = False) -> list[MapEntry]:
    """``qimg map``: the allocation of ``[start_offset, start_offset+max_length)`` as merged entries.

    Each :class:`~qimg.MapEntry` has ``to_dict()``, one line of ``qimg map --output=json``.  For a lazy
    walk of a huge image use ``qimg.open(src).extents()``.
    """
    from ..ops.map import map_entries
    from ..units import cvtnum

    start = cvtnum("start offset", start_offset)
    length = None if max_length is None else cvtnum("max length", max_length)
    with call_scope(secrets, force_share):
        chain = open_chain(src, fmt, options=dict(image_options or {}), untrusted=untrusted)
        try:
            return list(map_entries(chain, start, length))
        finally:
            chain.close()


def snapshot_list(src: Source, *, fmt: str | None = None, image_options: dict | None = None,
                  force_share: bool = False, secrets: dict[str, str | bytes] | None = None,
                  untrusted: Any = False) -> list[SnapshotInfo]:
    """``qimg snapshot -l``: the internal snapshots of an image (empty for formats without them)."""
    from ..ops.snapshot import list_snapshots

    with call_scope(secrets, force_share):
        snaps = list_snapshots(path_of(src), fmt, dict(image_options or {}), policy=as_policy(untrusted))
    return [SnapshotInfo.from_dict(s) for s in snaps]
