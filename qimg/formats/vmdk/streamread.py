"""Reading a streamOptimized VMDK front to back, as it comes down a pipe.

References:
  - VMware, "Virtual Disk Format 5.0": "Stream-Optimized Compressed Sparse Extents" (grain markers:
    LBA + compressed size + deflate data, padded to a sector; metadata markers: sector count + type,
    EOS/GT/GD/FOOTER) and "Hosted Sparse Extent Header".

The header at offset 0 gives the capacity (the grain directory, at the end, is not needed: every
grain marker names its own LBA), so a reader of the stream knows the virtual size at once and meets
the grains in order.  Nothing is sought; memory holds one grain.
"""

from __future__ import annotations

import struct
import zlib

from ...errors import CorruptImage, LimitExceeded
from .grains import SECTOR
from .sparse import (
    FLAG_COMPRESS,
    FLAG_MARKER,
    GD_AT_END,
    HEADER_SIZE,
    MARKER_EOS,
    MAX_GRAIN_SECTORS,
    VMDK4_MAGIC,
    SparseHeader,
)

#: the largest capacity read from a stream header (qemu's VMDK limit: 2 TiB... times 32, as create allows)
MAX_CAPACITY_BYTES = 64 << 40


def is_stream(head: bytes) -> bool:
    """A streamOptimized extent: sparse magic, markers, compressed grains (VMware puts the grain directory
    at the end, qemu-img before the grains: neither is needed to read the grains in order)."""
    if len(head) < HEADER_SIZE:
        return False
    h = SparseHeader.unpack(head[:HEADER_SIZE])
    return bool(h.magic == VMDK4_MAGIC and h.flags & FLAG_MARKER and h.flags & FLAG_COMPRESS)


class StreamGrains:
    """Grains of a stream, in the order they come: ``next_grain()`` -> (guest offset, bytes) or None at EOS."""

    def __init__(self, reader, name: str):
        self.reader = reader
        self.name = name
        head = self._exact(HEADER_SIZE, "its header")
        h = SparseHeader.unpack(head)
        if not is_stream(head):
            raise CorruptImage(f"'{name}' is not a streamOptimized VMDK")
        if not 1 <= h.grain_size <= MAX_GRAIN_SECTORS or h.grain_size & (h.grain_size - 1):
            raise LimitExceeded(f"grain size {h.grain_size} sectors in '{name}' is outside 1..{MAX_GRAIN_SECTORS}")
        if h.capacity * SECTOR > MAX_CAPACITY_BYTES:
            raise LimitExceeded(f"capacity {h.capacity * SECTOR} in '{name}' exceeds the limit {MAX_CAPACITY_BYTES}")
        self.header = h
        self.virtual_size = h.capacity * SECTOR
        self.grain_bytes = h.grain_size * SECTOR
        self.pos = HEADER_SIZE
        if h.overhead * SECTOR < self.pos:
            raise CorruptImage(f"'{name}': grains start inside the header")
        self._skip(h.overhead * SECTOR - self.pos)  # descriptor (and nothing else in a stream) up to the grains
        self.next_guest = 0
        #: the grain directory comes at the end (VMware): so does an end-of-stream marker, which must be there
        self.eos_required = h.gd_offset == GD_AT_END

    def _exact(self, n: int, what: str) -> bytes:
        data = self.reader.read(n)
        if len(data) < n:
            raise CorruptImage(f"'{self.name}' ends inside {what}: the stream is truncated")
        return data

    def _skip(self, n: int) -> None:
        if self.reader.skip(n) < n:
            raise CorruptImage(f"'{self.name}' ends early: the stream is truncated")
        self.pos += n

    def next_grain(self):
        """The next grain (guest offset, its bytes), skipping metadata; None after the end-of-stream marker."""
        while True:
            first = self.reader.read(12)
            if not first and not self.eos_required:
                return None  # qemu-img's streams end after their last grain; VMware's with an EOS marker
            head = first + self._exact(12 - len(first), "a marker") if len(first) < 12 else first
            value, size = struct.unpack("<QI", head)
            if size == 0:
                rest = self._exact(SECTOR - 12, "a marker")
                (mtype,) = struct.unpack_from("<I", rest)
                self.pos += SECTOR
                if mtype == MARKER_EOS:
                    return None
                self._skip(value * SECTOR)  # a grain table, the grain directory or the footer
                continue
            if size > self.grain_bytes + (self.grain_bytes >> 3) + 1024:
                raise LimitExceeded(f"compressed grain of {size} bytes in '{self.name}' exceeds the limit "
                                    f"{self.grain_bytes + (self.grain_bytes >> 3) + 1024}")
            comp = self._exact(size, "a grain")
            pad = -(12 + size) % SECTOR
            self._skip(pad)
            self.pos += 12 + size
            guest = value * SECTOR
            if guest < self.next_guest:
                raise CorruptImage(f"'{self.name}': grain at {guest} comes after {self.next_guest}; a stream read "
                                   "from a pipe needs its grains in order (convert it from a file)")
            if guest % self.grain_bytes or guest >= self.virtual_size:
                raise CorruptImage(f"'{self.name}': grain at {guest} is outside the disk or not on a grain")
            try:
                d = zlib.decompressobj()
                data = d.decompress(comp, self.grain_bytes)
            except zlib.error as e:
                raise CorruptImage(f"'{self.name}': grain at {guest} does not inflate: {e}") from None
            n = min(self.grain_bytes, self.virtual_size - guest)
            if len(data) < n:
                data += bytes(n - len(data))
            self.next_guest = guest + self.grain_bytes
            return guest, data[:n]
