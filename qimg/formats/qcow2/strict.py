"""qcow2 under the untrusted-mode policy: the metadata budget of an open and strict structure checks.

References: qcow2.txt ("Header", "Host cluster management", "Snapshots"): the header occupies the
first cluster; the L1 table, the refcount table and the snapshot table are cluster-aligned areas of
their own; standard data clusters start at a cluster-aligned host offset inside the file.
"""

from __future__ import annotations

from ...core.policy import refuse_overlaps
from ...errors import CorruptImage

#: bytes a snapshot table entry takes at the least (the fixed part, before names and extra data)
SNAPSHOT_ENTRY_MIN_BYTES = 40


def open_checks(drv) -> None:
    """Charge the tables an open keeps to its budget; in strict mode refuse overlapping metadata."""
    h = drv.h
    drv.charge("qcow2 L1 table", h.l1_size * 8)
    drv.charge("qcow2 snapshot table", h.nb_snapshots * SNAPSHOT_ENTRY_MIN_BYTES)
    if not drv.strict:
        return
    cs = drv.cs
    for name, off in (("L1 table", h.l1_table_offset), ("refcount table", h.refcount_table_offset),
                      ("snapshot table", h.snapshots_offset if h.nb_snapshots else 0)):
        if off % cs:
            raise CorruptImage(f"'{drv.filename}': {name} at offset {off:#x} is not aligned to the cluster size")
    refuse_overlaps(drv.filename, [
        ("header", 0, cs),
        ("L1 table", h.l1_table_offset, h.l1_size * 8),
        ("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs),
    ])


def check_host(drv, host: int, unit_bytes: int, guest_offset: int) -> None:
    """Strict mode: a data run's host offset is aligned and lies inside the file holding it."""
    store = drv.data_store if drv.data_store is not None else drv.store
    drv.check_host(store, host, unit_bytes, guest_offset)
