"""Pipes, FIFOs and sockets: read front to back (``StreamReader``), written front to back
(``SequentialStore``), or spooled to a temporary file when a format needs to seek (``spool``).

A SequentialStore looks like any other store to a format driver, so the drivers that write their
layout front to back (raw, a fixed VHD, a streamOptimized VMDK) write to a pipe unchanged: writes
are held in a bounded buffer of pieces (creation writes a header that is rewritten, a fixed VHD
writes its footer first) and the lowest pieces go out, holes as zeros, once the buffer is full or
the image is closed.  A write behind what is already out means the format needed to seek: it
fails with a message saying so, and nothing has been claimed complete.
"""

from __future__ import annotations

import bisect
import os
import tempfile

from ..errors import QimgError, WriteError
from .store import Store

#: bytes a SequentialStore holds before it sends its lowest pieces out
HIGH_WATER = 8 << 20
LOW_WATER = 2 << 20
_ZEROS = bytes(1 << 20)


class NeedsSeeking(QimgError):
    """A write landed behind what was already sent down the pipe."""


class StreamReader:
    """Front-to-back reads from a descriptor, with the first bytes kept for probing."""

    def __init__(self, fd: int, name: str):
        self.fd = fd
        self.name = name
        self.pos = 0
        self._head = b""
        self.eof = False

    def peek(self, n: int) -> bytes:
        """The first ``n`` bytes (or fewer at the end of the stream), without consuming them."""
        while len(self._head) < n and not self.eof:
            more = self._raw(n - len(self._head))
            if not more:
                break
            self._head += more
        return self._head[:n]

    def _raw(self, n: int) -> bytes:
        try:
            data = os.read(self.fd, n)
        except OSError as e:
            raise QimgError(f"Could not read '{self.name}': {e.strerror}") from None
        if not data:
            self.eof = True
        return data

    def readinto(self, buf) -> int:
        """Fill ``buf`` as far as the stream goes; returns the bytes read (fewer only at its end)."""
        view = memoryview(buf).cast("B")
        done = 0
        if self._head:
            k = min(len(self._head), len(view))
            view[:k] = self._head[:k]
            self._head = self._head[k:]
            done = k
        while done < len(view) and not self.eof:
            try:
                n = os.readv(self.fd, [view[done:]])
            except OSError as e:
                raise QimgError(f"Could not read '{self.name}': {e.strerror}") from None
            if n == 0:
                self.eof = True
                break
            done += n
        self.pos += done
        return done

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def skip(self, n: int) -> int:
        """Consume ``n`` bytes; returns how many there were."""
        done = 0
        while done < n:
            k = len(self.read(min(n - done, 1 << 20)))
            if k == 0:
                break
            done += k
        return done

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def spool(reader: StreamReader, directory: str | None = None) -> str:
    """Copy the rest of a stream into a new temporary file; returns its name (the caller removes it)."""
    from .store import aligned_buffer

    try:
        fd, path = tempfile.mkstemp(prefix="qimg-spool-", suffix=".img", dir=directory)
    except OSError as e:
        raise QimgError(f"Could not spool '{reader.name}' to a temporary file: {e.strerror}") from None
    buf = aligned_buffer(4 << 20)
    try:
        view = memoryview(buf)
        while True:
            n = reader.readinto(view)
            if n == 0:
                break
            try:
                os.write(fd, view[:n])  # a regular file takes the whole write or raises
            except OSError as e:
                raise QimgError(f"Could not spool '{reader.name}' to '{path}': {e.strerror}") from None
        view.release()
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


