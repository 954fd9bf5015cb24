"""Writing qcow2: metadata written back in a crash-safe order.

References: QEMU docs/interop/qcow2.txt ("Reference counts", "Cluster mapping", "Header").

Order: data -> refcount blocks and table (and the header's refcount table fields when the table
moved) -> L2 tables -> L1 table -> header -> refcount decrements.  Whether each stage is made
durable (fdatasync) before the next is the open image's sync policy (``_sync_meta``): in-place edits
sync, convert's target (qemu-img's cache mode unsafe) does not.
"""

from __future__ import annotations

import struct

from .tables import table_bytes

DIRTY_L2_LIMIT_BYTES = 64 << 20


class Qcow2MetadataFlush:
    """Mixin for Qcow2Writer: _flush_metadata, flush, finalize."""

    def _maybe_flush(self) -> None:
        if len(self._l2_dirty) * self.cs * (2 if self.extended else 1) > DIRTY_L2_LIMIT_BYTES:
            self._flush_metadata(sync=self._sync_meta)

    def _flush_metadata(self, sync: bool) -> None:
        """Write metadata so that a crash after any single write leaves a consistent image.

        Order: data and refcount blocks, then the refcount table (and the header's refcount table
        fields when the table moved) -> L2 tables -> L1 table -> header -> refcount decrements.  Every
        cluster an L2/L1 entry on disk references is counted by the refcount structure the header on
        disk points at and holds its data; clusters freed meanwhile at worst leak.  With ``sync`` each
        stage is made durable (fdatasync) before the next one starts (a stage that wrote nothing costs
        no sync: the store skips it).
        """
        if not self.writable or self.store is None:
            return
        self._flush_pending()
        rc = self._rc
        frees = self._deferred_frees
        if not self._l2_dirty and not self._l1_dirty and not self._header_dirty and not frees and (
                rc is None or (not rc.dirty and not rc.table_dirty and not rc.old_tables)):
            return
        store = self.store
        if sync and self.data_store is not store:
            self.data_store.flush()
        if rc is not None and (rc.dirty or rc.table_dirty):
            # (no sync before the increments: a refcount that counts a cluster whose data is not yet
            # durable costs at worst a leak; data and counts are both made durable before any L2 entry
            # points at them)
            rc.flush_blocks()
            if rc.table_dirty:
                if sync:
                    store.flush()  # blocks before the table that points at them
                if rc.flush_table():
                    self.h.refcount_table_offset = rc.table_offset
                    self.h.refcount_table_clusters = len(rc.table) * 8 // self.cs
                    if sync:
                        store.flush()
                    # the header must point at the new table before anything counted only there is used
                    self._write_refcount_header_fields()
        if self._l2_dirty:
            if sync:
                store.flush()  # data and refcounts before the L2 entries that reference them
            for off in sorted(self._l2_dirty):
                store.pwrite(off, table_bytes(self._l2_dirty[off]))
                self.cache.drop(off)
            self._l2_dirty.clear()
        if self._l1_dirty and len(self.l1):
            if sync:
                store.flush()
            store.pwrite(self.h.l1_table_offset, table_bytes(self.l1))
            self._l1_dirty = False
        if self._header_dirty:
            if sync:
                store.flush()
            self._write_header_fields()
            self._header_dirty = False
        if rc is not None and rc.old_tables and self.h.refcount_table_offset == rc.table_offset:
            rc.release_old_tables()
        if frees:
            rc = self._refcounts()
            for first, count in frees:
                rc.add(first, count, -1)
            self._deferred_frees = []
        if rc is not None and (rc.dirty or rc.table_dirty):
            if sync:
                store.flush()  # the references are gone before their clusters' refcounts drop
            rc.flush_blocks()
            if rc.table_dirty and rc.flush_table():
                # cannot happen for decrements (no new blocks); kept for safety
                self.h.refcount_table_offset = rc.table_offset
                self.h.refcount_table_clusters = len(rc.table) * 8 // self.cs
                if sync:
                    store.flush()
                self._write_refcount_header_fields()
        if sync:
            store.flush()

    def _write_refcount_header_fields(self) -> None:
        """Point the header at the (moved) refcount table: refcount_table_offset and _clusters only."""
        h = self.h
        self.store.pwrite(48, struct.pack(">QI", h.refcount_table_offset, h.refcount_table_clusters))

    def _write_header_fields(self) -> None:
        """Rewrite the fixed header fields that writing may change (L1 and refcount table)."""
        h = self.h
        self.store.pwrite(36, struct.pack(">IQQI", h.l1_size, h.l1_table_offset, h.refcount_table_offset,
                                          h.refcount_table_clusters))

    def flush(self) -> None:
        self._flush_pending()
        self._flush_metadata(sync=True)

    def finalize(self) -> None:
        """Write every pending table (convert calls this before close; no fsync, like qemu-img)."""
        if self.writable and self.store is not None:
            self._flush_pending()
        self._flush_metadata(sync=False)
