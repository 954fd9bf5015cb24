"""qcow2 refcounts: the refcount table, refcount blocks of any width (1..64 bits), allocation.

References: QEMU docs/interop/qcow2.txt, section "Reference counts" (refcount table of
u64 block offsets, blocks of 2^refcount_order-bit entries; sub-byte entries are packed
from the least significant bit).

``Refcounts`` keeps the table and the blocks it touched in memory as uint64 arrays and
writes dirty ones back on ``flush`` (blocks first, then a moved table; the caller writes
the header after).  New clusters are handed out at the end of the image file, so a cluster
that was freed is never reused while metadata may still point at it.
"""

from __future__ import annotations

import sys
from array import array

from ...errors import CorruptImage, QimgError, check_limit
from .header import MAX_REFTABLE_SIZE_BYTES
from .tables import LazyNumpy, be_bytes, be_u64_array, table_bytes

np = LazyNumpy(globals())

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00


_WIDE = {8: "B", 16: "H", 32: "I" if array("I").itemsize == 4 else "L", 64: "Q"}


def _sub_byte_tables(bits: int, shift_out: bool) -> list[bytes]:
    """Per position k in a byte: the translation table extracting (or placing) the k-th entry."""
    mask = (1 << bits) - 1
    per = 8 // bits
    if shift_out:
        return [bytes(((b >> (k * bits)) & mask) for b in range(256)) for k in range(per)]
    return [bytes(((b & mask) << (k * bits)) & 0xFF for b in range(256)) for k in range(per)]


def decode_block(buf: bytes, bits: int) -> array:
    """A refcount block's bytes as one ``array('Q')`` entry each (the one refcount codec: the writer,
    the copy-on-write lifecycle and check all decode and encode blocks here).  C-level throughout:
    wide entries through ``array``, sub-byte entries (packed from the least significant bit) through
    one ``bytes.translate`` per position in a byte."""
    if bits >= 8:
        a = array(_WIDE[bits])
        a.frombytes(bytes(buf))
        if bits > 8 and sys.byteorder == "little":
            a.byteswap()
        return a if bits == 64 else array("Q", a)
    per = 8 // bits
    buf = bytes(buf)
    out = bytearray(len(buf) * per)
    for k, table in enumerate(_sub_byte_tables(bits, True)):
        out[k::per] = buf.translate(table)
    return array("Q", array("B", out))


def encode_block(vals, bits: int, entries: int | None = None) -> bytes:
    """Inverse of decode_block (``vals``: any sequence of ints, numpy arrays included); ``entries``:
    the block's length, the values after ``vals`` zero."""
    if not isinstance(vals, (array, list)):
        vals = vals.tolist()
    if entries is not None and len(vals) != entries:
        vals = list(vals[:entries]) + [0] * (entries - len(vals))
    if bits >= 8:
        a = array(_WIDE[bits], vals)
        if bits > 8 and sys.byteorder == "little":
            a.byteswap()
        return a.tobytes()
    per = 8 // bits
    v = bytes(vals)  # (callers keep every value within the width; the tables mask them anyway)
    n = len(v) // per
    acc = 0
    for k, table in enumerate(_sub_byte_tables(bits, False)):
        acc |= int.from_bytes(v[k::per].translate(table), "big")
    return acc.to_bytes(n, "big")