class SequentialStore(Store):
    """A store over a pipe: pieces are buffered (bounded) and sent in order, holes as zeros."""

    writable = True

    def __init__(self, fd: int, name: str, high: int = HIGH_WATER, low: int = LOW_WATER):
        #: nothing at or past this offset is sent before ``finish`` (None: no limit); see ``Replay``
        self.limit: int | None = None
        self.out_fd = fd
        self.filename = self.display_name = name
        self.dev_ino = (0, id(self))
        self.sent = 0            # bytes already written to the pipe
        self.declared = 0        # the size set by truncate
        self.starts: list[int] = []
        self.pieces: list[bytearray] = []
        self.buffered = 0
        self.high, self.low = high, low

    # ----- pieces -----
    def _end(self) -> int:
        return self.starts[-1] + len(self.pieces[-1]) if self.pieces else self.sent

    def pwrite(self, offset: int, data) -> None:
        data = memoryview(data).cast("B")
        n = len(data)
        if n == 0:
            return
        if offset < self.sent:
            raise NeedsSeeking(f"Could not write '{self.filename}': the format wrote at offset {offset}, before "
                               f"the {self.sent} bytes already sent down the pipe (its layout needs seeking)")
        end = offset + n
        if self.pieces and self.starts[-1] <= offset <= self._end():
            # the usual case: at or inside the last piece
            piece = self.pieces[-1]
            rel = offset - self.starts[-1]
            grow = max(0, rel + n - len(piece))
            piece[rel:rel + n - grow] = data[:n - grow]
            if grow:
                piece += data[n - grow:]
                self.buffered += grow
        else:
            self._insert(offset, end, data)
        if self.buffered > self.high:
            self._send_until(self.low)

    def _insert(self, offset: int, end: int, data) -> None:
        """Merge [offset, end) with every piece it touches."""
        i = bisect.bisect_right(self.starts, offset) - 1
        if i >= 0 and self.starts[i] + len(self.pieces[i]) < offset:
            i += 1
        i = max(i, 0)
        j = i
        while j < len(self.pieces) and self.starts[j] <= end:
            j += 1
        if i == j:
            self.starts.insert(i, offset)
            self.pieces.insert(i, bytearray(data))
            self.buffered += len(data)
            return
        start = min(offset, self.starts[i])
        stop = max(end, self.starts[j - 1] + len(self.pieces[j - 1]))
        merged = bytearray(stop - start)
        for s, p in zip(self.starts[i:j], self.pieces[i:j]):
            merged[s - start:s - start + len(p)] = p
            self.buffered -= len(p)
        merged[offset - start:end - start] = data
        self.starts[i:j] = [start]
        self.pieces[i:j] = [merged]
        self.buffered += len(merged)

    def _send(self, data) -> None:
        view = memoryview(data)
        while len(view):
            try:
                k = os.write(self.out_fd, view)
            except OSError as e:
                raise WriteError(f"Could not write '{self.filename}': {e.strerror}", strerror=e.strerror) from None
            view = view[k:]
        self.sent += len(data)

    def _zeros_to(self, offset: int) -> None:
        while self.sent < offset:
            self._send(_ZEROS[:min(len(_ZEROS), offset - self.sent)])

    def _send_until(self, keep: int) -> None:
        """Send the lowest pieces (and the holes before them) until at most ``keep`` bytes stay buffered."""
        while self.pieces and self.buffered > keep:
            if self.limit is not None and self.starts[0] + len(self.pieces[0]) > self.limit:
                return
            start, piece = self.starts.pop(0), self.pieces.pop(0)
            self.buffered -= len(piece)
            self._zeros_to(start)
            self._send(piece)

    # ----- the store protocol -----
    def pread(self, offset: int, length: int) -> bytes:
        """Reads see what is still buffered; what was sent cannot be read back."""
        if offset < self.sent and length > 0:
            raise NeedsSeeking(f"Could not read '{self.filename}' at offset {offset}: already sent down the pipe")
        out = bytearray(max(0, min(length, self.size() - offset)))
        i = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        for s, p in zip(self.starts[i:], self.pieces[i:]):
            if s >= offset + len(out):
                break
            lo, hi = max(s, offset), min(s + len(p), offset + len(out))
            if lo < hi:
                out[lo - offset:hi - offset] = p[lo - s:hi - s]
        return bytes(out)

    def pread_full(self, offset: int, length: int) -> bytes:
        data = self.pread(offset, length)
        return data + bytes(length - len(data))

    def readinto(self, offset: int, buf) -> int:
        data = self.pread(offset, len(buf))
        memoryview(buf).cast("B")[:len(data)] = data
        return len(data)

    def size(self) -> int:
        return max(self.declared, self._end())

    def truncate(self, size: int) -> None:
        if size < self.sent:
            raise NeedsSeeking(f"Could not resize '{self.filename}': {self.sent} bytes are already sent down the pipe")
        while self.pieces and self.starts[-1] >= size:
            self.buffered -= len(self.pieces.pop())
            self.starts.pop()
        if self.pieces and self._end() > size:
            cut = self._end() - size
            del self.pieces[-1][-cut:]
            self.buffered -= cut
        self.declared = size

    def finish(self) -> None:
        """Send everything, holes and the tail up to the size as zeros."""
        self.limit = None
        self._send_until(0)
        self._zeros_to(self.declared)

    def close(self) -> None:
        if self.out_fd >= 0:
            os.close(self.out_fd)
            self.out_fd = -1


