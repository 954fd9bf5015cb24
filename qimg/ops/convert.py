"""convert: copy one or more images into a new (or existing, with -n) image."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..core import registry
from ..core.chain import Chain
from ..core.policy import Policy
from ..engine.copy import ChainSource, ConcatSource, CopyOptions, copy_range
from ..engine.progress import tracker
from ..engine.reword import RewordedSource
from ..errors import OpenError, QimgError
from ..options import CACHE_UNSAFE, DISPLAY_NAME
from . import stream_source


@dataclass
class ConvertRequest:
    """Everything qemu-img convert takes, as plain values."""

    sources: list  # [(filename, fmt, options)]
    target: str
    out_fmt: str = "raw"
    options: dict = field(default_factory=dict)
    compress: bool = False
    backing: str | None = None
    backing_fmt: str | None = None
    min_sparse: int = 4096
    no_create: bool = False
    target_is_zero: bool = False
    workers: int = 8
    out_of_order: bool = False
    snapshot: dict | None = None
    target_options: dict = field(default_factory=dict)
    salvage: bool = False
    copy_offload: bool = False  # -C
    bitmaps: bool = False       # --bitmaps
    skip_broken_bitmaps: bool = False
    policy: Policy | None = None  # untrusted mode (qimg.core.policy); None: qemu-img's rules


def convert(req: ConvertRequest, progress=None, warn=None, note=None) -> int:
    """Run a convert; returns the bytes copied (the virtual size).  On failure a target this call
    created is removed.  A source is (name, fmt, options) or a callable returning an open Chain.

    ``progress``: ``callable(done, total)`` (bytes) or an engine Tracker; ``warn(message)``: warnings;
    ``note(message)``: what the command line says unless -q (a pipe spooled to a temporary file)."""
    from ..io.remote import url_scheme

    if url_scheme(req.target) is not None:
        raise OpenError(f"Could not create '{req.target}': a URL can be read only; convert to a local file")
    if req.target_is_zero and not req.no_create:
        raise QimgError("--target-is-zero requires use of -n flag")
    if req.out_fmt not in registry.FORMATS and registry.protocol_for(req.target) is None:
        raise QimgError(f"Unknown file format '{req.out_fmt}'")
    if req.no_create and req.options:
        raise QimgError("-o has no effect when skipping image creation")
    progress = tracker(progress)
    chains = []
    streams = []
    try:
        if req.snapshot is not None and len(req.sources) > 1:
            raise QimgError("No support for concatenating multiple snapshot")
        sources = []
        for source in req.sources:
            if callable(source):
                chains.append(source())
                sources.append(RewordedSource(chains[-1], _block_status_error))
                continue
            name, fmt, opts = source
            if stream_source.is_stream(name):
                st = stream_source.open_stream_source(name, fmt, streamable=stream_source.read_once(req),
                                                      raw_ok=stream_source.raw_stream_fits(req), note=note)
                streams.append(st)
                if st.source is not None:
                    sources.append(st.source)
                    continue
                if st.reader is not None:
                    return stream_source.convert_raw_stream(req, st.reader, progress)
                name, fmt, opts = st.spooled, st.fmt, {**opts, DISPLAY_NAME: name}
            chains.append(Chain.open(name, fmt, options=dict(opts), policy=req.policy))
            sources.append(RewordedSource(chains[-1], _block_status_error))
        if req.snapshot is not None:
            from .measure import _load_snapshot

            _load_snapshot(chains[0], req.snapshot)  # "Failed to load snapshot: ..." as qemu-img
        src = sources[0] if len(sources) == 1 else ConcatSource(sources)
        total = src.virtual_size
        if progress is not None:
            progress.total = total
        if req.backing_fmt and not req.backing and not req.no_create:
            raise QimgError(f"{req.target}: error while converting {req.out_fmt}: "
                            "Backing format cannot be used without backing file")
        if req.backing and req.no_create:
            raise QimgError("-B makes no sense when skipping image creation")
        if req.compress:
            cls = registry.get_driver(req.out_fmt)
            if not cls.supports_compression:
                raise QimgError("Compression not supported for this file format")
            if not req.no_create:
                _check_compress_options(req.options)
        bitmaps = _source_bitmaps(req, chains, warn)
        if req.no_create:
            _write_into(req, src, total, progress, bitmaps)
        else:
            _create_and_write(req, src, total, progress, bitmaps)
        return total
    finally:
        for ch in chains:
            ch.close()
        for st in streams:
            st.close()


def _source_bitmaps(req: ConvertRequest, chains: list, warn) -> list | None:
    """--bitmaps: the persistent bitmaps of the (single) source, refused as qemu-img refuses them."""
    if req.skip_broken_bitmaps and not req.bitmaps:
        raise QimgError("Use of --skip-broken-bitmaps requires --bitmaps")
    if not req.bitmaps:
        return None
    if len(chains) > 1:
        raise QimgError("Copying bitmaps only possible with single source")
    return chains[0].top.bitmaps_for_copy(req.skip_broken_bitmaps, warn)


def _prepare_bitmaps(req: ConvertRequest, tgt, bitmaps: list | None) -> None:
    if bitmaps is None:
        return
    tgt.prepare_bitmaps(req.out_fmt, bitmaps)


def _check_compress_options(options: dict) -> None:
    """-c refuses encryption and preallocation options, with qemu-img's messages."""
    from ..options import parse_bool

    enc = options.get("encryption")
    try:
        enc_on = enc is not None and parse_bool("encryption", enc)
    except QimgError:
        enc_on = False  # reported by the option checks of create
    if enc_on or options.get("encrypt.format"):
        raise QimgError("Compression and encryption not supported at the same time")
    if options.get("preallocation", "off") != "off":
        raise QimgError("Compression and preallocation not supported at the same time")


