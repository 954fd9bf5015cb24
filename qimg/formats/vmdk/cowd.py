"""VMDK3 ("COWD") sparse extents, as ESX 2.x vmfsSparse disks: read only.

References:
    VMware, "Virtual Disk Format 1.1", section "ESX Server Sparse Extents": the COWDisk
    header (magicNumber "COWD", version, flags, numSectors, grainSize, gdOffset, numGDEntries,
    freeSector, ...); grain tables of 4096 entries holding sector offsets, 0 = unallocated.
"""

from __future__ import annotations

import struct

import numpy as np

from ...errors import CorruptImage
from .grains import DATA, SECTOR, UNALLOC, GrainExtent
from .sparse import MAX_GRAIN_SECTORS, MAX_L1_ENTRIES

VMDK3_MAGIC = 0x44574F43  # "COWD"
COWD_HEADER = struct.Struct("<IIIIIIII")
COWD_GT_ENTRIES = 4096


class CowdExtent(GrainExtent):
    """An ESX Server sparse extent (VMDK version 3 header)."""

    def __init__(self, store, filename: str, kind_name: str = "VMFSSPARSE"):
        super().__init__(store, filename)
        self.kind_name = kind_name
        head = store.pread_full(0, COWD_HEADER.size)
        magic, version, flags, disk_sectors, granularity, gd_offset, gd_entries, _free = COWD_HEADER.unpack(head)
        if magic != VMDK3_MAGIC:
            raise CorruptImage("Invalid VMDK magic")
        if granularity == 0:
            raise CorruptImage("L1 entry size is invalid")
        if granularity > MAX_GRAIN_SECTORS:
            raise CorruptImage("Invalid granularity, image may be corrupt")
        if gd_entries > MAX_L1_ENTRIES:
            raise CorruptImage("L1 size too big")
        self.size = disk_sectors * SECTOR
        self.grain_bytes = granularity * SECTOR
        self.l2_entries = COWD_GT_ENTRIES
        need = -(-disk_sectors // (granularity * COWD_GT_ENTRIES))
        if gd_entries < need:
            raise CorruptImage(f"grain directory of '{filename}' has {gd_entries} entries, {need} needed")
        off, nbytes = gd_offset * SECTOR, gd_entries * 4
        if gd_offset == 0 or off + nbytes > self.file_size:
            raise CorruptImage(f"Could not read l1 table from extent '{filename}'")
        self.l1 = np.frombuffer(store.pread_full(off, nbytes), "<u4").copy()

    def _gt_location(self, gt_index):
        if gt_index >= len(self.l1):
            return None
        e = int(self.l1[gt_index])
        return None if e == 0 else (e * SECTOR, "<u4")

    def _decode(self, raw, gt_index):
        kinds = np.where(raw == 0, UNALLOC, DATA).astype(np.uint8)
        return kinds, raw.astype(np.int64) * SECTOR
