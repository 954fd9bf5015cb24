"""raw: the guest bytes as they are, holes kept as holes.

References: none needed; qemu-img's behaviour (file-posix: the first 4 KiB are allocated
at create time so that alignment probing works, sizes round up to 512 bytes).
"""

from __future__ import annotations

import errno
import os

from ..core.driver import CreateOptions, Driver
from ..core.extent import Extent
from ..errors import QimgError
from ..options import FILE_PROTOCOL_OPTS, SIZE_OPT, option_text
from ..units import round_up

SECTOR = 512
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
_NO_MORE_DATA = 1 << 63  # end of a host run with no data after it (holes up to the end of the image)


class RawDriver(Driver):
    """A plain file: guest offset == host offset."""

    format_name = "raw"
    lock_passthrough = True  # the guest's bytes: the user's permissions pass through to the file
    create_opts = (SIZE_OPT,)  # (preallocation belongs to the host file: ops.create.FILE_PROTOCOL_OPTS)

    def _open(self, options: dict) -> None:
        self.offset = int(options.get("offset", 0))
        self._size = None
        self._run = None  # the last host data/hole run found (read-only opens)
        size = self._file_size() - self.offset
        if "size" in options:
            size = int(options["size"])
        self.virtual_size = round_up(max(size, 0), SECTOR)

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 1

    @property
    def has_zero_init(self) -> bool:
        return not getattr(self.store, "is_block", False)

    def _file_size(self) -> int:
        """The host file size; cached while the image is open read-only (one fstat per open, not per call)."""
        if self.writable:
            return self.store.size()
        size = self._size
        if size is None:
            size = self._size = self.store.size()
        return size

    def _host_run(self, host: int, file_size: int):
        """(start, end, data) of the host data/hole run holding ``host`` (< file_size): two lseeks at most."""
        store = self.store
        fd = getattr(store, "fd", -1)
        if fd is not None and fd >= 0 and getattr(store, "_holes_ok", False) and not getattr(store, "is_block", True):
            try:
                nxt = os.lseek(fd, host, SEEK_DATA)
            except OSError as e:
                nxt = None if e.errno == errno.ENXIO else -1
            if nxt is None or nxt >= file_size:
                return host, _NO_MORE_DATA, False
            if nxt > host:
                return host, nxt, False
            if nxt == host:
                try:
                    hole = min(os.lseek(fd, host, SEEK_HOLE), file_size)
                except OSError:
                    hole = file_size
                return host, max(hole, host + 1), True
        # no SEEK_DATA here (or it failed): the store's own logic decides
        nxt = store.next_data(host)
        if nxt is None:
            return host, _NO_MORE_DATA, False
        if nxt > host:
            return host, nxt, False
        return host, max(store.next_hole(host), host + 1), True

    def block_status(self, offset: int, length: int) -> Extent:
        host = offset + self.offset
        end = min(offset + length, self.virtual_size)
        file_size = self._file_size()
        if host >= file_size:
            return Extent(offset, end - offset, data=False, zero=True, present=True, offset=host)
        run = None if self.writable else self._run
        if run is None or not run[0] <= host < run[1]:
            run = self._host_run(host, file_size)
            if not self.writable:
                self._run = run  # one tuple: safe to share between reader threads
        n = max(min(run[1] - host, end - offset), 1)
        if run[2]:
            return Extent(offset, n, data=True, zero=False, present=True, offset=host)
        return Extent(offset, n, data=False, zero=True, present=True, offset=host)

    def pread(self, offset: int, length: int) -> bytes:
        return self.store.pread_full(offset + self.offset, length)

    def readinto(self, offset: int, buf) -> None:
        n = self.store.readinto(offset + self.offset, buf)
        if n < len(buf):
            memoryview(buf)[n:] = bytes(len(buf) - n)

    def pwrite(self, offset: int, data) -> None:
        self.store.pwrite(offset + self.offset, data)

    @property
    def direct_writes(self) -> str:
        # a host file or device keeps no metadata: the copy engine's workers may write it concurrently
        fd = getattr(self.store, "fd", -1)
        return "free" if self.writable and fd is not None and fd >= 0 else ""

    def direct_map(self, offset: int, length: int):
        return ((self.store, offset + self.offset, length),)

    def plain_host_file(self, start: int, end: int):
        """A raw image over a regular file holds every guest byte at guest offset + ``offset``."""
        fd = getattr(self.store, "fd", -1)
        if fd is None or fd < 0 or getattr(self.store, "is_block", True):
            return None
        return fd, start + self.offset

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        host = offset + self.offset
        size = self.store.size()
        if host >= size:
            return  # past EOF already reads as zeros
        if may_unmap and hasattr(self.store, "punch_hole") and self.store.punch_hole(host, min(length, size - host)):
            return
        super().write_zeroes(offset, min(length, size - host), may_unmap)

    def truncate(self, size: int, shrink: bool = False, prealloc: str = "off") -> None:
        old = self.store.size()
        if size < old and not shrink:
            raise QimgError("Use the --shrink option to perform a shrink operation.")
        self.store.truncate(size)
        self._size = self._run = None
        if size > old:
            _preallocate(self.store, old, size, prealloc)
        self.virtual_size = round_up(size, SECTOR)

    @classmethod
    def create(cls, filename: str, opts: CreateOptions, opener) -> None:
        prealloc = opts.options.get("preallocation", "off")
        if prealloc not in ("off", "falloc", "full"):
            raise QimgError(f"invalid parameter value: {prealloc}")
        size = round_up(opts.size or 0, SECTOR)
        with opener.open_file(filename, writable=True, create=True) as store:
            store.truncate(size)
            _preallocate(store, 0, size, prealloc)
            if prealloc == "off" and size:
                # qemu allocates the first block so alignment probing works; keep disk usage alike
                store.pwrite(0, bytes(min(4096, size)))

    @classmethod
    def measure(cls, options: dict, size: int, src=None) -> dict:
        """qemu-img measure for raw: every byte of the virtual size is stored."""
        required = round_up(size, SECTOR)
        return {"required": required, "fully-allocated": required}

    @classmethod
    def format_line_options(cls, opts: CreateOptions) -> list[tuple[str, str]]:
        out = [("size", str(opts.size or 0))]
        if "preallocation" in opts.options:
            out.append(("preallocation", opts.options["preallocation"]))
        return out


def _preallocate(store, start: int, end: int, prealloc: str) -> None:
    if end <= start or prealloc == "off":
        return
    if prealloc == "falloc":
        store.fallocate(start, end - start)
    elif prealloc == "full":
        chunk = bytes(1 << 20)
        pos = start
        while pos < end:
            n = min(len(chunk), end - pos)
            store.pwrite(pos, chunk[:n])
            pos += n


class FileDriver(RawDriver):
    """qemu's ``file`` protocol driver named as the format (``-f file``, ``--image-opts
    driver=file,filename=...``): the host file itself, which reads and writes as raw does; its
    creation options are the host file's own (nocow, preallocation, extent_size_hint)."""

    format_name = "file"
    create_opts = FILE_PROTOCOL_OPTS

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 0

    @classmethod
    def format_line_options(cls, opts: CreateOptions) -> list[tuple[str, str]]:
        out = [("size", str(opts.size or 0))]
        for spec in FILE_PROTOCOL_OPTS:
            if spec.name in opts.options and spec.name != "size":
                out.append((spec.name, option_text(spec, opts.options[spec.name])))
        return out

