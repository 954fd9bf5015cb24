"""``qimg.open()`` and ``Image``: a disk image of any format as a Python binary stream.

An ``Image`` is an ``io.RawIOBase`` over the guest view (the image and its backing files): what
``qemu-img convert -O raw`` would write, read in place.  Besides the stream it offers positional,
thread-safe ``pread``/``pwrite``, the allocation map (``extents``), ``info``, ``check``, the layers
of its backing chain and its internal snapshots.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ClosedImage, InvalidArgument, ReadOnlyError, Unsupported
from .sources import Source, call_scope, default_warn, open_chain, source_name

if TYPE_CHECKING:
    from ..ops.map import MapEntry
    from .results import CheckResult, ImageInfo, SnapshotInfo


@dataclass(frozen=True)
class Layer:
    """One layer of an image's backing chain (depth 0 is the image itself)."""

    depth: int
    filename: str
    format: str

    def open(self, *, backing: bool = True) -> Image:
        """This layer as its own read-only ``Image`` (with the layers below it unless ``backing=False``)."""
        return open(self.filename, self.format, backing=backing)


def open(source: Source, fmt: str | None = None, *, writable: bool = False, backing: bool = True,
         untrusted: Any = False, snapshot: str | None = None, secrets: dict[str, str | bytes] | None = None,
         options: dict[str, Any] | None = None, warn: Callable[[str], None] | None = None) -> Image:
    """Open a disk image as an :class:`Image` (a binary stream over its guest view).

    Args:
        source: a path (``str`` or ``os.PathLike``), a URL (``http(s)://``, ``nbd://``, fsspec URLs), or a
            binary file object with ``seek`` and ``readinto`` (an open file, ``io.BytesIO``, an fsspec
            file) holding the image.
        fmt: the format (``"qcow2"``, ``"vmdk"``, ...); probed from the first bytes when None.
        writable: open for writing (the top layer only; backing files stay read-only).
        backing: open the backing chain (False: ranges the image does not hold read as zeros).
        untrusted: open with the confined rules for hostile images (True, or a :class:`qimg.core.policy.Policy`).
        snapshot: the id or name of an internal snapshot to read instead of the current state.
        secrets: keys of encrypted images, by secret id (the ``key-secret`` options name them).
        options: open options as ``--image-opts`` takes them (``{"encrypt.key-secret": "sec0"}``, ...).
        warn: receives the warnings qemu-img prints; by default they go to :mod:`warnings`.

    Raises:
        OpenError: the file is missing, the format unknown, the header damaged or the image in use.
        Unsupported: ``snapshot`` or ``writable`` on a format without them.
    """
    if snapshot is not None and writable:
        raise InvalidArgument("A snapshot opens read-only")
    with call_scope(secrets):
        # qemu warns about a probed raw format only when it is written (block 0 is then restricted)
        chain = open_chain(source, fmt, writable=writable, backing=backing, untrusted=untrusted,
                           options=options, warn=(warn or default_warn) if writable else None)
        try:
            if snapshot is not None:
                from ..ops.measure import _load_snapshot

                _load_snapshot(chain, {"id_or_name": str(snapshot)})
        except BaseException:
            chain.close()
            raise
    return Image(chain, source_name(source), writable=writable, source=source, snapshot=snapshot)


