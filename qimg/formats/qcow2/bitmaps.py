"""Persistent dirty bitmaps: checked at open, kept up to date by writes, resized with the image,
carried over by ``convert --bitmaps`` and edited by ``bitmap``.

References:
  qcow2 specification (qemu docs/interop/qcow2.txt), "Bitmaps": the bitmaps extension, bitmap
  directory entries (table offset and size, flags in-use/auto, type 1 = dirty tracking, granularity
  bits, name, extra data), bitmap tables (bits 9-55 the offset of a data cluster; with no offset,
  bit 0 says the cluster reads as all ones) and bitmap data (one bit per granularity-sized chunk of
  the guest, least significant bit first).
  Observed qemu-img 7.2: writes set the bits of the chunks they touch in every enabled ("auto")
  bitmap; while an image is written its enabled bitmaps carry the in-use flag, so an interrupted
  writer leaves them marked inconsistent; convert --bitmaps copies every consistent bitmap with its
  granularity and enabled state; bitmap runs its actions in command-line order and keeps what
  succeeded before a failing one; merging sets every bit whose range overlaps a set source bit.

This module reads and plans (directory, tables, the bits of a change); the changes themselves are
committed by bitmap_edit.py through ``lifecycle.commit`` (new clusters, then one header write), like
every other metadata change.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from ...errors import CorruptImage, QimgError, check_limit
from .header import (
    BITMAP_ENTRY,
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW2_EXT_MAGIC_BITMAPS,
    BitmapInfo,
    read_bitmap_directory,
)

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_RESERVED_FLAGS = ~(BME_FLAG_IN_USE | BME_FLAG_AUTO | (1 << 2)) & 0xFFFFFFFF  # bit 2: extra data compatible
BME_TYPE_DIRTY_TRACKING = 1
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_RESERVED_MASK = 0xFF000000000001FE
BME_ALL_ONES = 1

MIN_GRANULARITY_BITS = 9               # 512 bytes
MAX_GRANULARITY_BITS = 31              # 2 GiB
MAX_BITMAP_BYTES = 1 << 29             # the data of one bitmap (qemu's limit too)
MAX_BITMAP_NAME = 1023


def bitmap_bytes(size: int, gbits: int) -> int:
    """Bytes of bitmap data that cover ``size`` guest bytes at 2**gbits bytes per bit."""
    bits = -(-size // (1 << gbits))
    return -(-bits // 8)


def table_entries(size: int, gbits: int, cluster_size: int) -> int:
    return -(-bitmap_bytes(size, gbits) // cluster_size)


def bitmaps_of(store, h, file_size: int) -> list[BitmapInfo]:
    """The directory of an image whose bitmaps are valid (autoclear bit set), else an empty list."""
    if not h.bitmaps_ext or not (h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS):
        return []
    return read_bitmap_directory(store, h, file_size)


def check_constraints(bitmaps: list[BitmapInfo], size: int, cluster_size: int) -> None:
    """Refuse an image whose bitmap entries qemu would refuse, with qemu-img's message."""
    for bm in bitmaps:
        ok = (bm.btype == BME_TYPE_DIRTY_TRACKING and not (bm.flags & BME_RESERVED_FLAGS)
              and MIN_GRANULARITY_BITS <= bm.granularity_bits <= MAX_GRANULARITY_BITS
              and bm.table_offset and bm.table_offset % cluster_size == 0
              and bm.table_size * cluster_size <= MAX_BITMAP_BYTES
              and bm.table_size >= table_entries(size, bm.granularity_bits, cluster_size))
        if not ok:
            raise CorruptImage(f"Bitmap '{bm.name}' doesn't satisfy the constraints")


