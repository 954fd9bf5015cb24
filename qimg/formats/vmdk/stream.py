"""The streamOptimized writer: a VMDK4 sparse extent written front to back, grains deflated.

References:
    VMware, "Virtual Disk Format 5.0", section "Stream-Optimized Compressed Sparse Extents":
    flags bit 16 (compressed grains) and bit 17 (markers), COMPRESSION_DEFLATE (RFC 1950 zlib
    streams), grain markers (lba, size), metadata markers (numSectors, size=0, type: 0
    end-of-stream, 1 grain table, 2 grain directory, 3 footer), GD_AT_END and the footer.
    RFC 1951 3.2.4 (stored deflate blocks, for grains that do not compress).

Reading such an extent is the hosted sparse reader's job (sparse.py); this module only writes.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ...errors import QimgError
from ...io.store import BufferPool
from .grains import SECTOR
from .sparse import (
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    SparseHeader,
    marker,
    new_header,
)

_ZEROS = bytes(SECTOR)
#: grain directory and table entries are little-endian uint32 (plain arrays: no numpy on this path)
_SWAP = sys.byteorder != "little"
IOV_MAX = 1024
#: bytes of a grain sampled (three times) to recognise incompressible data
SAMPLE = 2048
#: bytes of whole grains handed to a compression job at most
RUN = 2 << 20


def stored_zlib(data: bytes) -> list:
    """An RFC 1950 stream of uncompressed ("stored", RFC 1951 3.2.4) deflate blocks, as buffers."""
    view = memoryview(data)
    out = [b"\x78\x01"]  # deflate, 32 KiB window, no dictionary, fastest level; header checksum holds
    n, pos = len(data), 0
    while True:
        k = min(65535, n - pos)
        final = pos + k >= n
        out.append(struct.pack("<BHH", 1 if final else 0, k, k ^ 0xFFFF))
        out.append(view[pos:pos + k])
        pos += k
        if final:
            break
    out.append(struct.pack(">I", zlib.adler32(data)))
    return out


def _u32(n: int) -> array:
    """n zero uint32 entries."""
    return array("I", bytes(4 * n))


def _le(entries: array) -> bytes:
    """Entries as on disk (little-endian)."""
    if not _SWAP:
        return entries.tobytes()
    swapped = array("I", entries)
    swapped.byteswap()
    return swapped.tobytes()


class StreamWriter:
    """Writes a streamOptimized extent front to back: grains (deflated in a thread pool, written
    in guest order with grain markers), each grain table after its grains, then the grain
    directory, the footer and the end-of-stream marker -- the layout VMware's importers expect.
    """

    def __init__(self, store, header: SparseHeader, start_sector: int, workers: int | None = None):
        self.store = store
        self.header = header
        self.gb = header.grain_size * SECTOR
        self.l2 = header.num_gtes_per_gt
        self.grains = -(-header.capacity // header.grain_size)
        self.gd = _u32(-(-self.grains // self.l2))
        self.cur_gt_index = -1
        self.cur_gt = _u32(self.l2)
        self.pos = start_sector * SECTOR
        self.next_guest = 0
        self.pending_grain = None  # (grain index, bytearray) of a partly written grain
        n = workers or max(1, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(max_workers=n)
        self.queue: deque = deque()  # (future of [(grain, buffers)], its buffer): one per run of grains
        # the copies of the caller's bytes the jobs work on: reused page-aligned buffers (a fresh 2 MiB
        # bytes object costs page faults and lands off page alignment, 5-10x slower to fill)
        self.run_bytes = max(RUN, self.gb)
        self.buffers = BufferPool(self.run_bytes)
        self.max_jobs = 2 * n  # runs waiting or being compressed (each up to RUN bytes in its buffer)
        self.finished = False

    # compression runs in worker threads (zlib releases the GIL)
    @staticmethod
    def _compress(data) -> list:
        """Buffers of one RFC 1950 stream holding ``data`` -- run in a worker thread."""
        n = len(data)
        if n >= 4 * SAMPLE:
            # incompressible grains (already compressed or encrypted guest data) go out as deflate "stored"
            # blocks: a valid zlib stream at memcpy speed instead of a futile level-6 search
            # (a 4 KiB window holds a whole sample: the same matches, the same length as with the default
            # 32 KiB window, for a third less set-up)
            probes = (data[:SAMPLE], data[n // 2:n // 2 + SAMPLE], data[n - SAMPLE:])
            if all(len(zlib.compress(p, 1, 12)) >= SAMPLE for p in probes):
                return stored_zlib(data)
        return [zlib.compress(data, 6)]

    @classmethod
    def _compress_run(cls, first: int, data, gb: int) -> list:
        """[(grain, buffers)] for the whole grains in ``data`` (a private copy), grain ``first`` onwards."""
        view = memoryview(data)
        return [(first + i, cls._compress(view[pos:pos + gb]))
                for i, pos in enumerate(range(0, len(view), gb))]

    def _submit(self, grain: int, data, count: int = 1) -> None:
        """Queue ``count`` whole grains from grain ``grain`` on: one job, one copy of the caller's bytes."""
        if grain * self.gb < self.next_guest:
            raise QimgError("streamOptimized VMDK images must be written in order")
        self.next_guest = (grain + count) * self.gb
        buf = self.buffers.get()
        copy = memoryview(buf)[:len(data)]
        copy[:] = data
        self.queue.append((self.pool.submit(self._compress_run, grain, copy, self.gb), buf))
        if len(self.queue) > self.max_jobs:
            self._drain(self.max_jobs)  # the oldest run only: the workers always have the others to do

    def _drain(self, keep: int = 0) -> None:
        start = self.pos
        parts: list = []
        bufs = []
        while len(self.queue) > keep:
            fut, buf = self.queue.popleft()
            bufs.append(buf)
            for grain, comp in fut.result():
                self._grain_record(grain, comp, parts)
        self._write_parts(start, parts)
        del parts  # (stored grains are views of the buffers)
        for b in bufs:
            self.buffers.put(b)

    def _write_parts(self, start: int, parts: list) -> None:
        """Write buffers back to back from ``start`` (one vectored write per IOV_MAX buffers)."""
        fd = getattr(self.store, "fd", None)
        pos = start
        for i in range(0, len(parts), IOV_MAX):
            batch = parts[i:i + IOV_MAX]
            total = sum(len(b) for b in batch)
            if fd is not None and fd >= 0 and hasattr(os, "pwritev"):
                done = os.pwritev(fd, batch, pos)
                if done < total:
                    self.store.pwrite(pos + done, b"".join(batch)[done:])
            else:
                self.store.pwrite(pos, b"".join(batch))
            pos += total

    def _grain_record(self, grain: int, comp: list, parts: list) -> None:
        """Marker + deflated grain, preceded by the previous grain table when this grain starts a new one."""
        gt_index, first = divmod(grain, self.l2)
        if gt_index != self.cur_gt_index:
            gt = self._gt_record()
            if gt:
                parts.append(gt)
            self.cur_gt_index = gt_index
        self.cur_gt[first] = self.pos // SECTOR
        size = sum(len(b) for b in comp)
        parts.append(marker(grain * self.header.grain_size, size))
        parts.extend(comp)
        pad = -(12 + size) % SECTOR
        if pad:
            parts.append(_ZEROS[:pad])
        self.pos += 12 + size + pad

    def _gt_record(self) -> bytes:
        """The pending grain table (marker + table), or nothing when no table is open."""
        if self.cur_gt_index < 0:
            return b""
        gt_bytes = self.l2 * 4
        sectors = -(-gt_bytes // SECTOR)
        self.gd[self.cur_gt_index] = (self.pos + SECTOR) // SECTOR
        rec = marker(sectors, 0, MARKER_GT) + _le(self.cur_gt) + bytes(sectors * SECTOR - gt_bytes)
        self.pos += len(rec)
        self.cur_gt = _u32(self.l2)
        self.cur_gt_index = -1
        return rec

    def pwrite(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        gb = self.gb
        pos, total = 0, len(view)
        while pos < total:
            off = offset + pos
            grain, in_grain = divmod(off, gb)
            if self.pending_grain is not None and self.pending_grain[0] != grain:
                self._flush_pending()
            if in_grain == 0 and total - pos >= gb and self.pending_grain is None:
                # one job per run of up to RUN bytes (2 MiB: the copy engine's chunk)
                count = max(1, min((total - pos) // gb, RUN // gb))
                self._submit(grain, view[pos:pos + count * gb], count)
                pos += count * gb
                continue
            n = min(gb - in_grain, total - pos)
            if self.pending_grain is None:
                if grain * gb < self.next_guest:
                    raise QimgError("streamOptimized VMDK images must be written in order")
                self.pending_grain = (grain, bytearray(gb))
            self.pending_grain[1][in_grain:in_grain + n] = view[pos:pos + n]
            pos += n

    def _flush_pending(self) -> None:
        if self.pending_grain is not None:
            grain, buf = self.pending_grain
            self.pending_grain = None
            if any(buf):
                self._submit(grain, buf)
            else:
                self.next_guest = (grain + 1) * self.gb

    def finish(self) -> None:
        """Write the last grain table, the grain directory, the footer and end-of-stream."""
        if self.finished:
            return
        self._flush_pending()
        self._drain(0)
        start = self.pos
        tail = [self._gt_record()]
        gd_bytes = len(self.gd) * 4
        gd_sectors = -(-gd_bytes // SECTOR)
        gd_pos = self.pos + SECTOR
        tail.append(marker(gd_sectors, 0, MARKER_GD) + _le(self.gd) + bytes(gd_sectors * SECTOR - gd_bytes))
        h = self.header
        footer = new_header(h.capacity, h.grain_size, h.flags, h.version, h.desc_offset, h.desc_size, 0,
                            gd_pos // SECTOR, h.overhead, h.compress_algorithm)
        tail.append(marker(1, 0, MARKER_FOOTER) + footer.pack())
        tail.append(marker(0, 0, MARKER_EOS))
        data = b"".join(tail)
        self.store.pwrite(start, data)
        self.pos = start + len(data)
        self.store.truncate(self.pos)
        self.finished = True

    def close(self) -> None:
        for fut, _buf in self.queue:
            fut.cancel()
        self.pool.shutdown(wait=True)
        self.queue.clear()
        self.buffers.close()
