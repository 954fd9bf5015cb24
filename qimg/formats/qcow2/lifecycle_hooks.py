"""The lifecycle hooks of Qcow2Driver: check, snapshots, resize, amend, backing changes, emptying.

References: see lifecycle.py (qcow2 specification; qemu-img 7.2 behaviour).

Each hook writes out what the writer still holds, runs the copy-on-write change from the modules
beside this one on the image file, and reloads the driver's view of the metadata.
"""

from __future__ import annotations

from ...errors import QimgError


class Qcow2LifecycleMixin:
    """Mixed into Qcow2Driver (before the writer) to provide the lifecycle driver hooks."""

    @classmethod
    def open(cls, store, filename, writable=False, opener=None, options=None):
        drv = super().open(store, filename, writable, opener, options)
        drv._lifecycle_options = dict(options or {})
        drv._bitmap_writes = None
        if writable and drv._is_dirty():
            # lazy refcounts left the stored refcounts stale: rebuild them before any write
            try:
                drv._lifecycle(lambda st: _repair_dirty(st))
            except BaseException:
                drv.close()
                raise
        if writable and drv.h.bitmaps_ext:
            from .bitmaps import tracker_for

            drv._bitmap_writes = tracker_for(drv)
        return drv

    def _track(self, offset: int, length: int) -> None:
        """Note a guest write for the enabled persistent bitmaps (qemu-img keeps them up to date)."""
        if getattr(self, "_bitmap_writes", None) is not None:
            self._bitmap_writes.add(self, offset, length)

    def _store_bitmaps(self) -> None:
        if getattr(self, "_bitmap_writes", None) is not None and self._bitmap_writes.ranges:
            from .bitmap_edit import store_dirty

            self._lifecycle(lambda st: store_dirty(st, self._bitmap_writes))

    # ----- convert --bitmaps -----
    def bitmaps_for_copy(self, skip_broken: bool, warn) -> list:
        """The persistent bitmaps convert --bitmaps copies out of this image."""
        from .bitmaps import source_bitmaps

        if self.h.version < 3:
            raise QimgError("Source lacks bitmap support")
        return source_bitmaps(self, skip_broken, warn)

    def prepare_bitmaps(self, fmt_name: str, source: list) -> None:
        """Refuse, before any data is written, bitmaps this image cannot take."""
        from .bitmaps import bitmaps_of

        if self.h.version < 3:
            raise QimgError(f"Format driver '{fmt_name}' does not support bitmaps")
        have = {bm.name for bm in bitmaps_of(self.store, self.h, self.store.size())}
        for bm, _reader in reversed(source):  # (qemu-img: last to first)
            if bm.name in have:
                raise QimgError(f"Failed to create bitmap {bm.name}: Bitmap already exists: {bm.name}")

    def add_bitmaps(self, source: list) -> None:
        from .bitmap_edit import copy_bitmaps

        if source:
            self._lifecycle(lambda st: copy_bitmaps(st, source))

    def edit_bitmap(self, name: str, actions: list, granularity: int | None, merge_source=None) -> None:
        """qemu-img bitmap on this image; ``merge_source`` is an open image whose bitmaps --merge reads
        (None: this image's own)."""
        from .bitmap_edit import edit_bitmaps
        from .bitmaps import kept_plans

        def source_plans(src_name, own_plans):
            if merge_source is None:
                found = [p for p in own_plans if p.info.name == src_name]
                store, size, cs = self.store, self.virtual_size, self.cs
            elif merge_source.format_name == "qcow2":  # the only format with persistent bitmaps
                from . import lifecycle as lc

                meta = lc.Qcow2Meta(merge_source.store)
                found = [p for p in kept_plans(meta) if p.info.name == src_name]
                store, size, cs = merge_source.store, meta.header.size, meta.cluster_size
            else:
                found = []
            if not found:
                raise QimgError(f"Dirty bitmap '{src_name}' not found")
            return store, found[0], size, cs

        self._lifecycle(lambda st: edit_bitmaps(st, self.filename, name, actions, granularity, source_plans))

    def _is_dirty(self) -> bool:
        from .header import QCOW2_INCOMPAT_DIRTY

        h = getattr(self, "h", None)
        return bool(h is not None and getattr(h, "incompatible_features", 0) & QCOW2_INCOMPAT_DIRTY)

    def _lifecycle(self, fn):
        """Flush pending metadata, run ``fn(store)``, reload the metadata view."""
        if not self.writable:
            raise QimgError("qcow2 image is opened read-only")
        self._flush_metadata(sync=True)
        try:
            return fn(self.store)
        finally:
            ds = getattr(self, "data_store", None)
            if ds is not None and ds is not self.store:
                ds.close()   # _open opens the data file again
            self._open(getattr(self, "_lifecycle_options", {}))

    # ----- hooks -----
    def check(self, repair: str | None = None):
        from .check import run_check

        if repair:
            return self._lifecycle(lambda st: run_check(st, repair))
        return run_check(self.store, None)

    def truncate(self, size: int, shrink: bool = False, prealloc: str = "off") -> None:
        from .resize import resize

        if size < self.virtual_size and not shrink:
            raise QimgError("Use the --shrink option to perform a shrink operation.")
        self._lifecycle(lambda st: resize(st, size, prealloc or "off"))

    def set_backing(self, filename: str | None, fmt: str | None) -> None:
        from .snapshot_ops import set_backing

        self._lifecycle(lambda st: set_backing(st, filename, fmt))

    def make_empty(self) -> None:
        from .snapshot_ops import make_empty

        self._lifecycle(make_empty)

    def snapshot_create(self, name: str, vm_state_size: int = 0, vm_clock_nsec: int = 0) -> None:
        from .snapshot_ops import create

        self._lifecycle(lambda st: create(st, name, vm_state_size, vm_clock_nsec))

    def snapshot_apply(self, id_or_name: str) -> None:
        from .snapshot_ops import apply

        self._lifecycle(lambda st: apply(st, id_or_name))
        self.virtual_size = self.h.size

    def snapshot_delete(self, id_or_name: str) -> None:
        from .snapshot_ops import delete

        self._lifecycle(lambda st: delete(st, id_or_name))

    def snapshot_infos(self) -> list[dict]:
        # the table read at open (reread after every change the hooks above make)
        return [s.info() for s in self.snapshot_list]

    def amend(self, options: dict, force: bool = False) -> None:
        from .amend import amend

        self._lifecycle(lambda st: amend(st, options, force))

    @classmethod
    def amend_help(cls) -> str:
        from .amend import amend_help

        return amend_help()


def _repair_dirty(store) -> None:
    from . import lifecycle as lc

    meta = lc.Qcow2Meta(store)
    refs = lc.compute_refs(meta)
    lc.commit(meta, lc.current_plan(meta), old_refs=refs)