def read_table(store, bm: BitmapInfo, file_size: int, cluster_size: int) -> list[int]:
    """A bitmap's table entries, each checked: reserved bits clear, data clusters inside the file."""
    check_limit("qcow2 bitmap table size", bm.table_size * cluster_size, MAX_BITMAP_BYTES)
    if bm.table_offset + bm.table_size * 8 > file_size:
        raise CorruptImage(f"Bitmap '{bm.name}': its table lies outside the image file")
    raw = store.pread_full(bm.table_offset, bm.table_size * 8)
    out = list(struct.unpack(f">{bm.table_size}Q", raw))
    for e in out:
        off = e & BME_OFFSET_MASK
        if e & BME_RESERVED_MASK or (off and e & BME_ALL_ONES) or off + cluster_size > file_size:
            raise CorruptImage(f"Bitmap '{bm.name}': invalid bitmap table entry {e:#x}")
    return out


class BitmapReader:
    """The bytes of one bitmap, read on demand through its table."""

    def __init__(self, store, bm: BitmapInfo, size: int, cluster_size: int, file_size: int):
        self.store = store
        self.bm = bm
        self.cs = cluster_size
        self.nbytes = bitmap_bytes(size, bm.granularity_bits)
        self.table = read_table(store, bm, file_size, cluster_size)

    def cluster(self, i: int) -> bytes:
        """Table cluster ``i`` (cluster-size bytes; zeros past the table)."""
        e = self.table[i] if i < len(self.table) else 0
        off = e & BME_OFFSET_MASK
        if off:
            return self.store.pread_full(off, self.cs)
        return (b"\xff" if e & BME_ALL_ONES else b"\0") * self.cs

    def read(self, start: int, n: int) -> bytes:
        """Bytes [start, start+n) of the bitmap; zeros past its end."""
        out = bytearray(n)
        end = min(start + n, self.nbytes)
        pos = start
        while pos < end:
            i, lo = divmod(pos, self.cs)
            k = min(self.cs - lo, end - pos)
            out[pos - start:pos - start + k] = self.cluster(i)[lo:lo + k]
            pos += k
        return bytes(out)


@dataclass
class BitmapPlan:
    """One bitmap of the image after a change: its directory entry (the table offset and size are
    filled in by ``commit``), the table entries kept as they are, and the table clusters to write
    afresh (index -> function returning cluster-size bytes)."""

    info: BitmapInfo
    table: list
    fresh: dict = field(default_factory=dict)


def pack_directory(plans: list[BitmapPlan]) -> bytes:
    out = bytearray()
    for p in plans:
        bm = p.info
        name = bm.name.encode()
        out += BITMAP_ENTRY.pack(bm.table_offset, bm.table_size, bm.flags, bm.btype, bm.granularity_bits, len(name),
                          len(bm.extra)) + bm.extra + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def set_extension(h, plans: list[BitmapPlan], dir_offset: int, dir_size: int) -> None:
    """Point the header at a new directory (or drop the extension when no bitmap is left)."""
    if plans:
        h.bitmaps_ext = (len(plans), dir_size, dir_offset)
        h.replace_extension(QCOW2_EXT_MAGIC_BITMAPS, struct.pack(">IIQQ", len(plans), 0, dir_size, dir_offset))
        h.autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS
    else:
        h.bitmaps_ext = None
        h.extensions = [(t, d) for t, d in h.extensions if t != QCOW2_EXT_MAGIC_BITMAPS]
        h.autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS


