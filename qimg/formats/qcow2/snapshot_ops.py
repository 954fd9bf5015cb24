"""qcow2 internal snapshots: create, apply (revert to), delete.

References:
  qcow2 specification (qemu docs/interop/qcow2.txt): "Snapshots" (table entry layout, extra data:
  vm_state_size_large, disk_size, icount), "Host cluster management" (refcounts, OFLAG_COPIED).
  Observed qemu-img 7.2 behaviour: ids are the next free number, names may repeat, lookups try the
  id first and then the name, apply resizes the image to the snapshot's disk size.

Every change goes through ``lifecycle.commit`` (copy-on-write tables, one header write), so a process
killed at any point leaves the image with or without the change, and consistent either way.
"""

from __future__ import annotations

import time
from array import array

from ...errors import QimgError, reports
from . import lifecycle as lc
from .bitmaps import bitmaps_of
from .header import MAX_SNAPSHOTS, QCOW2_INCOMPAT_CORRUPT
from .snapshot import Snapshot, snapshot_index


def refuse_if_corrupt(meta: lc.Qcow2Meta) -> list:
    """Run the consistency walk; a corrupt image is refused with one line. Returns the computed refcounts.

    A consistent image is verified by check's plain pass; anything it does not decide (leaks, a dirty
    image, compressed clusters, other refcount widths...) goes through the full walk."""
    from .check_quick import quick_refcounts

    if meta.header.incompatible_features & QCOW2_INCOMPAT_CORRUPT:
        raise QimgError("qcow2: Image is corrupt; cannot be opened read/write")
    counts = quick_refcounts(meta)
    if counts is not None:
        return counts
    from .check import _check_once

    res, state = _check_once(meta, False, lambda m: None)
    if res.corruptions or res.check_errors:
        raise QimgError("qcow2 image is corrupt: run 'qemu-img check -r all' on it first")
    return state["computed"].tolist()


def create(store, name: str, vm_state_size: int = 0, vm_clock_nsec: int = 0, date: float | None = None) -> None:
    """Take a snapshot of the active state: the snapshot keeps the current L1/L2 tables as they are."""
    meta = lc.Qcow2Meta(store)
    refs = refuse_if_corrupt(meta)
    if meta.header.has_data_file:
        raise QimgError(f"Could not create snapshot '{name}': -95 (Operation not supported)")
    change = lc.current_plan(meta)
    ids = [int(s.id_str) for s in meta.snapshots if s.id_str.isdigit()]
    new_id = str(max(ids, default=0) + 1)
    now_us = int((time.time() if date is None else date) * 1_000_000)
    h = meta.header
    # extra data (written whole by commit): vm_state_size_large, disk_size, icount 0
    sn = Snapshot(l1_table_offset=h.l1_table_offset, l1_size=h.l1_size, id_str=new_id, name=name,
                  date_sec=now_us // 1_000_000, date_nsec=(now_us % 1_000_000) * 1000,
                  vm_clock_nsec=vm_clock_nsec, vm_state_size=vm_state_size, disk_size=h.size, icount=0)
    check_count(len(change.snapshots) + 1)
    change.snapshots.append(sn)
    change.snapshot_plans.append(lc.L1Plan(lc.masked(meta.l1),
                                           location=h.l1_table_offset if h.l1_size else None))
    try:
        lc.commit(meta, change, old_refs=refs)
    except lc.RefcountOverflow:
        raise QimgError(f"Could not create snapshot '{name}': -22 (Invalid argument)") from None


def check_count(n: int) -> None:
    if n > MAX_SNAPSHOTS:
        raise QimgError("Too many snapshots")


def apply(store, id_or_name: str) -> None:
    """Revert the active state to a snapshot (the snapshot stays)."""
    meta = lc.Qcow2Meta(store)
    if bitmaps_of(store, meta.header, meta.file_size):
        # (qemu-img: reverting would leave every bitmap, enabled or not, describing other data)
        raise QimgError(f"Could not apply snapshot '{id_or_name}': Device has active dirty bitmaps")
    i = snapshot_index(meta.snapshots, {"id_or_name": id_or_name})
    if i < 0:
        raise QimgError(f"Could not apply snapshot '{id_or_name}': Failed to load snapshot: No such file or directory")
    err, errno_text = meta.snapshots[i].l1_problem(meta.cluster_size)
    if err:
        raise QimgError(reports(err, f"Could not apply snapshot '{id_or_name}': Failed to load snapshot: {errno_text}"))
    refs = refuse_if_corrupt(meta)
    change = lc.current_plan(meta)
    sn = meta.snapshots[i]
    entries = array("Q", change.snapshot_plans[i].entries)
    size = sn.disk_size if sn.disk_size is not None else meta.header.size
    need = -(-size // (meta.cluster_size * meta.l2_entries))
    if len(entries) < need:
        entries += array("Q", bytes(8 * (need - len(entries))))
    change.header.size = size
    change.active = lc.L1Plan(entries)
    lc.commit(meta, change, old_refs=refs)


def delete(store, id_or_name: str) -> None:
    """Delete a snapshot; clusters only it used become free."""
    meta = lc.Qcow2Meta(store)
    # qemu-img snapshot -d looks the snapshot up by name only
    i = next((k for k, s in enumerate(meta.snapshots) if s.name == id_or_name), -1)
    if i < 0:
        raise QimgError(f"Could not delete snapshot '{id_or_name}': snapshot not found")
    err = meta.snapshots[i].l1_error(meta.cluster_size)
    if err:
        raise QimgError(f"Could not delete snapshot '{id_or_name}': {err}")
    refs = refuse_if_corrupt(meta)
    change = lc.current_plan(meta)
    del change.snapshots[i]
    del change.snapshot_plans[i]
    lc.commit(meta, change, old_refs=refs)


def set_backing(store, filename: str | None, fmt: str | None) -> None:
    """Record a new backing file (or none): one write of the header page, after a flush."""
    meta = lc.Qcow2Meta(store)
    if meta.header.incompatible_features & QCOW2_INCOMPAT_CORRUPT:
        raise QimgError("qcow2: Image is corrupt; cannot be opened read/write")
    import copy

    h = copy.deepcopy(meta.header)
    h.backing_file = filename or None
    h.backing_format = fmt if filename else None
    h.backing_file_offset = h.backing_file_size = 0
    if len(h.repack()) > min(meta.cluster_size, lc.HEADER_PAGE):
        raise QimgError("Could not change the backing file: the name does not fit in the header cluster")
    lc.write_header_only(meta, h)


def make_empty(store) -> None:
    """Drop every cluster of the active layer (reads fall through to the backing file).

    With snapshots the L1 table is emptied; the clusters stay as long as a snapshot uses them."""
    meta = lc.Qcow2Meta(store)
    refs = refuse_if_corrupt(meta)
    change = lc.current_plan(meta)
    change.active = lc.L1Plan(array("Q", bytes(8 * len(change.active.entries))))
    change.truncate_file = True
    first = lc.commit(meta, change, old_refs=refs)
    # once more, so the new tables move down into the freed clusters and the file can shrink (the
    # refcounts the first commit wrote are those of the image it left)
    meta2 = lc.Qcow2Meta(store)
    again = lc.current_plan(meta2)
    again.truncate_file = True
    lc.commit(meta2, again, old_refs=first["refcounts"])
