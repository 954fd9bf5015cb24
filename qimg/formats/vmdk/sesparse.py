"""seSparse extents (ESXi "space efficient" sparse, magic 0xcafebabe): read only.

References:
    The seSparse on-disk layout as documented by VMware's vSphere storage notes and
    public format write-ups: a constant header (magic 0x00000000cafebabe, version
    0x0000000200000001, capacity, grain_size = 8 sectors, grain_table_size = 64 sectors,
    flags, then offset/size pairs in sectors for the volatile header, journal header,
    journal, grain directory, grain tables, free bitmap, back map and grains); a volatile
    header (magic 0x00000000cafecafe, free_gt_number, next_txn_seq_number, replay_journal).
    Grain directory entries: top nibble 1 = allocated, low 60 bits = grain table index.
    Grain table entries: top nibble 0 = unallocated, 1 = unmapped (reads zeros),
    2 = zero, 3 = allocated (cluster index = bits 48..59 | bits 0..47 << 12).
"""

from __future__ import annotations

import struct

import numpy as np

from ...errors import CorruptImage, LimitExceeded
from .grains import DATA, SECTOR, UNALLOC, ZERO, GrainExtent
from .sparse import MAX_L1_ENTRIES

SESPARSE_CONST_MAGIC = 0x00000000CAFEBABE
SESPARSE_VOLATILE_MAGIC = 0x00000000CAFECAFE
SESPARSE_VERSION = 0x0000000200000001
CONST_HEADER = struct.Struct("<" + "Q" * 30)
VOLATILE_HEADER = struct.Struct("<QQQB")
GRAIN_SECTORS = 8
GT_SECTORS = 64
GD_ALLOCATED = 0x1000000000000000
ENTRY_TYPE_MASK = 0xF000000000000000
ENTRY_INDEX_MASK = 0x0FFFFFFFFFFFFFFF


class SeSparseExtent(GrainExtent):
    """An ESXi seSparse extent."""

    kind_name = "SESPARSE"

    def __init__(self, store, filename: str, sectors: int):
        super().__init__(store, filename)
        v = CONST_HEADER.unpack(store.pread_full(0, CONST_HEADER.size))
        magic, version, capacity, grain_size, gt_size, flags = v[:6]
        (vol_off, vol_size, _jh_off, _jh_size, _j_off, _j_size, gd_off, gd_size, gt_off, gt_total,
         _fb_off, _fb_size, _bm_off, _bm_size, grains_off, grains_size) = v[10:26]
        if magic != SESPARSE_CONST_MAGIC:
            raise CorruptImage("Bad magic number in seSparse header")
        if version != SESPARSE_VERSION:
            raise CorruptImage(f"Unsupported version number in seSparse header: {version:#x}")
        if grain_size != GRAIN_SECTORS:
            raise CorruptImage(f"Unsupported grain size {grain_size} in seSparse header")
        if gt_size != GT_SECTORS:
            raise CorruptImage(f"Unsupported grain table size {gt_size} in seSparse header")
        if flags != 0:
            raise CorruptImage(f"Unsupported flags {flags:#x} in seSparse header")
        if sectors != capacity:
            raise CorruptImage("Size of seSparse header and descriptor extent mismatch")
        for name, off in (("volatile header", vol_off), ("grain directory", gd_off), ("grain tables", gt_off),
                          ("grains", grains_off)):
            if off * SECTOR > self.file_size:
                raise CorruptImage(f"seSparse {name} offset {off * SECTOR} lies beyond the end of '{filename}'")
        vh = VOLATILE_HEADER.unpack(store.pread_full(vol_off * SECTOR, VOLATILE_HEADER.size))
        if vh[0] != SESPARSE_VOLATILE_MAGIC:
            raise CorruptImage("Bad magic number in seSparse volatile header")
        if vh[3] != 0:
            raise CorruptImage("Image needs a journal replay, which is not supported")
        self.size = capacity * SECTOR
        self.grain_bytes = grain_size * SECTOR
        self.l2_entries = gt_size * SECTOR // 8
        l1_entries = gd_size * SECTOR // 8
        if l1_entries > MAX_L1_ENTRIES:
            raise CorruptImage("L1 size too big")
        need = -(-capacity // (grain_size * self.l2_entries))
        if l1_entries < need:
            raise CorruptImage(f"grain directory of '{filename}' has {l1_entries} entries, {need} needed")
        off = gd_off * SECTOR
        if off + l1_entries * 8 > self.file_size:
            raise CorruptImage(f"Could not read l1 table from extent '{filename}'")
        self.l1 = np.frombuffer(store.pread_full(off, need * 8), "<u8").copy()
        self.gt_base = gt_off * SECTOR
        self.gt_count = gt_total // gt_size if gt_size else 0
        self.grains_base = grains_off * SECTOR
        self.grains_count = grains_size // grain_size

    def _gt_location(self, gt_index):
        if gt_index >= len(self.l1):
            return None
        e = int(self.l1[gt_index])
        t = e & ENTRY_TYPE_MASK
        if t == 0:
            return None
        if t != GD_ALLOCATED:
            raise CorruptImage(f"Invalid grain directory entry {e:#x} in '{self.filename}'")
        idx = e & ENTRY_INDEX_MASK
        if idx >= self.gt_count:
            raise LimitExceeded(f"grain table index {idx} exceeds the limit {self.gt_count}")
        return self.gt_base + idx * self.l2_entries * 8, "<u8"

    def _decode(self, raw, gt_index):
        typ = (raw >> np.uint64(60)).astype(np.uint8)
        if (typ > 3).any():
            raise CorruptImage(f"Invalid grain table entry in table {gt_index} of '{self.filename}'")
        kinds = np.where(typ == 0, UNALLOC, np.where(typ == 3, DATA, ZERO)).astype(np.uint8)
        idx = ((raw & np.uint64(0x0FFF000000000000)) >> np.uint64(48)) | ((raw & np.uint64(0x0000FFFFFFFFFFFF))
                                                                          << np.uint64(12))
        bad = (typ == 3) & (idx >= np.uint64(max(self.grains_count, 0)))
        if bad.any():
            raise CorruptImage(f"grain index beyond the grain area in table {gt_index} of '{self.filename}'")
        offs = np.where(typ == 3, idx.astype(np.int64) * self.grain_bytes + self.grains_base, 0)
        return kinds, offs.astype(np.int64)
