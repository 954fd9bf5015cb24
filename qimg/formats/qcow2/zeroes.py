"""Writing qcow2: zero writes and discards.

References: QEMU docs/interop/qcow2.txt ("Cluster mapping": QCOW_OFLAG_ZERO; "Extended L2 Entries":
the zero bitmap in bits 32-63 of the second word).

Version 3 images record zeros in the L2 entries (whole clusters, or subclusters with extended L2),
dropping the host cluster when unmapping is allowed; version 2 images and the unaligned edges of a
range get zeros written as data, skipping what already reads as zeros.
"""

from __future__ import annotations

from array import array

from .tables import (
    L2E_OFFSET_MASK,
    QCOW_L2_BITMAP_ALL_ZERO,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    SUBCLUSTERS_PER_CLUSTER,
    LazyNumpy,
)

np = LazyNumpy(globals())


class Qcow2ZeroWriter:
    """Mixin for Qcow2Writer: write_zeroes and discard."""

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        self._check_writable()
        self._track(offset, min(length, self.virtual_size - offset))
        self._flush_pending()
        self._zero_now(offset, length, may_unmap)

    def _zero_now(self, offset: int, length: int, may_unmap: bool = True) -> None:
        end = min(offset + length, self.virtual_size)
        if self.h.version < 3:
            self._zero_by_writing(offset, end)
            return
        unit = self.cs // SUBCLUSTERS_PER_CLUSTER if self.extended else self.cs
        a = -(-offset // unit) * unit
        b = end if end == self.virtual_size else end // unit * unit
        if b <= a:
            self._zero_by_writing(offset, end)
            return
        if a > offset:
            self._zero_by_writing(offset, a)
        span = 1 << self.l2_span_bits
        pos = a
        while pos < b:
            l1i = pos >> self.l2_span_bits
            n = min(b - pos, (l1i + 1) * span - pos)
            self._zero_segment(l1i, pos, pos + n, may_unmap)
            pos += n
        if b < end:
            self._zero_by_writing(b, end)
        self._maybe_flush()

    def _zero_by_writing(self, start: int, end: int) -> None:
        """Zeros as data, skipping runs that already read as zeros with nothing showing through."""
        pos = start
        chunk = None
        while pos < end:
            ext = self.block_status(pos, end - pos)
            n = min(ext.length, end - pos)
            if not (ext.zero and (ext.present or self.backing is None)):
                if chunk is None:
                    chunk = bytes(min(end - start, 1 << 20))
                p = pos
                while p < pos + n:
                    k = min(len(chunk), pos + n - p)
                    self._pwrite_now(p, chunk[:k])
                    p += k
            pos += n

    def _zero_segment(self, l1i: int, start: int, end: int, may_unmap: bool) -> None:
        l2off, raw = self._l2_for_write(l1i)
        try:
            self._zero_entries(raw, start, end, may_unmap)
        finally:
            self.cache.drop(l2off)

    def _zero_entries(self, raw, start: int, end: int, may_unmap: bool) -> None:
        cs, cb = self.cs, self.cluster_bits
        if not self.extended:
            c0, c1 = start >> cb, -(-end // cs)
            i0 = c0 & (self.l2_entries - 1)
            i1 = i0 + (c1 - c0)
            ents = raw[i0:i1]
            keep = [not may_unmap and bool(e & QCOW_OFLAG_COPIED) and not e & QCOW_OFLAG_COMPRESSED
                    and bool(e & L2E_OFFSET_MASK) for e in ents]
            for e, k in zip(ents, keep):
                if e and not k:
                    self._free_entry(e)
            if self.h.data_file_raw:
                self._zero_data_file(start, end)
            raw[i0:i1] = array("Q", [(e | QCOW_OFLAG_ZERO) if k else QCOW_OFLAG_ZERO for e, k in zip(ents, keep)])
            return
        sc = cs // SUBCLUSTERS_PER_CLUSTER
        pos = start
        while pos < end:
            gc = pos & ~(cs - 1)
            i = (pos >> cb) & (self.l2_entries - 1)
            s0 = (pos - gc) // sc
            s1 = min(SUBCLUSTERS_PER_CLUSTER, -(-(min(end, gc + cs) - gc) // sc))
            e, bm = int(raw[2 * i]), int(raw[2 * i + 1])
            vend_sub = -(-min(cs, self.virtual_size - gc) // sc)
            whole = s0 == 0 and s1 >= vend_sub
            if whole and (may_unmap or e & QCOW_OFLAG_COMPRESSED or not e & QCOW_OFLAG_COPIED):
                if e:
                    self._free_entry(e)
                raw[2 * i] = np.uint64(0)
                raw[2 * i + 1] = np.uint64(QCOW_L2_BITMAP_ALL_ZERO)
            elif e & QCOW_OFLAG_COMPRESSED:
                self._zero_by_writing(gc + s0 * sc, min(gc + s1 * sc, self.virtual_size))
            else:
                mask = ((1 << (s1 - s0)) - 1) << s0
                raw[2 * i + 1] = np.uint64(((bm & ~mask) & 0xFFFFFFFF) | (((bm >> 32) | mask) << 32))
            if self.h.data_file_raw:
                self._zero_data_file(gc + s0 * sc, min(gc + s1 * sc, self.virtual_size))
            pos = gc + cs

    def _zero_data_file(self, start: int, end: int) -> None:
        st = self.data_store
        size = st.size()
        if start >= size:
            return
        end = min(end, size)
        if hasattr(st, "punch_hole") and st.punch_hole(start, end - start):
            return
        zero = bytes(min(end - start, 1 << 20))
        pos = start
        while pos < end:
            n = min(len(zero), end - pos)
            st.pwrite(pos, zero[:n])
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """Release whole clusters (they read as zeros afterwards, as qemu's discard leaves them)."""
        if self.h.version < 3:
            return
        start = -(-offset // self.cs) * self.cs
        end = min(offset + length, self.virtual_size)
        if end < self.virtual_size:
            end = end // self.cs * self.cs
        if end > start:
            self.write_zeroes(start, end - start, True)
