"""Persistent bitmap changes, each committed through the copy-on-write lifecycle: the bits written
through an open image, bitmaps copied in by ``convert --bitmaps``, and ``qemu-img bitmap``'s actions.

References: see bitmaps.py (qcow2 specification, "Bitmaps"; qemu-img 7.2's observed behaviour).
"""

from __future__ import annotations

from ...errors import QimgError
from . import lifecycle as lc
from .bitmaps import (
    BME_FLAG_AUTO,
    BME_FLAG_IN_USE,
    MAX_BITMAP_BYTES,
    MAX_BITMAP_NAME,
    MAX_GRANULARITY_BITS,
    BitmapInfo,
    BitmapPlan,
    BitmapReader,
    DirtyTracker,
    bitmap_bytes,
    copied_plans,
    dirty_plans,
    kept_plans,
    mark_ranges,
    merge_ranges,
    set_ranges,
    table_entries,
)
from .header import MAX_BITMAPS


def store_dirty(store, tracker: DirtyTracker) -> None:
    """Set the bits of the written ranges in the tracked bitmaps and clear their in-use flag."""
    meta = lc.Qcow2Meta(store)
    change = lc.current_plan(meta)
    change.bitmaps = dirty_plans(meta, merge_ranges(tracker.ranges), tracker.names)
    lc.commit(meta, change)
    tracker.ranges = []
    tracker.marked = False


def copy_bitmaps(store, source: list[tuple[BitmapInfo, BitmapReader]]) -> None:
    """Add the bitmaps of ``source`` (with their data) to the image in ``store``."""
    meta = lc.Qcow2Meta(store)
    change = lc.current_plan(meta)
    change.bitmaps = copied_plans(meta, source)
    lc.commit(meta, change)


def edit_bitmaps(store, filename: str, name: str, actions: list, granularity: int | None, source_plans) -> None:
    """qemu-img bitmap: ``actions`` ((kind, argument) pairs) in order on bitmap ``name``.  Like
    qemu-img, what succeeded before a failing action is kept.  ``source_plans(source_name, plans)``
    gives the (store, plan, virtual size, cluster size) of a --merge source."""
    meta = lc.Qcow2Meta(store)
    plans = kept_plans(meta)
    done = 0
    try:
        for kind, arg in actions:
            try:
                _edit_one(meta, plans, filename, name, kind, arg, granularity, source_plans)
            except QimgError as e:
                raise QimgError(f"Operation {kind} on bitmap {name} failed: {e}") from None
            done += 1
    finally:
        if done:
            change = lc.current_plan(meta)
            change.bitmaps = plans
            lc.commit(meta, change)


def _edit_one(meta, plans: list, filename: str, name: str, kind: str, arg, granularity, source_plans) -> None:
    cs = meta.cluster_size
    size = meta.header.size
    found = [p for p in plans if p.info.name == name]
    if kind == "add":
        if found:
            raise QimgError(f"Bitmap already exists: {name}")
        g = granularity if granularity is not None else max(4096, cs)
        if g < 512 or g & (g - 1) or g > 1 << MAX_GRANULARITY_BITS:
            raise QimgError("Granularity must be power of 2 and at least 512")
        cant = f"Can't make bitmap '{name}' persistent in '{filename}': "
        if meta.header.version < 3:
            raise QimgError(cant + "Cannot store dirty bitmaps in qcow2 v2 files")
        if len(name.encode()) > MAX_BITMAP_NAME:
            raise QimgError(cant + f"Name length exceeds maximum ({MAX_BITMAP_NAME} characters)")
        gbits = g.bit_length() - 1
        if bitmap_bytes(size, gbits) > MAX_BITMAP_BYTES:
            raise QimgError(cant + "Too much space will be occupied by the bitmap. Use larger granularity")
        if len(plans) >= MAX_BITMAPS:
            raise QimgError(cant + "Too many persistent bitmaps")
        n = table_entries(size, gbits, cs)
        plans.append(BitmapPlan(BitmapInfo(name, BME_FLAG_AUTO, gbits, 0, n), [0] * n))
        return
    if not found:
        raise QimgError(f"Dirty bitmap '{name}' not found")
    plan = found[0]
    if kind == "remove":
        plans.remove(plan)
        return
    if plan.info.flags & BME_FLAG_IN_USE:
        raise QimgError(f"Bitmap '{name}' is inconsistent and cannot be used\n"
                        "Try block-dirty-bitmap-remove to delete this bitmap from disk")
    if kind == "clear":
        plan.table = [0] * len(plan.table)
        plan.fresh = {}
    elif kind == "enable":
        plan.info.flags |= BME_FLAG_AUTO
    elif kind == "disable":
        plan.info.flags &= ~BME_FLAG_AUTO
    elif kind == "merge":
        src_store, src, src_size, src_cs = source_plans(arg, plans)
        if src.info.flags & BME_FLAG_IN_USE:
            raise QimgError(f"Bitmap '{arg}' is inconsistent and cannot be used\n"
                            "Try block-dirty-bitmap-remove to delete this bitmap from disk")
        if src_size != size:
            raise QimgError(f"Bitmaps are of different sizes (destination size is {size}, source size is "
                            f"{src_size}) and can't be merged")
        mark_ranges(meta.store, plan, set_ranges(src_store, src, size, src_cs), cs)
