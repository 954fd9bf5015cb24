"""Stores for looking at an image without taking it in: one that counts what is read, one over a stream.

``inspect`` promises to read only what its verdict needs; ``CountingStore`` makes that measurable
(its ``bytes_read`` is reported and tested).  ``StreamStore`` serves a pipe: the stream is read
forward once, its first ``window`` bytes are kept so that a driver may read its headers and tables
there in any order, and its last bytes are kept once the end is reached.  A read anywhere else is
refused with ``StreamWindowError`` (the image needs more than a stream can give without spooling).
"""

from __future__ import annotations

from ..errors import QimgError
from .store import Store
from .stream import StreamReader

#: bytes of a stream kept from its start (headers and the tables drivers read at open)
STREAM_WINDOW = 16 << 20
#: bytes kept from a stream's end (footers and trailers: VHD, DMG, streamOptimized VMDK)
STREAM_TAIL = 64 << 10
_READ = 1 << 20


class StreamWindowError(QimgError):
    """A read a stream cannot serve: outside the kept start and the kept end."""


class CountingStore(Store):
    """Any store, with the bytes read from it counted."""

    def __init__(self, inner):
        self.inner = inner
        self.filename = getattr(inner, "filename", "")
        self.writable = False
        self.bytes_read = 0

    def __getattr__(self, name):  # everything not counted is the inner store's
        return getattr(self.inner, name)

    def pread(self, offset: int, length: int) -> bytes:
        data = self.inner.pread(offset, length)
        self.bytes_read += len(data)
        return data

    def pread_full(self, offset: int, length: int) -> bytes:
        data = self.pread(offset, length)
        return data + bytes(length - len(data)) if len(data) < length else data

    def readinto(self, offset: int, buf) -> int:
        n = self.inner.readinto(offset, buf)
        self.bytes_read += n
        return n

    def size(self) -> int:
        return self.inner.size()

    def allocated_size(self) -> int:
        return self.inner.allocated_size()

    def next_data(self, offset: int):
        return self.inner.next_data(offset)

    def next_hole(self, offset: int) -> int:
        return self.inner.next_hole(offset)

    def close(self) -> None:
        self.inner.close()


class StreamStore(Store):
    """A pipe (or any file descriptor read forward once), as a read-only store over its window."""

    allocation_unknown = True

    def __init__(self, fd: int, filename: str, window: int = STREAM_WINDOW, tail: int = STREAM_TAIL):
        self.reader = StreamReader(fd, filename)  # (the descriptor stays the caller's to close)
        self.filename = filename
        self.writable = False
        self.window = window
        self.tail_bytes = tail
        self.head = bytearray()
        self.tail = b""

    @property
    def consumed(self) -> int:
        """Bytes taken from the stream so far."""
        return self.reader.pos

    @property
    def eof(self) -> bool:
        return self.reader.eof

    @property
    def bytes_read(self) -> int:
        return self.consumed

    def _take(self, n: int) -> bytes:
        return self.reader.read(n)

    def _fill(self, end: int) -> None:
        """Read forward until the kept start reaches ``end`` (or the window, or the stream's end)."""
        end = min(end, self.window)
        while len(self.head) < end and not self.eof and self.consumed == len(self.head):
            self.head += self._take(min(_READ, end - len(self.head)))

    def drain(self) -> int:
        """Read the stream to its end, keeping the window and the last ``tail`` bytes; its length."""
        self._fill(self.window)
        keep = bytearray(self.tail)
        while not self.eof:
            data = self._take(_READ)
            keep += data
            if len(keep) > self.tail_bytes:
                del keep[:len(keep) - self.tail_bytes]
        self.tail = bytes(keep) if self.consumed > len(self.head) else bytes(self.head[-self.tail_bytes:])
        return self.consumed

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        end = offset + length
        if end <= self.window:
            self._fill(end)
            if offset >= len(self.head) and not self.eof:
                raise StreamWindowError(f"'{self.filename}' cannot be read at offset {offset}: a stream is read "
                                        "forward once")
            return bytes(self.head[offset:end])
        if not self.eof:
            self.drain()
        size = self.consumed
        if offset >= size:
            return b""
        end = min(end, size)
        tail_start = size - len(self.tail)
        if offset >= tail_start:
            return self.tail[offset - tail_start:end - tail_start]
        if end <= len(self.head):
            return bytes(self.head[offset:end])
        raise StreamWindowError(f"'{self.filename}' would have to be read at offset {offset}, outside the first "
                                f"{self.window} and the last {self.tail_bytes} bytes kept from a stream")

    def pread_full(self, offset: int, length: int) -> bytes:
        data = self.pread(offset, length)
        return data + bytes(length - len(data)) if len(data) < length else data

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        data = self.pread(offset, len(view))
        view[:len(data)] = data
        return len(data)

    def size(self) -> int:
        if not self.eof:
            self.drain()
        return self.consumed

    def allocated_size(self) -> int:
        return self.size()

    def close(self) -> None:
        self.head = bytearray()
        self.tail = b""
