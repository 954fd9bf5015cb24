"""The driver protocol: one format, one layer.

A driver answers for its own layer only: ``block_status`` says what a range is in this
file, ``pread`` returns its bytes (zeros where this layer holds nothing).  Backing files,
sibling files and probing belong to ``Chain`` and the ``Opener``; drivers never import the
registry.  Every optional hook raises ``Unsupported`` with qemu-img's wording.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import QimgError, Unsupported
from .extent import Extent


def c_string(raw: bytes) -> str:
    """A name field read as qemu reads it: a C string, so it ends at the first NUL; UTF-8, errors replaced."""
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass
class BackingRef:
    """A backing file as recorded in an image: name as written, and format if recorded."""

    filename: str
    fmt: str | None = None


@dataclass
class CreateOptions:
    """What ``create`` hands a driver: the parsed -o options plus the common flags."""

    size: int | None
    options: dict = field(default_factory=dict)
    backing_file: str | None = None
    backing_fmt: str | None = None
    backing_size: int | None = None


class Opener:
    """Opens files beside an image (extents, data files) for a driver, relative to its directory."""

    def __init__(self, base_filename: str, writable: bool = False, open_image=None):
        self.base_filename = base_filename
        self.base_dir = os.path.dirname(base_filename)
        self.writable = writable
        self._open_image = open_image

    def resolve(self, name: str) -> str:
        """A sibling's path: relative names live in the image's directory (the image itself stays as named)."""
        if name == self.base_filename or os.path.isabs(name) or not self.base_dir:
            return name
        return os.path.join(self.base_dir, name)

    def open_file(self, name: str, writable: bool | None = None, create: bool = False):
        from ..io.store import FileStore
        from .registry import get_driver, protocol_for

        w = self.writable if writable is None else writable
        proto = protocol_for(name)
        if proto is not None and hasattr(get_driver(proto), "open_store"):
            # nbd and the like: "creating" means using the existing export
            return get_driver(proto).open_store(name, w, {})
        if create:
            return FileStore(self.resolve(name), w, create=True)
        store = FileStore(self.resolve(name), w, lock=None)
        try:
            from ..io import lock

            if lock.sibling_locking():
                # an extent with its own metadata (sparse vmdk) is locked as an image, others as data files
                metadata = store.pread(0, 4) in (b"KDMV", b"COWD")
                store.lock(*lock.sibling_perms(w, metadata))
        except BaseException:
            store.close()
            raise
        return store

    def open_image(self, name: str, fmt: str | None = None, writable: bool | None = None):
        if self._open_image is None:
            raise QimgError("cannot open nested images here")
        return self._open_image(self.resolve(name), fmt, self.writable if writable is None else writable)


class Driver:
    """Base class for format drivers."""

    format_name = ""
    #: qemu-img's wording for create: "Formatting 'x', fmt=NAME ..." uses format_name
    create_opts: tuple = ()
    supports_backing = False

    def __init__(self, store, filename: str, writable: bool = False, opener: Opener | None = None):
        self.store = store
        self.filename = filename
        self.writable = writable
        self.opener = opener
        self.virtual_size = 0
        self.backing: BackingRef | None = None

    # ----- probing, opening, creating -----
    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        """Score 0..100 that ``head`` (first bytes of the file) is this format."""
        return 0

    @classmethod
    def open(cls, store, filename: str, writable: bool = False, opener: Opener | None = None, options=None):
        drv = cls(store, filename, writable, opener)
        drv._open(options or {})
        return drv

    def _open(self, options: dict) -> None:
        pass

    @classmethod
    def create(cls, filename: str, opts: CreateOptions, opener: Opener) -> None:
        raise Unsupported(f"Format driver '{cls.format_name}' does not support image creation")

    # ----- the read side -----
    @property
    def cluster_size(self) -> int | None:
        return None

    def block_status(self, offset: int, length: int) -> Extent:
        """The first extent at ``offset`` (at most ``length`` long) in this layer."""
        return Extent(offset, length, data=True, zero=False, present=True)

    def pread(self, offset: int, length: int) -> bytes:
        """This layer's bytes at ``offset`` (zeros where it holds nothing)."""
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf) -> None:
        """Fill ``buf`` from ``offset`` by walking ``block_status``: host bytes where a run has a
        plain host offset, zeros elsewhere.  Formats with compressed or encrypted data override it."""
        view = memoryview(buf).cast("B")
        total = len(view)
        pos = 0
        while pos < total:
            ext = self.block_status(offset + pos, total - pos)
            n = min(ext.length, total - pos)
            if n <= 0:
                raise QimgError(f"driver returned an empty extent at offset {offset + pos}")
            sub = view[pos:pos + n]
            if ext.data and ext.offset is not None:
                got = self.store.readinto(ext.offset, sub)
                if got < n:
                    sub[got:] = bytes(n - got)  # past the end of the host file reads as zeros
            else:
                sub[:] = bytes(n)
            pos += n

    def info_specific(self) -> dict | None:
        """qemu's ImageInfoSpecific as a dict ({"type": ..., "data": {...}}) or None."""
        return None

    def info_extra(self) -> dict:
        """Extra ImageInfo keys (cluster-size, encrypted, snapshots, dirty-flag...)."""
        return {}

    def allocated_file_size(self) -> int:
        """``disk size``: bytes allocated on the host for this image (and its extents)."""
        return self.store.allocated_size()

    # ----- the write side -----
    @property
    def has_zero_init(self) -> bool:
        """True when a freshly created image of this kind reads as zeros everywhere."""
        return False

    def pwrite(self, offset: int, data) -> None:
        raise Unsupported(f"Format driver '{self.format_name}' does not support writing")

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        """Make a range read as zeros (default: write zero buffers)."""
        chunk = 1 << 20
        zero = bytes(min(chunk, length))
        pos = offset
        end = offset + length
        while pos < end:
            n = min(chunk, end - pos)
            self.pwrite(pos, zero[:n])
            pos += n

    def write_compressed(self, offset: int, data) -> None:
        raise Unsupported("Compression not supported for this file format")

    #: whether the copy engine's worker threads may write this image themselves, in any order:
    #: "" no (writes go through ``pwrite`` in guest order from one thread); "free" yes, with no
    #: metadata to protect (raw); "locked" yes, with ``direct_map`` and every other call made under
    #: the engine's lock (a freshly created image whose metadata only matters once it is complete)
    direct_writes = ""

    def direct_map(self, offset: int, length: int):
        """Where guest bytes [offset, offset + length) are to be written: [(store, host offset, n), ...]
        in guest order, with space (and metadata) reserved for them; None when the range must go
        through ``pwrite`` (for instance because it updates data already there)."""
        return None

    def discard(self, offset: int, length: int) -> None:
        pass

    def write_metadata(self) -> None:
        """Write the tables a driver keeps in memory (block maps, footers); flush, finalize and close call it."""

    def flush(self) -> None:
        self.write_metadata()
        self.store.flush()

    def finalize(self) -> None:
        """Called by convert once all data is written, before close."""
        self.write_metadata()

    def truncate(self, size: int, shrink: bool = False, prealloc: str = "off") -> None:
        raise Unsupported("Image format driver does not support resize")

    def set_backing(self, filename: str | None, fmt: str | None) -> None:
        raise Unsupported(f"Operation not supported for image format '{self.format_name}'")

    def make_empty(self) -> None:
        raise Unsupported(f"Format driver '{self.format_name}' does not support emptying the image")

    def check(self, repair: str | None = None):
        from ..errors import CheckUnsupported

        raise CheckUnsupported("This image format does not support checks")

    def snapshots(self) -> list:
        return []

    def close(self) -> None:
        if self.store is not None:
            try:
                self.write_metadata()
            finally:
                self.store.close()
                self.store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
