"""The commands that make images: ``convert``, ``create``, ``dd``, and the ones that size and compare them.

Each takes the command's options as keyword arguments named after the command-line options,
checks them as ``qimg CMD`` does (same refusals, same messages), and returns a result dataclass or
raises a :class:`~qimg.QimgError`.  Nothing here prints, installs signal handlers or keeps state
between calls.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, Callable

from ..errors import QimgError, Unsupported, UsageError
from .args import ProgressCallback, as_opts, check_cache, check_src_cache, engine_progress, snapshot_spec
from .outcomes import CompareResult, ConvertResult, CreateResult, MeasureResult
from .sources import BinaryFile, Source, as_policy, call_scope, default_warn, open_chain, path_of, source_name

WarnCallback = Callable[[str], None]


def _source_entry(source: Source, fmt: str | None, image_options: dict | None, untrusted: Any) -> Any:
    """A source for ``ops.convert``: (name, fmt, options) for a host path, an opener for the rest."""
    from ..io.fileobj import is_file_object
    from ..io.lock import EXCLUSIVE_READ

    opts = dict(image_options or {})
    if not is_file_object(source):
        # a path or a URL; qemu-img convert keeps writers off its sources while it copies (even raw ones)
        return (path_of(source), fmt, {**opts, EXCLUSIVE_READ: True})
    return lambda: open_chain(source, fmt, options=opts, untrusted=untrusted)


@contextlib.contextmanager
def _through_temp_file(dst: Any, out_fmt: str, options: dict) -> Iterator[str]:
    """A temporary file name whose content, once the block succeeds, is copied into the file object ``dst``."""
    import shutil
    import tempfile

    from ..core import registry

    cls: Any = registry.get_driver(out_fmt) if out_fmt in registry.FORMATS else None
    if cls is not None and not cls.creates_single_file(options):
        raise Unsupported(f"A '{out_fmt}' image in several files cannot be written into one file object")
    with tempfile.TemporaryDirectory(prefix="qimg-") as folder:
        temp = os.path.join(folder, "image")
        yield temp
        with open(temp, "rb") as f:
            shutil.copyfileobj(f, dst, 4 << 20)


def _per_source(value: Any, count: int, kind: type) -> list:
    """A per-source argument: one value for every source, or a list with one per source."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise QimgError(f"Expected one {kind.__name__} per source ({count}), got {len(value)}")
        return list(value)
    return [value] * count