class Refcounts:
    """The refcount table and blocks of one open image."""

    def __init__(self, store, header, file_size: int, writable: bool = False):
        self.store = store
        self.h = header
        self.cs = header.cluster_size
        self.bits = header.refcount_bits
        self.max_ref = (1 << self.bits) - 1
        self.block_entries = self.cs * 8 // self.bits
        self.block_shift = self.block_entries.bit_length() - 1
        n = header.refcount_table_clusters * self.cs // 8
        check_limit("qcow2 refcount table size (bytes)", n * 8, MAX_REFTABLE_SIZE_BYTES)
        raw = store.pread(header.refcount_table_offset, n * 8)
        raw = raw + bytes(n * 8 - len(raw))
        # the usual 16-bit width: plain arrays (no numpy); other widths use numpy
        self.plain = self.bits == 16
        if self.plain:
            self.table = be_u64_array(raw)
        else:
            self.table = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        self.table_offset = header.refcount_table_offset
        self.blocks: dict[int, np.ndarray] = {}
        self.dirty: set[int] = set()
        self.table_dirty = False
        self.old_tables: list[tuple[int, int]] = []  # (offset, clusters) to free once the header moved
        self.file_size = file_size
        end = -(-file_size // self.cs) * self.cs
        self.next_free = max(end, self.cs)
        self._checked_end = False

    # ---------------------------------------------------------------- reading
    def block(self, index: int, create: bool = False) -> np.ndarray | None:
        """The decoded refcount block ``index`` (None if unallocated and not ``create``)."""
        blk = self.blocks.get(index)
        if blk is not None:
            return blk
        off = int(self.table[index]) & REFT_OFFSET_MASK if index < len(self.table) else 0
        if off == 0:
            if not create:
                return None
            return self._new_block(index)
        if off % self.cs:
            raise CorruptImage(f"Refcount block {index} offset {off:#x} is not aligned to the cluster size")
        if off >= self.file_size and off >= self.next_free:
            raise CorruptImage(f"Refcount block {index} at offset {off:#x} lies outside the image file")
        raw = self.store.pread(off, self.cs)
        raw = raw + bytes(self.cs - len(raw))
        if self.plain:
            blk = array("H")
            blk.frombytes(raw)
            if sys.byteorder == "little":
                blk.byteswap()
        else:
            blk = np.frombuffer(decode_block(raw, self.bits), np.uint64).copy()
        self.blocks[index] = blk
        return blk

    def get(self, cluster: int) -> int:
        """The refcount of host cluster number ``cluster``."""
        idx = cluster >> self.block_shift
        if idx >= len(self.table):
            return 0
        blk = self.block(idx)
        return 0 if blk is None else int(blk[cluster & (self.block_entries - 1)])

    # ---------------------------------------------------------------- updating
    def add(self, first: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters from cluster number ``first``."""
        pos = first
        end = first + count
        while pos < end:
            idx = pos >> self.block_shift
            lo = pos & (self.block_entries - 1)
            n = min(end - pos, self.block_entries - lo)
            self._ensure_table(idx)
            blk = self.block(idx, create=True)
            if self.plain:
                self._add_plain(blk, lo, n, delta)
                self.dirty.add(idx)
                pos += n
                continue
            seg = blk[lo:lo + n].astype(np.int64) + delta
            if (seg < 0).any():
                raise QimgError("qcow2: refcount would drop below zero (image is corrupt)")
            if (seg > self.max_ref).any():
                raise QimgError(f"qcow2: refcount would exceed {self.max_ref} "
                                f"(refcount_bits={self.bits}); use a wider refcount width")
            blk[lo:lo + n] = seg.astype(np.uint64)
            self.dirty.add(idx)
            pos += n

    def _add_plain(self, blk: array, lo: int, n: int, delta: int) -> None:
        seg = blk[lo:lo + n]
        if delta < 0 and min(seg) + delta < 0:
            raise QimgError("qcow2: refcount would drop below zero (image is corrupt)")
        if delta > 0 and max(seg) + delta > self.max_ref:
            raise QimgError(f"qcow2: refcount would exceed {self.max_ref} "
                            f"(refcount_bits={self.bits}); use a wider refcount width")
        if delta:
            blk[lo:lo + n] = array("H", [v + delta for v in seg])

    def _past_last_used(self) -> None:
        """Move ``next_free`` past the last cluster with a refcount (it may lie beyond EOF)."""
        self._checked_end = True
        if self.plain:
            nz = [i for i, e in enumerate(self.table) if e & REFT_OFFSET_MASK]
            for idx in nz[::-1][:4]:
                blk = self.block(idx)
                used = blk.tobytes().rstrip(b"\0") if blk is not None else b""
                if used:
                    end = ((idx << self.block_shift) + (len(used) - 1) // 2 + 1) * self.cs
                    self.next_free = max(self.next_free, end)
                    return
            return
        nz = np.flatnonzero(self.table & np.uint64(REFT_OFFSET_MASK))
        for idx in nz[::-1][:4]:
            blk = self.block(int(idx))
            used = np.flatnonzero(blk) if blk is not None else ()
            if len(used):
                end = ((int(idx) << self.block_shift) + int(used[-1]) + 1) * self.cs
                self.next_free = max(self.next_free, end)
                return

    def alloc(self, nclusters: int) -> int:
        """Reserve ``nclusters`` contiguous clusters at the end of the file; returns the host offset."""
        if not self._checked_end:
            self._past_last_used()
        off = self.next_free
        self.next_free += nclusters * self.cs
        self.add(off // self.cs, nclusters, 1)
        return off

    def _new_block(self, index: int) -> np.ndarray:
        if not self._checked_end:
            self._past_last_used()
        if self.plain:
            blk = array("H", bytes(2 * self.block_entries))
        else:
            blk = np.zeros(self.block_entries, dtype=np.uint64)
        self.blocks[index] = blk
        off = self.next_free
        self.next_free += self.cs
        self.table[index] = off
        self.table_dirty = True
        self.dirty.add(index)
        # the new block's own cluster needs a refcount (possibly in itself)
        self.add(off // self.cs, 1, 1)
        return blk

    def _ensure_table(self, index: int) -> None:
        """Grow (move) the refcount table so that it has an entry ``index``."""
        if index < len(self.table):
            return
        if not self._checked_end:
            self._past_last_used()
        # size with room for the new table itself and the blocks covering it
        need = index + 1
        entries_per_cluster = self.cs // 8
        new_clusters = -(-(need + 8) * 3 // 2 // entries_per_cluster)
        check_limit("qcow2 refcount table size (bytes)", new_clusters * self.cs, MAX_REFTABLE_SIZE_BYTES)
        if self.plain:
            new = array("Q", bytes(8 * new_clusters * entries_per_cluster))
        else:
            new = np.zeros(new_clusters * entries_per_cluster, dtype=np.uint64)
        new[:len(self.table)] = self.table
        old = (self.table_offset, len(self.table) * 8 // self.cs)
        self.table = new
        off = self.next_free
        self.next_free += new_clusters * self.cs
        self.table_offset = off
        self.table_dirty = True
        self.old_tables.append(old)
        self.add(off // self.cs, new_clusters, 1)

    # ---------------------------------------------------------------- writing
    def flush_blocks(self) -> None:
        """Write dirty refcount blocks."""
        for idx in sorted(self.dirty):
            off = int(self.table[idx]) & REFT_OFFSET_MASK
            blk = self.blocks[idx]
            self.store.pwrite(off, be_bytes(blk) if isinstance(blk, array) else encode_block(blk, self.bits))
        self.dirty.clear()

    def flush_table(self) -> bool:
        """Write the table if it changed; True when its location/size changed (header update)."""
        if not self.table_dirty:
            return False
        self.store.pwrite(self.table_offset, table_bytes(self.table))
        self.table_dirty = False
        moved = (self.table_offset != self.h.refcount_table_offset
                 or len(self.table) * 8 // self.cs != self.h.refcount_table_clusters)
        return moved

    def release_old_tables(self) -> None:
        """After the header points at the new table: free the clusters of the old ones."""
        for off, clusters in self.old_tables:
            if clusters:
                self.add(off // self.cs, clusters, -1)
        self.old_tables.clear()