def kept_plans(meta, size: int | None = None) -> list[BitmapPlan]:
    """Every bitmap of the image as it is, with tables resized to ``size`` (grown with zeros; when
    shrinking, the last cluster is rewritten without the bits past the new end)."""
    h = meta.header
    size = h.size if size is None else size
    plans = []
    for bm in bitmaps_of(meta.store, h, meta.file_size):
        reader = BitmapReader(meta.store, bm, h.size, meta.cluster_size, meta.file_size)
        n = table_entries(size, bm.granularity_bits, meta.cluster_size)
        table = (reader.table + [0] * n)[:n]
        plan = BitmapPlan(_copy_info(bm), table)
        tail_bits = -(-size // (1 << bm.granularity_bits)) % (meta.cluster_size * 8)
        if size < h.size and n and tail_bits:
            plan.fresh[n - 1] = _cleared_tail(reader, n - 1, tail_bits)
        plans.append(plan)
    return plans


def resized_bitmaps(meta, size: int) -> list[BitmapPlan] | None:
    """The bitmaps for a new virtual size, or None when no table changes length."""
    plans = kept_plans(meta, size)
    if all(len(p.table) == p.info.table_size and not p.fresh for p in plans):
        return None
    return plans


def _copy_info(bm: BitmapInfo) -> BitmapInfo:
    return BitmapInfo(bm.name, bm.flags, bm.granularity_bits, bm.table_offset, bm.table_size, bm.btype, bm.extra,
                      bm.entry_pos)


def _cleared_tail(reader: BitmapReader, i: int, keep_bits: int):
    def payload():
        buf = bytearray(reader.cluster(i))
        set_bits(buf, keep_bits, len(buf) * 8, False)
        return bytes(buf)
    return payload


def set_bits(buf: bytearray, first: int, end: int, value: bool = True) -> None:
    """Set (or clear) bits [first, end) of ``buf``, least significant bit first."""
    if end <= first:
        return
    fb, lb = first // 8, (end - 1) // 8
    head = (0xFF << (first % 8)) & 0xFF
    tail = 0xFF >> (7 - (end - 1) % 8)
    if fb == lb:
        masks = {fb: head & tail}
    else:
        masks = {fb: head, lb: tail}
        buf[fb + 1:lb] = (b"\xff" if value else b"\0") * (lb - fb - 1)
    for i, m in masks.items():
        buf[i] = (buf[i] | m) if value else (buf[i] & ~m & 0xFF)


def merge_ranges(ranges: list) -> list:
    """Sorted, coalesced (start, end) guest ranges."""
    out: list = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1][1] = b
        else:
            out.append([a, b])
    return out


class DirtyTracker:
    """The guest ranges written while an image with enabled bitmaps is open for writing.  The first
    write marks those bitmaps in use on disk (an interrupted writer leaves them inconsistent, as
    qemu does); closing sets their bits and clears the flag (``store_dirty``)."""

    def __init__(self, names: set):
        self.names = names
        self.ranges: list = []
        self.marked = False
        self._lock = threading.Lock()

    def add(self, drv, offset: int, length: int) -> None:
        if length <= 0:
            return
        with self._lock:
            if not self.marked:
                mark_in_use(drv.store, drv.h, [bm for bm in bitmaps_of(drv.store, drv.h, drv.store.size())
                                               if bm.name in self.names])
                self.marked = True
            end = offset + length
            if self.ranges and self.ranges[-1][1] == offset:
                self.ranges[-1][1] = end
            else:
                self.ranges.append([offset, end])
                if len(self.ranges) > 4096:
                    self.ranges = merge_ranges(self.ranges)


def tracker_for(drv) -> DirtyTracker | None:
    """A tracker when ``drv`` is writable and has enabled, consistent bitmaps."""
    if not drv.writable:
        return None
    names = {bm.name for bm in bitmaps_of(drv.store, drv.h, drv.file_size)
             if bm.flags & BME_FLAG_AUTO and not bm.flags & BME_FLAG_IN_USE}
    return DirtyTracker(names) if names else None


def dirty_plans(meta, ranges: list, names: set) -> list[BitmapPlan]:
    """The image's bitmaps with the bits of the written ``ranges`` set in the bitmaps ``names``,
    whose in-use flag is cleared: they are consistent again."""
    plans = kept_plans(meta)
    for plan in plans:
        if plan.info.name in names:
            mark_ranges(meta.store, plan, ranges, meta.cluster_size)
            plan.info.flags &= ~BME_FLAG_IN_USE
    return plans


def plan_cluster(store, plan: BitmapPlan, i: int, cs: int) -> bytes:
    """Table cluster ``i`` of ``plan`` as the change will leave it."""
    if i in plan.fresh:
        return plan.fresh[i]()
    e = plan.table[i]
    if e & BME_OFFSET_MASK:
        return store.pread_full(e & BME_OFFSET_MASK, cs)
    return (b"\xff" if e & BME_ALL_ONES else b"\0") * cs


