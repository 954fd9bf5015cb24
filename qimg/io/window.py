"""A window of another store: ``offset`` bytes in, ``size`` bytes long (qemu's raw driver with
offset/size options, used as the file of another format: a VMDK inside an OVA, any image inside a
container)."""

from __future__ import annotations

from ..errors import QimgError
from .store import Store


class WindowStore(Store):
    """Bytes [offset, offset + size) of ``inner``; reads past the window's end are short, as at EOF."""

    fd = -1  # no direct lseek on the host file: hole queries go through next_data/next_hole

    def __init__(self, inner: Store, offset: int = 0, size: int | None = None):
        self.inner = inner
        self.offset = offset
        self.filename = inner.filename
        self.writable = False
        avail = max(inner.size() - offset, 0)
        if size is not None and size > avail:
            raise QimgError(f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the "
                            f" actual size of the containing file ({inner.size()})")
        self._size = avail if size is None else size
        self.dev_ino = None

    def _clip(self, offset: int, length: int) -> int:
        return max(min(length, self._size - offset), 0)

    def pread(self, offset: int, length: int) -> bytes:
        n = self._clip(offset, length)
        return self.inner.pread(self.offset + offset, n) if n else b""

    def pread_full(self, offset: int, length: int) -> bytes:
        data = self.pread(offset, length)
        if len(data) != length:
            raise QimgError(f"Read of {length} bytes at offset {offset} ends past the end of the file")
        return data

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        data = self.pread(offset, len(view))
        view[:len(data)] = data
        return len(data)

    def pwrite(self, offset: int, data) -> None:
        raise QimgError("Write on a window of a file is not supported")

    def size(self) -> int:
        return self._size

    def truncate(self, size: int) -> None:
        raise QimgError("Cannot resize a window of a file")

    def allocated_size(self) -> int:
        return self.inner.allocated_size()

    def next_data(self, offset: int) -> int | None:
        if offset >= self._size:
            return None
        nxt = self.inner.next_data(self.offset + offset)
        if nxt is None or nxt - self.offset >= self._size:
            return None
        return max(nxt - self.offset, offset)

    def next_hole(self, offset: int) -> int:
        return min(max(self.inner.next_hole(self.offset + offset) - self.offset, offset), self._size)

    def lock(self, perm: int, unshare: int, strict: bool = False) -> None:
        lock = getattr(self.inner, "lock", None)
        if lock is not None:
            lock(perm, unshare, strict)

    def close(self) -> None:
        self.inner.close()