class Image(io.RawIOBase):
    """A disk image opened by :func:`qimg.open`: a seekable binary stream over its guest view.

    Reads at or past the end return ``b""``; ``readinto`` fills the caller's buffer without extra
    copies.  ``pread``/``pwrite`` take an offset and may be called from several threads at once.
    Use it as a context manager, or call ``close()``.
    """

    def __init__(self, chain: Any, name: str, *, writable: bool = False, source: Any = None,
                 snapshot: str | None = None):
        super().__init__()
        self._chain = chain
        self._name = name
        self._writable = writable
        self._source = source
        self._snapshot = snapshot
        self._size = chain.virtual_size
        self._pos = 0
        self._pos_lock = threading.Lock()
        # reads run concurrently (the drivers' read paths are shared by the copy engine's workers);
        # a writable image serializes every access, so no read sees a half-updated table
        self._io_lock: threading.Lock | None = threading.Lock() if writable else None

    # ----- what it is -----
    @property
    def name(self) -> str:
        """The source's name: the path or URL, or the file object's name."""
        return self._name

    @property
    def format(self) -> str:
        """The format of the image (of its top layer)."""
        return self._open_chain().top.format_name

    @property
    def size(self) -> int:
        """The virtual size in bytes (the length of the stream)."""
        return self._size

    @property
    def virtual_size(self) -> int:
        """The virtual size in bytes (same as :attr:`size`)."""
        return self._size

    @property
    def layers(self) -> list[Layer]:
        """The backing chain, this image first; each layer opens as its own read-only ``Image``."""
        chain = self._open_chain()
        return [Layer(depth, name, layer.format_name)
                for depth, (name, layer) in enumerate(zip(chain.filenames, chain.layers))]

    @property
    def snapshots(self) -> list[SnapshotInfo]:
        """The internal snapshots (qcow2); open one with :meth:`open_snapshot` or ``qimg.open(..., snapshot=)``."""
        from .results import SnapshotInfo

        return [SnapshotInfo.from_dict(s) for s in self._open_chain().top.snapshot_infos()]

    def open_snapshot(self, id_or_name: str) -> Image:
        """The internal snapshot ``id_or_name`` as its own read-only ``Image``."""
        from ..io.fileobj import is_file_object

        if is_file_object(self._source):
            raise Unsupported("A snapshot of an image read from a file object opens with qimg.open(..., snapshot=)")
        top = self._open_chain().top
        return open(self._source, top.format_name, snapshot=id_or_name)

    # ----- io.RawIOBase -----
    def readable(self) -> bool:
        """True: every image reads."""
        self._check_open()
        return True

    def seekable(self) -> bool:
        """True: every image seeks."""
        self._check_open()
        return True

    def writable(self) -> bool:
        """True when opened with ``writable=True``."""
        self._check_open()
        return self._writable

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the stream position (past the end is allowed; reads there return ``b""``)."""
        self._check_open()
        with self._pos_lock:
            if whence == io.SEEK_SET:
                pos = offset
            elif whence == io.SEEK_CUR:
                pos = self._pos + offset
            elif whence == io.SEEK_END:
                pos = self._size + offset
            else:
                raise InvalidArgument(f"Invalid whence ({whence})")
            if pos < 0:
                raise InvalidArgument(f"Negative seek position {pos}")
            self._pos = pos
            return pos

    def tell(self) -> int:
        """The stream position."""
        self._check_open()
        return self._pos

    def readinto(self, buffer: Any) -> int:
        """Read into ``buffer`` from the stream position; returns the bytes read (0 at the end)."""
        self._check_open()
        view = memoryview(buffer).cast("B")
        with self._pos_lock:
            pos = self._pos
            n = self._readinto_at(pos, view)
            self._pos = pos + n
        return n

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes from the stream position (all the rest when ``size`` < 0)."""
        self._check_open()
        with self._pos_lock:
            pos = self._pos
            n = self._size - pos if size is None or size < 0 else min(size, self._size - pos)
            if n <= 0:
                return b""
            data = self._pread(pos, n)
            self._pos = pos + len(data)
        return data

    def readall(self) -> bytes:
        """The rest of the stream."""
        return self.read(-1)

    def write(self, data: Any) -> int:
        """Write at the stream position (within the virtual size); returns the bytes written."""
        self._check_writable()
        view = memoryview(data).cast("B")
        with self._pos_lock:
            n = self._pwrite(self._pos, view)
            self._pos += n
        return n

    def flush(self) -> None:
        """Write the image's pending metadata and flush it to its file."""
        if self.closed:
            return
        if self._writable and self._chain is not None:
            with self._io_lock:  # type: ignore[union-attr]
                top = self._chain.top
                top.write_metadata()
                top.flush()

    def close(self) -> None:
        """Flush (when writable) and close the image and its backing files.  Safe to call twice."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            chain, self._chain = self._chain, None
            if chain is not None:
                chain.close()
            super().close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._size} bytes"
        return f"<qimg.Image {self._name!r} {state}>"

    # ----- positional, thread-safe -----
    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end, ``b""`` past it).  Thread-safe."""
        self._check_open()
        _check_range(offset, length)
        n = min(length, self._size - offset)
        return self._pread(offset, n) if n > 0 else b""

    def preadinto(self, offset: int, buffer: Any) -> int:
        """Fill ``buffer`` from ``offset``; returns the bytes read (0 past the end).  Thread-safe."""
        self._check_open()
        view = memoryview(buffer).cast("B")
        _check_range(offset, len(view))
        return self._readinto_at(offset, view)

    def pwrite(self, offset: int, data: Any) -> int:
        """Write ``data`` at ``offset`` (it must fit in the virtual size); returns its length.  Thread-safe."""
        self._check_writable()
        view = memoryview(data).cast("B")
        _check_range(offset, len(view))
        return self._pwrite(offset, view)

    def _readinto_at(self, offset: int, view: memoryview) -> int:
        n = min(len(view), self._size - offset)
        if n <= 0:
            return 0
        chain = self._open_chain()
        if self._io_lock is None:
            chain.readinto(offset, view[:n])
        else:
            with self._io_lock:
                chain.readinto(offset, view[:n])
        return n

    def _pread(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self._readinto_at(offset, memoryview(buf))
        return bytes(buf)

    def _pwrite(self, offset: int, view: memoryview) -> int:
        if offset + len(view) > self._size:
            raise InvalidArgument(f"Cannot write {len(view)} bytes at offset {offset}: "
                                  f"the image ends at {self._size} (resize it first)")
        if not len(view):
            return 0
        with self._io_lock:  # type: ignore[union-attr]
            self._open_chain().top.pwrite(offset, view)
        return len(view)

    # ----- what qimg's commands show -----
    def extents(self, start: int = 0, length: int | None = None) -> Iterator[MapEntry]:
        """The coalesced extents of ``[start, start+length)`` as ``qimg map`` reports them.

        Each has ``start``, ``length``, ``data``, ``zero``, ``present``, ``depth`` and ``offset`` (the
        host offset, or None); ``to_dict()`` is one entry of ``qimg map --output=json``.
        """
        from ..ops.map import map_entries

        self._check_open()
        _check_range(start, 0 if length is None else length)
        return map_entries(self._open_chain(), start, length)

    def info(self) -> ImageInfo:
        """What ``qimg info`` shows about this image; ``to_dict()`` is its ``--output=json``."""
        from ..ops.info import layer_info
        from .results import ImageInfo

        chain = self._open_chain()
        return ImageInfo.from_dict(layer_info(chain.top, chain.filenames[0]))

    def check(self, repair: str | None = None) -> CheckResult:
        """``qimg check``: the image's consistency (``repair`` "leaks" or "all" needs ``writable=True``)."""
        from ..ops.check import validate_repair
        from .results import CheckResult

        validate_repair(repair)
        if repair and not self._writable:
            raise ReadOnlyError(f"Could not repair '{self._name}': the image is opened read-only")
        chain = self._open_chain()
        if self._io_lock is None:
            res = chain.top.check(repair)
        else:
            with self._io_lock:
                res = chain.top.check(repair)
        return CheckResult.from_result(res, chain.filenames[0], chain.top.format_name)

    # ----- helpers -----
    def _open_chain(self) -> Any:
        if self._chain is None:
            raise ClosedImage(f"I/O operation on closed image '{self._name}'")
        return self._chain

    def _check_open(self) -> None:
        if self.closed or self._chain is None:
            raise ClosedImage(f"I/O operation on closed image '{self._name}'")

    def _check_writable(self) -> None:
        self._check_open()
        if not self._writable:
            raise ReadOnlyError(f"Image '{self._name}' is opened read-only")


def _check_range(offset: int, length: int) -> None:
    if offset < 0:
        raise InvalidArgument(f"Negative offset {offset}")
    if length < 0:
        raise InvalidArgument(f"Negative length {length}")

__all__ = ["Image", "Layer", "open"]