def mark_ranges(store, plan: BitmapPlan, ranges, cs: int) -> None:
    """Set the bits of plan's bitmap for the guest byte ranges [a, b)."""
    g = plan.info.granularity_bits
    per = cs * 8
    touched: dict[int, list] = {}
    for a, b in ranges:
        first, end = a >> g, ((b - 1) >> g) + 1
        for i in range(first // per, min((end - 1) // per + 1, len(plan.table))):
            touched.setdefault(i, []).append((max(first, i * per) - i * per, min(end, (i + 1) * per) - i * per))
    for i, spans in touched.items():
        plan.fresh[i] = _with_bits(store, BitmapPlan(None, {0: plan.table[i]}, {0: plan.fresh[i]} if i in plan.fresh
                                                     else {}), spans, cs)


def _with_bits(store, base: BitmapPlan, spans: list, cs: int):
    def payload():
        buf = bytearray(plan_cluster(store, base, 0, cs))
        for lo, hi in spans:
            set_bits(buf, lo, hi)
        return bytes(buf)
    return payload


def set_ranges(store, plan: BitmapPlan, size: int, cs: int):
    """The guest byte ranges whose bits are set in ``plan`` (as (start, end), per table cluster)."""
    import numpy as np

    g = plan.info.granularity_bits
    per = cs * 8
    for i in range(len(plan.table)):
        data = plan_cluster(store, plan, i, cs)
        if not data.strip(b"\0"):
            continue
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little").astype(np.int8)
        d = np.diff(np.concatenate(([0], bits, [0])))
        for s0, e0 in zip(np.nonzero(d == 1)[0].tolist(), np.nonzero(d == -1)[0].tolist()):
            a = (i * per + s0) << g
            if a >= size:
                break
            yield a, min((i * per + e0) << g, size)


def copied_plans(meta, source: list[tuple[BitmapInfo, BitmapReader]]) -> list[BitmapPlan]:
    """The target's bitmaps plus new ones with the data of ``source`` (convert --bitmaps; names were
    checked against the target's by ``prepare_bitmaps`` before the copy)."""
    plans = kept_plans(meta)
    cs = meta.cluster_size
    for bm, reader in source:
        n = table_entries(meta.header.size, bm.granularity_bits, cs)
        info = BitmapInfo(bm.name, bm.flags & BME_FLAG_AUTO, bm.granularity_bits, 0, n)
        plans.append(BitmapPlan(info, [0] * n, {i: _source_cluster(reader, i, cs) for i in range(n)}))
    return plans


def _source_cluster(reader: BitmapReader, i: int, cs: int):
    return lambda: reader.read(i * cs, cs)


def mark_in_use(store, h, bitmaps: list[BitmapInfo]) -> None:
    """Set the in-use flag of ``bitmaps`` in the directory where it lies (before the first write)."""
    _nb, _dsize, doff = h.bitmaps_ext
    for bm in bitmaps:
        store.pwrite(doff + bm.entry_pos + 12, struct.pack(">I", bm.flags | BME_FLAG_IN_USE))
    store.flush()


def source_bitmaps(drv, skip_broken: bool, warn) -> list[tuple[BitmapInfo, BitmapReader]]:
    """The bitmaps convert --bitmaps copies from ``drv`` (a qcow2 driver), with qemu-img's messages."""
    h = drv.h
    out = []
    # qemu-img walks the bitmaps last to first: its warnings and its error name them in that order
    for bm in reversed(bitmaps_of(drv.store, h, drv.file_size)):
        if bm.flags & BME_FLAG_IN_USE:
            if skip_broken:
                if warn is not None:
                    warn(f"Skipping inconsistent bitmap '{bm.name}'")
                continue
            raise QimgError(f"Cannot copy inconsistent bitmap '{bm.name}'\n"
                            "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it")
        out.append((bm, BitmapReader(drv.store, bm, h.size, h.cluster_size, drv.file_size)))
    return out[::-1]
