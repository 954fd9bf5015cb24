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
from .policy import check_host, read_host


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
    """The one way an image reaches the files it names (extents, data files, bundle storages).

    Relative names resolve in the image's directory.  Every reference is checked and recorded by the
    open's ``Guard`` (qimg.core.policy) before anything is opened; the Guard also counts the
    metadata memory the drivers of this open keep (``charge``)."""

    def __init__(self, base_filename: str, writable: bool = False, open_image=None, guard=None,
                 image: str | None = None, open_backing=None):
        self.base_filename = base_filename
        self.base_dir = os.path.dirname(base_filename)
        self.writable = writable
        self._open_image = open_image
        self._open_backing = open_backing
        self.guard = guard
        self.image = image or base_filename

    @property
    def strict(self) -> bool:
        """Untrusted mode: structure errors qemu-img reads past are refused."""
        return self.guard is not None and self.guard.strict

    def resolve(self, name: str) -> str:
        """A sibling's path: relative names live in the image's directory (the image itself stays as named)."""
        if name == self.base_filename or os.path.isabs(name) or not self.base_dir:
            return name
        return os.path.join(self.base_dir, name)

    def check(self, name: str, kind: str, resolved: str | None = None) -> str:
        """Resolve a reference and let the policy refuse it (PolicyError); the path to open."""
        path = self.resolve(name) if resolved is None else resolved
        if self.guard is not None:
            self.guard.reference(self.image, name, path, kind)
        return path

    def charge(self, what: str, nbytes: int) -> None:
        """Count metadata this open keeps in memory against the policy's budget."""
        if self.guard is not None:
            self.guard.charge(self.image, what, nbytes)

    def release(self, nbytes: int) -> None:
        """Give back metadata memory (a cache entry dropped)."""
        if self.guard is not None:
            self.guard.release(nbytes)

    def open_file(self, name: str, writable: bool | None = None, create: bool = False, metadata: bool = False,
                  kind: str = "data file", resolved: str | None = None):
        """A store over the file ``name`` the image names (or, with ``create``, one a create call makes),
        admitted by the policy as a reference of ``kind``; ``metadata``: it has metadata of its own (a
        sparse VMDK extent) and is locked as an image, else as a data file."""
        from ..io.store import FileStore
        from .catalog import get_driver, protocol_for

        w = self.writable if writable is None else writable
        path = (resolved or self.resolve(name)) if create else self.check(name, kind, resolved)
        proto = protocol_for(name)
        if proto is not None and get_driver(proto).provides_store:
            # nbd and the like: "creating" means using the existing export
            return get_driver(proto).open_store(name, w, {})
        if create:
            return FileStore(path, w, create=True)
        store = FileStore(path, w, lock=None)
        try:
            from ..io import lock

            if lock.sibling_locking():
                store.lock(*lock.sibling_perms(w, metadata))
        except BaseException:
            store.close()
            raise
        return store

    def backing_path(self, name: str) -> str:
        """Where the backing file ``name`` of this image resolves (relative to the image, as qemu does)."""
        from .catalog import resolve_backing

        return resolve_backing(self.image, name)

    def open_backing(self, name: str, fmt: str | None = None, options: dict | None = None, backing: bool = True):
        """The chain of a backing file this image (being created) names, opened under the same policy by
        the ``open_backing(path, fmt, options, backing)`` its creator gave."""
        if self._open_backing is None:
            raise QimgError("cannot open backing files here")
        return self._open_backing(self.backing_path(name), fmt, options, backing)

    def open_image(self, name: str, fmt: str | None = None, writable: bool | None = None, kind: str = "storage"):
        """A nested image the image names (a Parallels bundle's storage), opened under the same policy."""
        if self._open_image is None:
            raise QimgError("cannot open nested images here")
        path = self.check(name, kind)
        return self._open_image(path, fmt, self.writable if writable is None else writable)