class Borrowed(Store):
    """A store handed to a driver that must not close it (the caller sends it out, then closes it)."""

    def __init__(self, store: Store):
        self._store = store
        self.filename = store.filename
        self.display_name = getattr(store, "display_name", store.filename)
        self.writable = True
        self.dev_ino = store.dev_ino

    def pread(self, offset, length):
        return self._store.pread(offset, length)

    def pread_full(self, offset, length):
        return self._store.pread_full(offset, length)

    def readinto(self, offset, buf):
        return self._store.readinto(offset, buf)

    def pwrite(self, offset, data):
        self._store.pwrite(offset, data)

    def size(self):
        return self._store.size()

    def truncate(self, size):
        self._store.truncate(size)

    def allocated_size(self):
        return self._store.size()

    def flush(self):
        pass

    def close(self):
        pass


def _is_data(data) -> bool:
    """Guest data reaches a store in the copy engine's page-aligned buffers (mmaps); a format's own
    metadata comes in bytes objects.  (A metadata write taken for data would be lost, so this errs
    the other way: anything else counts as metadata, and is only kept in memory.)"""
    import mmap

    return isinstance(memoryview(data).obj, mmap.mmap)


class LayoutStore(SequentialStore):
    """First pass of a format whose metadata is written after its data (qcow2): keeps the final bytes of
    every metadata write and only the extent of the data, to learn the image's layout."""

    def __init__(self, name: str):
        super().__init__(-1, name, high=1 << 62, low=0)
        self.data_end = 0

    def pwrite(self, offset: int, data) -> None:
        if _is_data(data):
            self.data_end = max(self.data_end, offset + len(memoryview(data).cast("B")))
            return
        super().pwrite(offset, data)

    def size(self) -> int:
        return max(super().size(), self.data_end)

    def truncate(self, size: int) -> None:
        super().truncate(size)
        self.data_end = min(self.data_end, size)

    def metadata(self) -> list[tuple[int, bytearray]]:
        return list(zip(self.starts, self.pieces))


class Replay(Store):
    """Second pass: the same writes again; data goes down the pipe in order, metadata writes only serve
    the driver's reads, and the pipe gets the final metadata the first pass learned."""

    def __init__(self, out: SequentialStore, layout: LayoutStore):
        self.out = out
        self.filename = self.display_name = out.filename
        self.dev_ino = out.dev_ino
        self.writable = True
        self.shadow = SequentialStore(-1, out.filename, high=1 << 62, low=0)
        for start, piece in layout.metadata():
            out.pwrite(start, piece)
        out.declared = layout.size()
        out.limit = 0

    def pwrite(self, offset: int, data) -> None:
        if _is_data(data):
            n = len(memoryview(data).cast("B"))
            self.out.pwrite(offset, data)
            self.out.limit = max(self.out.limit or 0, offset + n)
        else:
            self.shadow.pwrite(offset, data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.shadow.pread(offset, length)

    def pread_full(self, offset: int, length: int) -> bytes:
        return self.shadow.pread_full(offset, length)

    def readinto(self, offset: int, buf) -> int:
        return self.shadow.readinto(offset, buf)

    def size(self) -> int:
        return self.shadow.size()

    def truncate(self, size: int) -> None:
        self.shadow.truncate(size)

    def close(self) -> None:
        pass
