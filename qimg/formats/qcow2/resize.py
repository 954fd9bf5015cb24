"""qcow2 resize: grow (L1 and refcount table grow as needed) and shrink.

References:
  qcow2 specification (qemu docs/interop/qcow2.txt): "Header" (size, l1_size), "Cluster mapping".
  Observed qemu-img 7.2 behaviour: images with internal snapshots may be resized (the snapshots keep
  their own size), shrinking drops the clusters past the new end and truncates the file, preallocation
  only applies to the grown part.

The change is made copy-on-write through ``lifecycle.commit``.
"""

from __future__ import annotations

from array import array

from ...errors import QimgError
from . import lifecycle as lc
from .bitmaps import resized_bitmaps
from .header import MAX_L1_SIZE_BYTES, QCOW2_AUTOCLEAR_BITMAPS
from .snapshot_ops import refuse_if_corrupt
from .tables import QCOW_L2_BITMAP_ALL_ALLOC

PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def resize(store, new_size: int, prealloc: str = "off") -> None:
    """Set the virtual size of the qcow2 image in ``store`` (the caller enforces --shrink)."""
    meta = lc.Qcow2Meta(store)
    refs = refuse_if_corrupt(meta)
    h = meta.header
    if prealloc not in PREALLOC_MODES:
        raise QimgError(f"Unsupported preallocation mode '{prealloc}'")
    if h.version < 3 and meta.snapshots:
        raise QimgError("Can't resize a v2 image which has snapshots")
    if new_size % 512:
        raise QimgError("The new size must be a multiple of 512")
    if h.bitmaps_ext and h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS and new_size < h.size:
        raise QimgError("Cannot shrink an image with persistent bitmaps")
    change = lc.current_plan(meta)
    apply_size(meta, change, new_size)
    change.bitmaps = resized_bitmaps(meta, new_size)  # the tables follow the size (qemu-img: on close)
    if prealloc != "off" and new_size > h.size:
        _preallocate(meta, change, h.size, new_size, prealloc)
    lc.commit(meta, change, old_refs=refs)
    if new_size < h.size:
        # the grown-and-shrunk file keeps no tail past the last used cluster (as qemu-img does)
        meta2 = lc.Qcow2Meta(store)
        end = lc.last_used(lc.compute_refs(meta2)) * meta2.cluster_size
        if store.size() > end:
            store.truncate(end)
            store.flush()


def apply_size(meta: lc.Qcow2Meta, change: lc.Change, new_size: int) -> None:
    """Adjust the active L1 plan of ``change`` to ``new_size`` (drop or add entries)."""
    cs = meta.cluster_size
    per_l2 = cs * meta.l2_entries
    need = -(-new_size // per_l2)
    lc.check_limit("qcow2 L1 table entries", need, MAX_L1_SIZE_BYTES // 8)
    ents = change.active.entries
    if need > len(ents):
        ents = ents + array("Q", bytes(8 * (need - len(ents))))
    elif new_size < change.header.size:
        ents = ents[:need]
        # the last L2 table may reach past the new end: clear those entries in a copy
        if need and new_size % per_l2 and ents[need - 1]:
            first_dead = -(-(new_size % per_l2) // cs)
            if first_dead < meta.l2_entries:
                w = meta.l2_entry_words
                l2 = array("Q", meta.read_l2(ents[need - 1]))
                l2[first_dead * w:] = array("Q", bytes(8 * (len(l2) - first_dead * w)))
                change.active.l2_new[need - 1] = l2
    change.active.entries = ents
    change.header.size = new_size


def _preallocate(meta: lc.Qcow2Meta, change: lc.Change, old_size: int, new_size: int, mode: str) -> None:
    """Allocate data clusters for the grown range, at the end of the file (they read as zeros)."""
    cs = meta.cluster_size
    bits = meta.cluster_bits
    first_c = -(-old_size // cs)
    last_c = -(-new_size // cs)
    # first the partial cluster at the old end is already covered (or unallocated: reads zero anyway)
    count = last_c - first_c
    if count <= 0:
        return
    refs = lc.compute_refs(meta)
    start = max(meta.file_clusters, len(refs)) + 8 + count // meta.l2_entries + 8
    act = change.active
    ents = act.entries
    w = meta.l2_entry_words
    per = meta.l2_entries
    g = first_c
    while g < first_c + count:
        # one L2 table at a time: its entries [l2i, l2i + k) get consecutive host clusters
        li, l2i = divmod(g, per)
        k = min(per - l2i, first_c + count - g)
        if li not in act.l2_new:
            if ents[li]:
                act.l2_new[li] = array("Q", meta.read_l2(ents[li]))
            else:
                act.l2_new[li] = array("Q", bytes(8 * w * per))
                ents[li] = 1 << bits  # placeholder; replaced when the table is written
        l2 = act.l2_new[li]
        host = (start + g - first_c) << bits
        l2[l2i * w:(l2i + k) * w:w] = array("Q", range(host, host + (k << bits), 1 << bits))
        if w == 2:
            l2[l2i * 2 + 1:(l2i + k) * 2:2] = array("Q", [QCOW_L2_BITMAP_ALL_ALLOC]) * k
        g += k
    end = (start + count) << bits
    store = meta.store
    if mode == "full":
        lc._write_zeros(store, start << bits, count << bits)
    else:
        store.truncate(max(store.size(), end))
        if mode == "falloc":
            store.fallocate(start << bits, count << bits)
