"""convert from a pipe, FIFO or socket (``/dev/stdin``, ``<(...)``, ``curl ... |``).

Two layouts are converted as they stream, in bounded memory: raw into a raw target (its size is known
only at the end of the stream, so other targets, which record the size up front, get a spooled copy)
and a streamOptimized VMDK into any target (its header gives the size; grains come in order).  Any
other format needs to seek: the stream is spooled to a temporary file first (the caller is told, so
the command line can say so), and a spool that cannot be written is an error naming the reason.
An empty stream is refused: it would make an image of size 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..core import registry
from ..core.extent import Extent
from ..engine.copy import Source
from ..errors import OpenError, QimgError, WriteError
from ..io import target as targets
from ..io.stream import StreamReader, spool

CHUNK = 2 << 20


def is_stream(name: str) -> bool:
    return registry.protocol_for(name) is None and targets.kind(name) == targets.STREAM


@dataclass
class Opened:
    """One stream source: ``source`` (streamed), ``raw`` (a raw stream for the raw loop) or ``spooled``."""

    name: str
    fmt: str
    reader: StreamReader | None = None
    source: Source | None = None
    spooled: str | None = None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.spooled is not None:
            try:
                os.unlink(self.spooled)
            except OSError:
                pass


def open_stream_source(name: str, fmt: str | None, streamable: bool, raw_ok: bool, note=None) -> Opened:
    """Probe a stream and pick how to read it; ``streamable``: nothing else in the convert needs to seek
    the source, ``raw_ok``: a raw stream can go straight into the target."""
    reader = StreamReader(targets.open_stream(name, write=False), name)
    try:
        head = reader.peek(registry.PROBE_BYTES)
        if not head:
            raise OpenError(f"Could not open '{name}': the stream is empty (no image to convert)")
        if fmt is not None:
            registry.get_driver(fmt)  # an unknown format before anything is read on
        fmt = fmt or registry.probe(head, name)
        if streamable and fmt == "raw" and raw_ok:
            return Opened(name, fmt, reader=reader)
        if streamable and fmt == "vmdk":
            from ..formats.vmdk.streamread import is_stream as vmdk_stream

            if vmdk_stream(head):
                return Opened(name, fmt, reader=reader, source=VmdkStreamSource(reader, name))
        if note is not None:
            note(f"'{name}' is a pipe and this convert needs to seek in it ({fmt}): "
                 "spooling it to a temporary file first")
        path = spool(reader)
        reader.close()
        return Opened(name, fmt, spooled=path)
    except BaseException:
        reader.close()
        raise


class VmdkStreamSource(Source):
    """The copy engine's view of a streamOptimized VMDK coming down a pipe: extents as grains arrive."""

    sequential = True

    def __init__(self, reader, name: str):
        from ..formats.vmdk.streamread import StreamGrains

        self.grains = StreamGrains(reader, name)
        self.virtual_size = self.grains.virtual_size
        self._cur = (0, b"")

    def extents(self, start, end):
        pos = 0
        while True:
            g = self.grains.next_grain()
            if g is None:
                break
            guest, data = g
            if guest > pos:
                yield Extent(pos, guest - pos)
            self._cur = g
            yield Extent(guest, len(data), data=True, zero=False, present=True)
            pos = guest + len(data)
        if pos < self.virtual_size:
            yield Extent(pos, self.virtual_size - pos)

    def readinto(self, offset, buf):
        guest, data = self._cur
        view = memoryview(buf).cast("B")
        rel = offset - guest
        if rel < 0 or rel + len(view) > len(data):
            raise QimgError("a stream source was read out of order")
        view[:] = data[rel:rel + len(view)]


def read_once(req) -> bool:
    """The convert reads its one source once, front to back (a qcow2 going down a pipe reads it twice)."""
    from .stream_target import TWO_PASS

    two_pass = req.out_fmt in TWO_PASS and is_stream(req.target)
    return len(req.sources) == 1 and req.snapshot is None and not req.bitmaps and not two_pass


def raw_stream_fits(req) -> bool:
    """A raw stream goes straight into the target only when that is raw and nothing needs its size first."""
    return (req.out_fmt == "raw" and len(req.sources) == 1 and not req.no_create and not req.backing
            and req.snapshot is None and not req.bitmaps and not req.compress
            and req.options.get("preallocation", "off") == "off")


def convert_raw_stream(req, reader: StreamReader, progress) -> int:
    """raw to raw from a pipe: chunks read in order, zero runs left as holes (-S), size set at the end;
    returns the size."""
    from ..engine.zeroscan import nonzero_runs
    from ..io.store import FileStore, aligned_buffer
    from ..io.stream import SequentialStore

    tgt = targets.prepare(req.target) if registry.protocol_for(req.target) is None else None
    if tgt is None:
        raise QimgError(f"Cannot convert the pipe '{reader.name}' to '{req.target}': spool it to a file first")
    try:
        if tgt.kind == targets.STREAM:
            store = SequentialStore(targets.open_stream(tgt.name, write=True), tgt.name)
        else:
            store = FileStore(tgt.path, writable=True, create=tgt.kind != targets.DEVICE, display_name=tgt.name)
    except QimgError as e:
        tgt.discard()
        raise type(e)(f"{req.target}: error while converting raw: {e}", e.exit_code) from None
    device = tgt.kind == targets.DEVICE
    gran = req.min_sparse
    buf = aligned_buffer(CHUNK)
    view = memoryview(buf)
    pos = 0
    chunk = None
    try:
        while True:
            n = reader.readinto(view)
            if n == 0:
                break
            chunk = view[:n]
            runs = nonzero_runs(chunk, pos, gran) if gran and not device else [(0, n)]
            for s, e in runs:
                try:
                    store.pwrite(pos + s, chunk[s:e])
                except WriteError as err:
                    raise WriteError(f"error while writing at byte {pos + s}: {err.strerror}") from None
            pos += n
            if progress is not None:
                progress.update(n)
        if pos == 0:
            raise OpenError(f"Could not open '{reader.name}': the stream is empty (no image to convert)")
        if not device:
            store.truncate(pos)
        if tgt.kind == targets.STREAM:
            store.finish()
        store.close()
        tgt.commit()
        if progress is not None:
            progress.total = pos
            progress.finish()
        return pos
    finally:
        store.close()
        tgt.discard()
        del chunk
        view.release()
        try:
            buf.close()
        except BufferError:  # a scan's view is still alive: the collector frees the buffer
            pass
