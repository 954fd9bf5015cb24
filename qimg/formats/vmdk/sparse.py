"""Hosted sparse extents (VMDK4, "KDMV"), streamOptimized included: read, and write in place.

The streamOptimized writer (front to back, deflated grains) is stream.py; this module has the header,
the markers both share, and the extent that reads every kind and updates monolithic sparse ones.

References:
    VMware, "Virtual Disk Format 1.1", section "Hosted Sparse Extents" (SparseExtentHeader:
    magicNumber, version, flags, capacity, grainSize, descriptorOffset, descriptorSize,
    numGTEsPerGT, rgdOffset, gdOffset, overHead, uncleanShutdown, the newline-detection
    characters, compressAlgorithm), grain directory / grain tables / redundant copies.
    VMware, "Virtual Disk Format 5.0", section "Stream-Optimized Compressed Sparse Extents":
    flags bit 16 (compressed grains) and bit 17 (markers), COMPRESSION_DEFLATE (RFC 1950
    zlib streams), grain markers (lba, size), metadata markers (numSectors, size=0, type:
    0 end-of-stream, 1 grain table, 2 grain directory, 3 footer), GD_AT_END and the footer.
    The "zeroed grain" GTE value 1 (flag bit 2) as qemu-img writes it with zeroed_grain=on.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ...errors import CorruptImage, LimitExceeded, QimgError
from .grains import COMPRESSED, DATA, SECTOR, UNALLOC, ZERO, GrainExtent

if TYPE_CHECKING:
    import numpy as np  # annotations only: numpy is imported where it is used

VMDK4_MAGIC = 0x564D444B  # "KDMV"
HEADER = struct.Struct("<IIIQQQQIQQQB4sH")
HEADER_SIZE = 512
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
NL_CHARS = b"\n \r\n"

#: qemu's limits: 1 GiB grains are unrealistic, 512 entries per GT, 32 Mi GD entries
MAX_GRAIN_SECTORS = 0x200000
MAX_GTES_PER_GT = 512
MAX_L1_ENTRIES = 32 * 1024 * 1024
MAX_VERSION = 3
#: embedded descriptor read at most
MAX_EMBEDDED_DESC_BYTES = 1 << 20


class SparseHeader:
    """A decoded SparseExtentHeader."""

    __slots__ = ("magic", "version", "flags", "capacity", "grain_size", "desc_offset", "desc_size",
                 "num_gtes_per_gt", "rgd_offset", "gd_offset", "overhead", "unclean", "nl", "compress_algorithm")

    @classmethod
    def unpack(cls, buf: bytes) -> "SparseHeader":
        h = cls()
        (h.magic, h.version, h.flags, h.capacity, h.grain_size, h.desc_offset, h.desc_size, h.num_gtes_per_gt,
         h.rgd_offset, h.gd_offset, h.overhead, h.unclean, h.nl, h.compress_algorithm) = HEADER.unpack_from(buf)
        return h

    def pack(self) -> bytes:
        raw = HEADER.pack(self.magic, self.version, self.flags, self.capacity, self.grain_size, self.desc_offset,
                          self.desc_size, self.num_gtes_per_gt, self.rgd_offset, self.gd_offset, self.overhead,
                          self.unclean, self.nl, self.compress_algorithm)
        return raw + bytes(HEADER_SIZE - len(raw))


def new_header(capacity_sectors: int, grain_sectors: int, flags: int, version: int, desc_offset: int,
               desc_size: int, rgd: int, gd: int, overhead: int, compress: int) -> SparseHeader:
    h = SparseHeader()
    h.magic, h.version, h.flags = VMDK4_MAGIC, version, flags
    h.capacity, h.grain_size = capacity_sectors, grain_sectors
    h.desc_offset, h.desc_size, h.num_gtes_per_gt = desc_offset, desc_size, 512
    h.rgd_offset, h.gd_offset, h.overhead = rgd, gd, overhead
    h.unclean, h.nl, h.compress_algorithm = 0, NL_CHARS, compress
    return h


def marker(value: int, size: int, mtype: int | None = None) -> bytes:
    """A 512-byte metadata marker (or the 12-byte head of a grain marker when mtype is None)."""
    if mtype is None:
        return struct.pack("<QI", value, size)
    return struct.pack("<QII", value, size, mtype) + bytes(SECTOR - 16)


def read_header(store, filename: str) -> SparseHeader:
    """The effective header: the one at offset 0, or the footer's when gdOffset is GD_AT_END."""
    head = store.pread_full(0, HEADER_SIZE)
    h = SparseHeader.unpack(head)
    if h.magic != VMDK4_MAGIC:
        raise CorruptImage("Invalid VMDK magic")
    if h.gd_offset == GD_AT_END:
        size = store.size()
        if size < 3 * SECTOR:
            raise CorruptImage("Invalid footer")
        tail = store.pread_full(size - 3 * SECTOR, 3 * SECTOR)
        fm = struct.unpack_from("<QII", tail, 0)
        f = SparseHeader.unpack(tail[SECTOR:])
        eos = struct.unpack_from("<QII", tail, 2 * SECTOR)
        if (f.magic != VMDK4_MAGIC or fm[1] != 0 or fm[2] != MARKER_FOOTER or eos != (0, 0, MARKER_EOS)):
            raise CorruptImage("Invalid footer")
        f.desc_offset, f.desc_size = h.desc_offset, h.desc_size
        h = f
    if h.version > MAX_VERSION:
        raise CorruptImage(f"Unsupported VMDK version {h.version}")
    return h