def _copy_opts(req: ConvertRequest, target_is_zero: bool) -> CopyOptions:
    return CopyOptions(
        min_sparse=req.min_sparse,
        target_is_zero=target_is_zero,
        workers=max(1, min(req.workers, os.cpu_count() or 2, 4)),
        compress=req.compress,
        skip_unallocated=bool(req.backing),
        offload=req.copy_offload,
    )


def _write_into(req, src, total, progress, bitmaps=None):
    from ..io import lock
    from ..io import target as targets

    if registry.protocol_for(req.target) is None and targets.kind(req.target) == targets.STREAM:
        from .stream_target import check_streamable

        check_streamable(req)  # refuses -n with the reason

    # qemu-img's target open conflicts with its own sources' locks (convert -n a a is refused); qimg's
    # opens of one file share their locks, so that conflict is looked for here
    try:
        passthrough = registry.get_driver(req.out_fmt).lock_passthrough
        guard = lock.check_free(req.target, *lock.image_perms(passthrough, True, False, False))
    except QimgError as e:
        raise OpenError(f"Could not open '{req.target}': {e}", e.exit_code) from None
    try:
        # as a chain: a target whose backing file is missing is refused, as qemu-img refuses it, and the
        # layers below hand the target what copy-on-write needs
        # (qemu-img writes every convert target with cache mode unsafe, an existing one (-n) too)
        tgt_chain = Chain.open(req.target, req.out_fmt, writable=True,
                               options={**req.target_options, CACHE_UNSAFE: True}, policy=req.policy)
    finally:
        if guard is not None:
            guard.release()
    tgt = tgt_chain.top
    try:
        if tgt.virtual_size < total:
            raise QimgError(f"Could not write to '{req.target}': target image is smaller than the source")
        _prepare_bitmaps(req, tgt, bitmaps)
        opts = _copy_opts(req, req.target_is_zero)
        _copy(req, src, tgt, total, opts, progress)
        if bitmaps:
            tgt.add_bitmaps(bitmaps)
        if progress is not None:
            progress.finish()
    finally:
        tgt_chain.close()


def _maybe_base(req, src):
    if req.backing and isinstance(src, ChainSource):
        return ChainSource(src.chain, base_depth=1)
    return src