class Driver:
    """Base class for format drivers: the whole contract a format may implement, on one page.

    Capabilities are class attributes; every optional hook has a default that either does the
    generic thing or raises ``Unsupported`` with qemu-img's message (and exit code).  ops/ and
    engine/ call these directly: a format implements a hook by overriding it, nothing is looked
    up by name."""

    format_name = ""
    #: qemu-img's wording for create: "Formatting 'x', fmt=NAME ..." uses format_name
    create_opts: tuple = ()
    supports_backing = False

    # ----- capabilities (declared, never probed for) -----
    #: ``convert -c`` can write this format (``write_compressed``/``prepare_compressed``)
    supports_compression = False
    #: the image file is the guest's bytes (raw, luks, file): locks pass the user's permissions
    #: through instead of being taken as a format image (see io.lock.image_perms)
    lock_passthrough = False
    #: a protocol driver (nbd) whose ``open_store`` gives a byte store any format may sit on;
    #: protocols without one (vvfat) open through ``open_protocol``
    provides_store = False
    #: whether the copy engine's worker threads may write this image themselves, in any order:
    #: "" no (writes go through ``pwrite`` in guest order from one thread); "free" yes, with no
    #: metadata to protect (raw); "locked" yes, with ``direct_map`` and every other call made under
    #: the engine's lock (a freshly created image whose metadata only matters once it is complete)
    direct_writes = ""
    #: the name ``info`` shows when it is not the one opened (vvfat's "fat:..." directory)
    display_filename: str | None = None

    def __init__(self, store, filename: str, writable: bool = False, opener: Opener | None = None):
        self.store = store
        self.filename = filename
        self.writable = writable
        self.opener = opener
        self.virtual_size = 0
        self.backing: BackingRef | None = None
        #: the guest view of the layers below (set by Chain): what copy-on-write reads
        self.below = None

    @property
    def strict(self) -> bool:
        """Untrusted mode: a table entry past EOF or misaligned is an error, not zeros."""
        return self.opener is not None and self.opener.strict

    def charge(self, what: str, nbytes: int) -> None:
        """Count ``nbytes`` of metadata kept in memory against the open's budget (untrusted mode)."""
        if self.opener is not None:
            self.opener.charge(what, nbytes)

    def read_host(self, store, host: int, view) -> None:
        """Fill ``view`` from ``store`` at ``host``: past the end of the file qemu-img reads zeros; the
        untrusted mode refuses it, naming the image and the offset (qimg.core.policy.read_host)."""
        read_host(store, host, view, self.strict, self.filename)

    def check_host(self, store, host: int, align: int, guest_offset: int, what: str = "host offset") -> None:
        """Untrusted mode: a table entry's host offset is aligned and inside ``store`` (policy.check_host)."""
        check_host(store, host, align, guest_offset, self.filename, what)

    def read_below(self, offset: int, length: int) -> bytes:
        """The backing chain's guest bytes at ``offset`` (zeros without one, or past its end)."""
        buf = bytearray(length)
        if self.below is not None and length > 0:
            self.below.readinto(offset, buf)
        return bytes(buf)

    def readinto_below(self, offset: int, buf) -> None:
        """Fill ``buf`` with the backing chain's guest bytes at ``offset`` (zeros without one)."""
        if self.below is not None:
            self.below.readinto(offset, buf)
        else:
            view = memoryview(buf).cast("B")
            view[:] = bytes(len(view))

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
    def open_store(cls, filename: str, writable: bool = False, options: dict | None = None):
        """A protocol's byte store (``provides_store``), for the registry to open a format on."""
        raise Unsupported(f"Driver '{cls.format_name}' does not provide a store")

    @classmethod
    def open_protocol(cls, filename: str, writable: bool = False, options: dict | None = None):
        """A protocol driver opened by its filename alone (``fat:dir``)."""
        raise Unsupported(f"Driver '{cls.format_name}' is not a protocol")

    @classmethod
    def create(cls, filename: str, opts: CreateOptions, opener: Opener) -> None:
        raise Unsupported(f"Format driver '{cls.format_name}' does not support image creation")

    @classmethod
    def can_create(cls) -> bool:
        """Whether the format overrides ``create`` (qemu-img: "does not support image creation")."""
        return cls.create.__func__ is not Driver.create.__func__

    @classmethod
    def format_line_options(cls, opts: CreateOptions) -> list[tuple[str, str]]:
        """The key=value pairs of create's "Formatting 'x', fmt=NAME ..." line (default: size,
        then the given options in ``create_opts`` order)."""
        pairs = [("size", str(opts.size))]
        for spec in cls.create_opts:
            if spec.name in opts.options and spec.name != "size":
                pairs.append((spec.name, str(opts.options[spec.name])))
        return pairs

    @classmethod
    def creates_single_file(cls, options: dict) -> bool:
        """False when create with these options writes files beside the image (extents, data file):
        convert then creates under the target's own name instead of a temporary one."""
        return True

    @classmethod
    def created_files(cls, filename: str, options: dict) -> list[str]:
        """Every file create writes for ``filename`` with these options (removed if convert fails)."""
        return [filename]

    @classmethod
    def measure(cls, options: dict, size: int, src=None) -> dict:
        """qemu-img measure: {"required", "fully-allocated"[, "bitmaps"]} for ``size`` bytes or ``src``
        (an engine source with ``extents``)."""
        raise Unsupported(f"Block driver '{cls.format_name}' does not support size measurement")

    @classmethod
    def amend_help(cls) -> str:
        """``amend -o help``: the options this format can change."""
        raise Unsupported(f"Format driver '{cls.format_name}' does not support option amendment")

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
                self.read_host(self.store, ext.offset, sub)
            else:
                sub[:] = bytes(n)
            pos += n

    def plain_host_file(self, start: int, end: int):
        """(fd, host offset of ``start``) when guest bytes [start, end) lie as they are in one host
        file (the copy engine may then copy them in the kernel); None otherwise."""
        return None

    def check_backing(self, parent, parent_filename: str) -> None:
        """Before this layer first reads through to ``parent``, refuse a backing file that changed
        under it (a VMDK whose parent's CID moved on).  Default: any parent will do."""

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

    def prepare_compressed(self, offset: int, data):
        """The thread-safe half of a compressed write (compressing ``data`` in a worker thread), whose
        result the engine hands to ``write_prepared`` from its writer thread; None: the engine calls
        ``write_compressed`` with the bytes instead."""
        return None

    def write_prepared(self, offset: int, prepared) -> None:
        """Write what ``prepare_compressed`` returned, in guest order."""
        raise Unsupported("Compression not supported for this file format")

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

    # ----- lifecycle hooks (qemu-img's commands beyond copying) -----
    def truncate(self, size: int, shrink: bool = False, prealloc: str = "off") -> None:
        raise Unsupported("Image format driver does not support resize")

    def set_backing(self, filename: str | None, fmt: str | None) -> None:
        raise Unsupported(f"Operation not supported for image format '{self.format_name}'")

    def make_empty(self) -> None:
        raise Unsupported(f"Format driver '{self.format_name}' does not support emptying the image")

    def check(self, repair: str | None = None):
        """A ``core.check.CheckResult``; qemu-img exits 63 for a format without checks."""
        from ..errors import CheckUnsupported

        raise CheckUnsupported("This image format does not support checks")

    def amend(self, options: dict, force: bool = False) -> None:
        """``qemu-img amend -o``: change format options in place."""
        raise Unsupported(f"Format driver '{self.format_name}' does not support option amendment")

    # ----- internal snapshots -----
    def snapshots(self) -> list:
        """The internal snapshots (format objects); empty for formats without any."""
        return []

    def snapshot_infos(self) -> list[dict]:
        """qemu's SnapshotInfo dicts (id, name, vm-state-size, date-sec/-nsec, vm-clock-sec/-nsec, icount)."""
        return [s if isinstance(s, dict) else s.info() for s in self.snapshots()]

    def snapshot_create(self, name: str) -> None:
        raise Unsupported(f"Could not create snapshot '{name}': -95 (Operation not supported)")

    def snapshot_apply(self, name: str) -> None:
        raise Unsupported(f"Could not apply snapshot '{name}': Block driver does not support snapshots")

    def snapshot_delete(self, name: str) -> None:
        raise Unsupported(f"Could not delete snapshot '{name}': snapshot not found")

    def load_snapshot(self, snapshot: dict) -> None:
        """Show the image as it was at an internal snapshot (``-l``), read-only."""
        raise Unsupported(f"Block format '{self.format_name}' used by device '' "
                          "does not support temporarily loading internal snapshots")

    # ----- persistent dirty bitmaps -----
    def bitmaps_for_copy(self, skip_broken: bool, warn) -> list:
        """The persistent bitmaps ``convert --bitmaps`` copies out of this image."""
        raise Unsupported("Source lacks bitmap support")

    def prepare_bitmaps(self, fmt_name: str, source: list) -> None:
        """Refuse, before any data is written, bitmaps this image cannot take."""
        raise Unsupported(f"Format driver '{fmt_name}' does not support bitmaps")

    def add_bitmaps(self, bitmaps: list) -> None:
        """Write the bitmaps ``bitmaps_for_copy`` returned (after the data)."""
        raise Unsupported(f"Format driver '{self.format_name}' does not support bitmaps")

    def edit_bitmap(self, name: str, actions: list, granularity: int | None, source=None) -> None:
        """``qemu-img bitmap``: run ``actions`` ((kind, argument), ...) on bitmap ``name``; a format
        without persistent bitmaps fails the first action with qemu-img's message."""
        kind, _arg = actions[0]
        if kind == "add":
            msg = f"Can't store persistent bitmaps to '{self.filename}': Operation not supported"
        else:
            msg = f"Dirty bitmap '{name}' not found"
        raise Unsupported(f"Operation {kind} on bitmap {name} failed: {msg}")

    # ----- closing -----
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