def convert(src: Source | Sequence[Source], dst: str | os.PathLike[str] | BinaryFile, *,
            fmt: str | Sequence[str | None] | None = None,
            out_fmt: str = "raw", compress: bool = False, options: dict[str, Any] | str | list[str] | None = None,
            backing_file: str | None = None, backing_fmt: str | None = None, sparse_size: int | str | None = None,
            no_create: bool = False, target_is_zero: bool = False, coroutines: int | str = 8,
            out_of_order: bool = False, snapshot: str | dict | None = None, copy_offload: bool = False,
            salvage: bool = False, bitmaps: bool = False, skip_broken_bitmaps: bool = False,
            cache: str | None = None, src_cache: str | None = None,
            image_options: dict | Sequence[dict | None] | None = None,
            target_options: dict | None = None, force_share: bool = False, untrusted: Any = False,
            secrets: dict[str, str | bytes] | None = None, progress: ProgressCallback | None = None,
            warn: WarnCallback | None = None, note: Callable[[str], None] | None = None) -> ConvertResult:
    """``qimg convert``: copy one image (or several, back to back) into a new image.

    Args:
        src: the source, or a list of sources concatenated (paths, URLs, file objects).
        dst: the target file (created, or written in place with ``no_create``), or a writable binary
            file object that receives the new image's bytes (built in a temporary folder first).
        fmt: the sources' format (``-f``), or a list with one per source; probed when None.
        out_fmt: the target's format (``-O``).
        compress: write compressed clusters (``-c``; qcow, qcow2, vmdk streamOptimized).
        options: the target's creation options (``-o``): a dict, or ``"k=v,k2=v2"`` strings.
        backing_file: the target's backing file (``-B``); only data differing from it is copied.
        backing_fmt: the backing file's format (``-F``).
        sparse_size: zero runs at least this long stay holes (``-S``; 0 writes every byte).
        no_create: write into an existing target (``-n``).
        target_is_zero: the existing target reads as zeros (``--target-is-zero``, with ``no_create``).
        coroutines: parallel requests (``-m``, 1..16).
        out_of_order: allow out-of-order writes (``-W``).
        snapshot: an internal snapshot of the source to copy (``-l``: id, name or ``snapshot.id=..``).
        copy_offload: use copy offloading (``-C``).
        salvage: go on past read errors (``--salvage``).
        bitmaps: copy the persistent bitmaps (``--bitmaps``); ``skip_broken_bitmaps`` leaves broken ones.
        cache: the target's cache mode (``-t``); ``src_cache`` the sources' (``-T``).
        image_options: open options of the sources (as ``--image-opts`` gives them), or one dict per source.
        target_options: open options of an existing target (``--target-image-opts``; needs ``no_create``).
        force_share: open the sources without locking out other users (``-U``).
        untrusted: open the sources with the confined rules for hostile images.
        secrets: keys of encrypted images by secret id (``--object secret,...``).
        progress: ``callable(done, total)`` called as bytes are copied.
        warn: receives the warnings qemu-img prints (default: :mod:`warnings`).
        note: receives what is worth saying that is not a warning (a pipe spooled to a temporary file).
            A library call never installs signal handlers: the command line does (``qimg.cli.signals``).

    Returns:
        The target, its format and the virtual size copied.  On failure no partial target is left.
    """
    from ..ops.convert import ConvertRequest
    from ..ops.convert import convert as run_convert

    check_cache(cache)
    check_src_cache(src_cache)
    opts = as_opts(options)
    if copy_offload and compress:
        raise QimgError("Cannot enable copy offloading when -c is used")
    if copy_offload and sparse_size is not None:
        raise QimgError("Cannot enable copy offloading when -S is used")
    if copy_offload and salvage:
        raise QimgError("Cannot use copy offloading in salvaging mode")
    sources: list[Source] = list(src) if isinstance(src, (list, tuple)) else [src]  # type: ignore[list-item]
    if not sources:
        raise QimgError("Must specify image file name")
    min_sparse = 4096
    if sparse_size is not None:
        from ..units import cvtnum

        value = cvtnum("buffer size for sparse output", sparse_size)
        if value % 512 or value > (16 << 20):
            raise QimgError("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 "
                            "up to 16777216. Select 0 to disable sparse detection (fully allocates output).")
        min_sparse = value
    try:
        workers = int(coroutines)
    except (TypeError, ValueError):
        workers = 0
    if workers < 1 or workers > 16:
        raise QimgError("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    snap = snapshot_spec(snapshot, strict=True)
    if "backing_file" in opts and backing_file is None:
        backing_file = opts.pop("backing_file")
    if "backing_fmt" in opts and backing_fmt is None:
        backing_fmt = opts.pop("backing_fmt")
    if target_options is not None and not no_create:
        raise UsageError("--target-image-opts requires use of -n flag")
    from ..io.fileobj import is_file_object

    if is_file_object(dst):
        if no_create:
            raise Unsupported("A file object target is written anew: no_create needs a file name")
        with _through_temp_file(dst, out_fmt, opts) as temp:
            result = convert(src, temp, fmt=fmt, out_fmt=out_fmt, compress=compress, options=opts,
                             backing_file=backing_file, backing_fmt=backing_fmt, sparse_size=sparse_size,
                             coroutines=coroutines, out_of_order=out_of_order, snapshot=snapshot,
                             copy_offload=copy_offload, salvage=salvage, bitmaps=bitmaps,
                             skip_broken_bitmaps=skip_broken_bitmaps, cache=cache, src_cache=src_cache,
                             image_options=image_options, force_share=force_share, untrusted=untrusted,
                             secrets=secrets, progress=progress, warn=warn)
        return ConvertResult(target=source_name(dst), format=out_fmt, virtual_size=result.virtual_size)
    target = path_of(dst, "target")
    fmts = _per_source(fmt, len(sources), str)
    opens = _per_source(image_options, len(sources), dict)
    with call_scope(secrets, force_share):
        entries = [_source_entry(s, f, o, untrusted) for s, f, o in zip(sources, fmts, opens)]
        req = ConvertRequest(
            sources=entries, target=target, out_fmt=out_fmt, options=opts, compress=compress,
            backing=backing_file, backing_fmt=backing_fmt, min_sparse=min_sparse, no_create=no_create,
            target_is_zero=target_is_zero, workers=workers, out_of_order=out_of_order, snapshot=snap,
            target_options=dict(target_options or {}), salvage=salvage, copy_offload=copy_offload,
            bitmaps=bitmaps, skip_broken_bitmaps=skip_broken_bitmaps, policy=as_policy(untrusted))
        total = run_convert(req, progress=engine_progress(progress), warn=warn or default_warn, note=note)
    return ConvertResult(target=target, format=out_fmt, virtual_size=total or 0)


def create(dst: str | os.PathLike[str], size: int | str | None = None, *, fmt: str = "raw",
           options: dict[str, Any] | str | list[str] | None = None, backing_file: str | None = None,
           backing_fmt: str | None = None, unsafe: bool = False, secrets: dict[str, str | bytes] | None = None,
           announce: Callable[[str], None] | None = None, untrusted: Any = False) -> CreateResult:
    """``qimg create``: make a new, empty image.

    Args:
        dst: the file to create.
        size: the virtual size in bytes, or a string with a suffix (``"10G"``); taken from the
            backing file when None.
        fmt: the format (``-f``).
        options: creation options (``-o``): a dict, or ``"k=v,k2=v2"`` strings.
        backing_file: the backing file (``-b``); ``backing_fmt`` its format (``-F``).
        unsafe: do not open the backing file (``-u``).
        secrets: keys for an encrypted image by secret id.
        announce: receives the "Formatting ..." line just before the image is written.
    """
    from ..ops.create import create_image
    from ..units import parse_image_size

    name = path_of(dst, "target")
    if isinstance(size, bool) or (size is not None and not isinstance(size, (int, str))):
        raise QimgError(f"Invalid image size specified: {size!r}")
    nbytes = parse_image_size(size) if isinstance(size, str) else size
    if nbytes is not None and nbytes < 0:
        from ..units import SIZE_HELP

        raise QimgError(SIZE_HELP)
    with call_scope(secrets):
        line = create_image(name, fmt, nbytes, as_opts(options), backing_file, backing_fmt, unsafe,
                            announce=announce, policy=as_policy(untrusted))
    return CreateResult(filename=name, format=fmt, size=nbytes, formatting=line)


def dd(src: Source, dst: str | os.PathLike[str], *, fmt: str | None = None, out_fmt: str = "raw",
       bs: int | str = 512, count: int | str | None = None, skip: int | str | None = None,
       image_options: dict | None = None, force_share: bool = False,
       secrets: dict[str, str | bytes] | None = None, warn: WarnCallback | None = None,
       untrusted: Any = False) -> None:
    """``qimg dd``: copy ``count`` blocks of ``bs`` bytes, after skipping ``skip`` blocks, into a new image."""
    from ..ops.dd import DdRequest
    from ..ops.dd import dd as run_dd
    from ..units import cvtnum

    bs = cvtnum("bs", bs, 1, (1 << 31) - 1)
    count = None if count is None else cvtnum("count", count)
    skip = None if skip is None else cvtnum("skip", skip)
    from ..options import DISPLAY_NAME

    name = "" if isinstance(src, str) and src == "" else path_of(src)
    req = DdRequest(input=name, output=path_of(dst, "target"), fmt=fmt, input_options=dict(image_options or {}),
                    out_fmt=out_fmt, bs=bs, count=count, skip=skip,
                    display_name=(image_options or {}).get(DISPLAY_NAME) or name, policy=as_policy(untrusted))
    with call_scope(secrets, force_share):
        run_dd(req, warn=warn or default_warn)


def measure(src: Source | None = None, *, size: int | str | None = None, fmt: str | None = None,
            out_fmt: str = "raw", options: dict[str, Any] | str | list[str] | None = None,
            snapshot: str | dict | None = None, image_options: dict | None = None, force_share: bool = False,
            secrets: dict[str, str | bytes] | None = None, untrusted: Any = False) -> MeasureResult:
    """``qimg measure``: the bytes an ``out_fmt`` image of ``src`` (or of ``size`` bytes) needs.

    ``options`` are the target's creation options (``-o``), ``snapshot`` a snapshot of ``src`` (``-l``);
    ``fmt``, ``snapshot`` and ``image_options`` (even empty) need ``src``.
    """
    from ..ops.measure import MeasureRequest
    from ..ops.measure import measure as run_measure
    from ..units import cvtnum

    nbytes = None if size is None else cvtnum("image size", size)
    if isinstance(options, dict):
        opt_strings = [",".join(f"{k}={v}" for k, v in as_opts(options).items())] if options else []
    elif isinstance(options, str):
        opt_strings = [options]
    else:
        opt_strings = list(options or ())
    req = MeasureRequest(size=nbytes, out_fmt=out_fmt, options=opt_strings, snapshot=snapshot_spec(snapshot, False),
                         fmt=fmt, image_opts_used=image_options is not None, policy=as_policy(untrusted))
    if src is not None:
        req.filename, req.image_opts = path_of(src), dict(image_options or {})
    with call_scope(secrets, force_share):
        result = run_measure(req)
    return MeasureResult(required=result["required"], fully_allocated=result["fully-allocated"],
                         bitmaps=result.get("bitmaps"))


def compare(a: Source, b: Source, *, fmt1: str | None = None, fmt2: str | None = None, strict: bool = False,
            src_cache: str | None = None, image_options: dict | None = None, image_options2: dict | None = None,
            force_share: bool = False, secrets: dict[str, str | bytes] | None = None,
            progress: ProgressCallback | None = None, report: Callable[[str], None] | None = None,
            untrusted: Any = False) -> CompareResult:
    """``qimg compare``: do ``a`` and ``b`` show the same guest content?

    Returns a result whose ``identical`` is True or False (``exit_code`` 0 or 1); images that cannot be
    opened or read raise :class:`~qimg.QimgError` with compare's own exit codes (2, 3, 4).  ``a`` and
    ``b`` are paths or URLs (to compare a file object, open it with :func:`qimg.open` and compare the
    streams).  ``fmt1`` and
    ``fmt2`` are ``-f`` and ``-F``, ``strict`` is ``-s``; ``report`` receives compare's lines as they come.
    """
    from ..ops.compare import OPEN_ERROR, CompareRequest
    from ..ops.compare import compare as run_compare

    if src_cache is not None:
        check_src_cache(src_cache, OPEN_ERROR)
    req = CompareRequest(path_of(a), path_of(b), fmt1, fmt2, dict(image_options or {}),
                         dict(image_options2 if image_options2 is not None else image_options or {}), strict=strict,
                         policy=as_policy(untrusted))
    lines: list[str] = []

    def collect(line: str) -> None:
        lines.append(line)
        if report is not None:
            report(line)

    with call_scope(secrets, force_share):
        code = run_compare(req, progress=_StepProgress(progress) if progress is not None else None, report=collect)
    return CompareResult(identical=code == 0, exit_code=code, messages=tuple(lines))


class _StepProgress:
    """compare's progress steps (length, base) as ``callable(done, total)``."""

    def __init__(self, callback: ProgressCallback):
        self.callback = callback
        self.done = 0

    def __call__(self, length: int, base: int) -> None:
        self.done += length
        self.callback(self.done, base)