def _create_and_write(req, src, total, progress, bitmaps=None):
    from ..io import target as targets

    cls = registry.get_driver(req.out_fmt)
    if registry.protocol_for(req.target) is not None:  # nbd exports and the like: written in place
        tgt_file = targets.Target(req.target, targets.DEVICE, req.target)
    else:
        single = cls.creates_single_file(req.options)
        try:
            tgt_file = targets.prepare(req.target, single)
        except QimgError as e:
            raise type(e)(f"{req.target}: error while converting {req.out_fmt}: {e}", e.exit_code) from None
    if tgt_file.kind == targets.STREAM:
        from .stream_target import convert_to_stream

        convert_to_stream(req, src, total, progress, tgt_file, _copy, _copy_opts(req, False))
        return
    path = tgt_file.path
    try:
        _create_target(req, tgt_file, total)
        # like qemu-img, the secrets given for creation also unlock the new image
        secrets = {k: v for k, v in req.options.items() if k.endswith("key-secret")}
        tgt_chain = Chain.open(path, req.out_fmt, writable=True, options={**secrets, CACHE_UNSAFE: True},
                               policy=req.policy)
        tgt = tgt_chain.top
        try:
            _prepare_bitmaps(req, tgt, bitmaps)
            zero_init = tgt.has_zero_init and not req.backing
            _copy(req, src, tgt, total, _copy_opts(req, zero_init), progress)
            tgt.finalize()
            if bitmaps:
                tgt.add_bitmaps(bitmaps)
        except BaseException:
            _close_quietly(tgt_chain)  # the first error is the one to report (a full disk fails the close too)
            raise
        tgt_chain.close()
        tgt_file.commit()
        if progress is not None:
            progress.finish()
    except QimgError as e:
        if path != req.target and path in str(e):
            raise type(e)(str(e).replace(path, req.target), e.exit_code) from None
        raise
    finally:
        tgt_file.discard(_created_files(cls, path, req.options))


def _close_quietly(closable) -> None:
    try:
        closable.close()
    except Exception:
        pass


def _copy(req, src, tgt, total, opts, progress):
    """copy_range, with a failed write reported as qemu-img reports it."""
    from ..errors import WriteError

    try:
        copy_range(_maybe_base(req, src), tgt, 0, total, opts, progress, cluster_size=tgt.cluster_size)
    except WriteError as e:
        if e.guest_offset is None or e.strerror is None:
            raise
        raise WriteError(f"error while writing at byte {e.guest_offset}: {e.strerror}", e.exit_code) from None


def _create_target(req, target, total):
    """Create the target as qemu-img convert does: bad -o names first, then the driver's own errors."""
    from .create import create_image, validate_options

    opts = {k: v for k, v in req.options.items() if k not in ("backing_file", "backing_fmt", "size")}
    try:
        validate_options(registry.get_driver(req.out_fmt), "", opts)
    except QimgError as e:
        raise QimgError(str(e).removeprefix(": "), e.exit_code) from None
    try:
        name, store_for = target.path, None
        if target.final is not None and target.final != target.path:
            # the driver creates the image under its final name (a VMDK records its file name) while the
            # bytes go to the partial file
            def store_for(path, create):
                if path != target.final:
                    return None
                from ..io.store import FileStore

                return FileStore(target.path, True, create=create)

            name = target.final
        create_image(name, req.out_fmt, total, dict(req.options), req.backing, req.backing_fmt,
                     unsafe=req.backing is not None and req.backing_fmt is None, display_name=req.target,
                     policy=req.policy, store_for=store_for)
    except QimgError as e:
        msg = str(e).removeprefix(f"{req.target}: ")
        raise type(e)(f"{req.target}: error while converting {req.out_fmt}: {msg}", e.exit_code) from None


def _created_files(cls, name, options) -> list[str]:
    try:
        return cls.created_files(name, options)
    except Exception:  # noqa: BLE001 - best effort: the partial file at least goes
        return [name]


def _block_status_error(offset: int, error) -> str:
    return f"error while reading block status at offset {offset}: {error}"