def embedded_descriptor(store, h: SparseHeader) -> bytes | None:
    if not h.desc_offset or not h.desc_size:
        return None
    nbytes = h.desc_size * SECTOR
    if nbytes > MAX_EMBEDDED_DESC_BYTES:
        raise LimitExceeded(f"descriptor size {nbytes} exceeds the limit {MAX_EMBEDDED_DESC_BYTES}")
    if h.desc_offset * SECTOR >= store.size():
        raise CorruptImage(f"descriptor offset {h.desc_offset * SECTOR} lies beyond the end of the file")
    return store.pread_full(h.desc_offset * SECTOR, nbytes)


class SparseExtent(GrainExtent):
    """A VMDK4 hosted sparse extent (monolithicSparse, twoGbMaxExtentSparse, streamOptimized)."""

    def __init__(self, store, filename: str, header: SparseHeader | None = None, kind_name: str = "SPARSE",
                 writable: bool = False):
        super().__init__(store, filename)
        h = header or read_header(store, filename)
        self.header = h
        self.kind_name = kind_name
        self.writable = writable
        if h.num_gtes_per_gt > MAX_GTES_PER_GT:
            raise CorruptImage("L2 table size too big")
        if h.num_gtes_per_gt * h.grain_size == 0:
            raise CorruptImage("L1 entry size is invalid")
        if h.grain_size > MAX_GRAIN_SECTORS:
            raise CorruptImage("Invalid granularity, image may be corrupt")
        l1_entry_sectors = h.num_gtes_per_gt * h.grain_size
        l1_size = -(-h.capacity // l1_entry_sectors)
        if l1_size > MAX_L1_ENTRIES:
            raise CorruptImage("L1 size too big")
        if h.capacity > (1 << 40):  # 512 TiB in sectors: beyond anything VMware defines
            raise LimitExceeded(f"extent capacity {h.capacity} sectors exceeds the limit {1 << 40}")
        if self.file_size < h.overhead * SECTOR and h.gd_offset != GD_AT_END:
            raise CorruptImage(f"File truncated, expecting at least {h.overhead * SECTOR} bytes")
        self.size = h.capacity * SECTOR
        self.grain_bytes = h.grain_size * SECTOR
        self.grain_sectors = h.grain_size
        self.l2_entries = h.num_gtes_per_gt
        self.compressed = h.compress_algorithm == COMPRESSION_DEFLATE
        self.has_marker = bool(h.flags & FLAG_MARKER)
        self.zero_grain = bool(h.flags & FLAG_ZERO_GRAIN)
        self.l1 = self._read_l1(h.gd_offset, l1_size)
        self.l1_backup = None
        if h.rgd_offset and (h.flags & FLAG_RGD):
            self.l1_backup = self._read_l1(h.rgd_offset, l1_size, required=False)
        self._raw_gts: dict[int, np.ndarray] = {}
        self.eof = -(-self.file_size // SECTOR) * SECTOR

    def _read_l1(self, offset_sectors: int, entries: int, required: bool = True):
        import numpy as np

        off = offset_sectors * SECTOR
        nbytes = entries * 4
        if off + nbytes > self.file_size or offset_sectors == 0 and entries:
            if not required:
                return None
            raise CorruptImage(f"Could not read l1 table from extent '{self.filename}'")
        return np.frombuffer(self.store.pread_full(off, nbytes), "<u4").copy()

    def _gt_location(self, gt_index):
        if gt_index >= len(self.l1):
            return None
        e = int(self.l1[gt_index])
        return None if e == 0 else (e * SECTOR, "<u4")

    def _decode(self, raw, gt_index):
        import numpy as np

        kinds = np.full(raw.shape, COMPRESSED if self.compressed else DATA, np.uint8)
        kinds[raw == 0] = UNALLOC
        if self.zero_grain:
            kinds[raw == 1] = ZERO
        offs = raw.astype(np.int64) * SECTOR
        self._raw_gts[gt_index] = raw
        return kinds, offs

    def _inflate(self, host, grain):
        gb = self.grain_bytes
        where = f"offset {host} of '{self.filename}'"
        if self.has_marker:
            head = self.store.pread_full(host, 12)
            lba, size = struct.unpack("<QI", head)
            if size > 2 * gb + 1024:
                raise CorruptImage(f"compressed grain size {size} at {where} exceeds the limit {2 * gb + 1024}")
            data = self.store.pread(host + 12, size)
        else:
            # without markers the compressed length is unknown: a grain never inflates from more than this
            data = self.store.pread(host, 2 * gb + 1024)
        return self.inflate(data, gb, where, grain)

    # --- the write side (hosted sparse, not stream) ---
    def _raw_gt(self, gt_index: int) -> np.ndarray:
        import numpy as np

        raw = self._raw_gts.get(gt_index)
        if raw is None:
            self.invalidate(gt_index)
            self.table(gt_index)
            raw = self._raw_gts.get(gt_index)
            if raw is None:
                raw = self._raw_gts[gt_index] = np.zeros(self.l2_entries, "<u4")
        return raw

    def _ensure_gt(self, gt_index: int) -> None:
        """Allocate a grain table (and its redundant copy) at the end of the file when missing."""
        import numpy as np

        if int(self.l1[gt_index]) != 0:
            return
        nbytes = self.l2_entries * 4
        tables = [self.l1] + ([self.l1_backup] if self.l1_backup is not None else [])
        gd_offsets = [self.header.gd_offset] + ([self.header.rgd_offset] if self.l1_backup is not None else [])
        for l1, gd in zip(tables, gd_offsets):
            off = self.eof
            self.store.pwrite(off, bytes(nbytes))
            self.eof = off + -(-nbytes // SECTOR) * SECTOR
            l1[gt_index] = off // SECTOR
            self.store.pwrite(gd * SECTOR + gt_index * 4, l1[gt_index:gt_index + 1].tobytes())
        self._raw_gts[gt_index] = np.zeros(self.l2_entries, "<u4")
        self.invalidate(gt_index)
        self.file_size = max(self.file_size, self.eof)

    def set_entries(self, gt_index: int, first: int, values: np.ndarray) -> None:
        """Write GT entries [first, first+len) of table gt_index (both copies)."""
        self._ensure_gt(gt_index)
        raw = self._raw_gt(gt_index)
        raw[first:first + len(values)] = values
        data = raw[first:first + len(values)].tobytes()
        self.store.pwrite(int(self.l1[gt_index]) * SECTOR + first * 4, data)
        if self.l1_backup is not None and int(self.l1_backup[gt_index]):
            self.store.pwrite(int(self.l1_backup[gt_index]) * SECTOR + first * 4, data)
        self.invalidate(gt_index)
        self._raw_gts[gt_index] = raw

    def append(self, data) -> int:
        """Write ``data`` at the end of the file; returns its sector number."""
        off = self.eof
        if (off + len(data)) // SECTOR > 0xFFFFFFFF:
            raise QimgError(f"VMDK extent '{self.filename}' is full: grain tables address 2 TiB at most")
        self.store.pwrite(off, data)
        self.eof = off + -(-len(data) // SECTOR) * SECTOR
        self.file_size = max(self.file_size, off + len(data))
        return off // SECTOR

    def pwrite(self, offset: int, data, base_reader=None) -> None:
        """Write guest bytes of this extent, allocating grains at the end of the file."""
        import numpy as np

        if self.compressed:
            raise QimgError("Could not write to allocated cluster for streamOptimized")
        view = memoryview(data).cast("B")
        gb = self.grain_bytes
        pos, total = 0, len(view)
        while pos < total:
            off = offset + pos
            grain = off // gb
            gt_index, first = divmod(grain, self.l2_entries)
            in_grain = off - grain * gb
            kinds, offs = self.table(gt_index)
            if in_grain == 0 and total - pos >= gb:
                count = min((total - pos) // gb, self.l2_entries - first)
                ks = kinds[first:first + count]
                if not ks.any():
                    # a run of unallocated grains: one contiguous append and one table update
                    sector = self.append(view[pos:pos + count * gb])
                    self.set_entries(gt_index, first, sector + np.arange(count, dtype=np.int64) * self.grain_sectors)
                    pos += count * gb
                    continue
                if (ks == DATA).all():
                    o = offs[first:first + count]
                    steps = np.flatnonzero(np.diff(o) != gb)
                    if steps.size:
                        count = int(steps[0]) + 1
                    self.store.pwrite(int(o[0]), view[pos:pos + count * gb])
                    pos += count * gb
                    continue
            n = min(gb - in_grain, total - pos)
            kind = int(kinds[first])
            if kind == DATA:
                self.store.pwrite(int(offs[first]) + in_grain, view[pos:pos + n])
            else:
                if n == gb:
                    buf = view[pos:pos + n]
                else:
                    if kind == UNALLOC and base_reader is not None:
                        full = bytearray(base_reader(grain * gb, gb))
                    else:
                        full = bytearray(gb)
                    full[in_grain:in_grain + n] = view[pos:pos + n]
                    buf = full
                sector = self.append(buf)
                self.set_entries(gt_index, first, np.array([sector], np.int64))
            pos += n

    def write_zeroes(self, offset: int, length: int, has_base: bool, base_reader=None) -> None:
        import numpy as np

        gb = self.grain_bytes
        pos, end = offset, offset + length
        while pos < end:
            grain = pos // gb
            gt_index, first = divmod(grain, self.l2_entries)
            in_grain = pos - grain * gb
            kinds, offs = self.table(gt_index)
            if in_grain == 0 and end - pos >= gb:
                count = min((end - pos) // gb, self.l2_entries - first)
                ks = kinds[first:first + count]
                if self.zero_grain:
                    if not (ks == ZERO).all():
                        self.set_entries(gt_index, first, np.ones(count, np.int64))
                    pos += count * gb
                    continue
                if not has_base and not (ks == DATA).any():
                    pos += count * gb
                    continue
            n = min(gb - in_grain, end - pos)
            kind = int(kinds[first])
            if kind == DATA or (kind == UNALLOC and has_base):
                self.pwrite(pos, bytes(n), base_reader)
            pos += n
