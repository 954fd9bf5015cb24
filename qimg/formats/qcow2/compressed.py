"""Writing qcow2: the compressed-cluster pipeline.

References: QEMU docs/interop/qcow2.txt ("Compressed Clusters Descriptor", "Cluster mapping").

Worker threads compress whole clusters (``prepare_compressed``); the writing thread enters them in
guest order (``write_prepared``): compressed clusters are packed back to back into shared host
clusters, clusters that did not shrink are written plainly in runs, zero clusters stay unallocated,
and pieces of clusters are assembled (over the current guest view) until the cluster is complete.
"""

from __future__ import annotations

from ...errors import Unsupported
from . import compress as qcompress
from .tables import (
    L1E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    LazyNumpy,
)

np = LazyNumpy(globals())


class Qcow2CompressedWriter:
    """Mixin for Qcow2Writer: write_compressed / prepare_compressed + write_prepared."""

    def prepare_compressed(self, offset: int, data) -> list:
        """Compress the whole clusters in ``data`` (runs in worker threads).

        Returns [(kind, guest offset, payload)]: "z" all zeros, "c" compressed bytes, "p" clusters
        that did not shrink (a view of ``data`` covering the whole run of them: ``data`` must stay
        unchanged until ``write_prepared`` has written it), "part" a piece of a cluster (merged in
        ``write_prepared``).
        """
        cs = self.cs
        view = memoryview(data).cast("B")
        ctype = self.h.compression_type
        out = []
        plain_from = -1  # where in ``view`` the current run of uncompressible clusters starts
        pos = 0
        total = len(view)
        while pos < total:
            off = offset + pos
            gc = off - off % cs
            n = min(total - pos, gc + cs - off)
            piece = view[pos:pos + n]
            if off != gc or (n < cs and off + n < self.virtual_size):
                out.append(("part", off, bytes(piece)))
            else:
                item = self._compress_cluster(gc, piece if n == cs else bytes(piece) + bytes(cs - n), n, ctype)
                if item is None:  # did not shrink: written as it is, runs in one write
                    if plain_from < 0:
                        plain_from = pos
                        out.append(None)
                    out[-1] = ("p", offset + plain_from, view[plain_from:pos + n])
                    pos += n
                    continue
                out.append(item)
            plain_from = -1
            pos += n
        return out

    def _compress_cluster(self, gc: int, chunk, n: int, ctype: int):
        """("z", gc, None), ("c", gc, compressed bytes), or None when the cluster did not shrink."""
        if qcompress.is_zero(chunk):
            return ("z", gc, None)
        comp = qcompress.compress(chunk, self.cs, ctype)
        return ("c", gc, comp) if comp is not None else None

    def write_prepared(self, offset: int, prepared: list) -> None:
        self._check_writable()
        if prepared:
            kind, gc, payload = prepared[-1]
            end = gc + (self.cs if kind in ("z", "c") else len(payload))
            self._track(offset, min(end, self.virtual_size) - offset)
        if self.h.has_data_file:
            raise Unsupported("Compression is not supported with an external data file")
        if self.encrypted:
            raise Unsupported("Compression is not supported for encrypted qcow2 images")
        for kind, gc, payload in prepared:
            if gc >= self.virtual_size:
                break
            if kind == "part":
                self._add_partial(gc, payload)
                continue
            pend = self._pending
            if pend is not None:
                if pend[0] == gc:
                    self._pending = None  # a whole-cluster write replaces the partial one
                else:
                    self._flush_pending()
            self._write_cluster_item(kind, gc, payload)
        self._maybe_flush()

    def _write_cluster_item(self, kind: str, gc: int, payload) -> None:
        n = min(self.cs, self.virtual_size - gc)
        if kind == "z":
            if self.backing is None and self._raw_entry(gc) == (0, 0):
                return  # unallocated without a backing file already reads as zeros
            self._zero_now(gc, n)
        elif kind == "p":
            self._pwrite_now(gc, payload)
        else:
            self._write_one_compressed(gc, payload)

    def _raw_entry(self, gc: int) -> tuple[int, int]:
        """(L2 entry, extended bitmap or 0) of the guest cluster at ``gc``, from memory when possible."""
        l1i = gc >> self.l2_span_bits
        l2off = int(self.l1[l1i]) & L1E_OFFSET_MASK if l1i < len(self.l1) else 0
        if not l2off:
            return 0, 0
        raw = self._l2_dirty.get(l2off)
        if raw is None:
            raw = self._decoded(l2off).raw
        i = (gc >> self.cluster_bits) & (self.l2_entries - 1)
        if self.extended:
            return int(raw[2 * i]), int(raw[2 * i + 1])
        return int(raw[i]), 0

    def _add_partial(self, off: int, piece: bytes) -> None:
        """Collect a piece of a cluster; the cluster is compressed once it is complete or left."""
        cs = self.cs
        gc = off - off % cs
        pend = self._pending
        if pend is not None and pend[0] != gc:
            self._flush_pending()
            pend = None
        if pend is None:
            n = min(cs, self.virtual_size - gc)
            buf = self._guest_read(gc, n)
            pend = self._pending = (gc, buf)
        buf = pend[1]
        buf[off - gc:off - gc + len(piece)] = piece

    def _flush_pending(self) -> None:
        pend = self._pending
        if pend is None:
            return
        self._pending = None
        gc, buf = pend
        n = len(buf)
        chunk = bytes(buf) + bytes(self.cs - n)
        item = self._compress_cluster(gc, chunk, n, self.h.compression_type)
        self._write_cluster_item(*(item or ("p", gc, buf)))

    def write_compressed(self, offset: int, data) -> None:
        """Compress and write whole clusters (the synchronous path)."""
        self.write_prepared(offset, self.prepare_compressed(offset, data))

    def _write_one_compressed(self, gc: int, payload: bytes) -> None:
        rc = self._refcounts()
        cs = self.cs
        size = len(payload)
        pos = self._cpos
        if pos is not None and pos % cs and rc.get(pos // cs) >= rc.max_ref:
            pos = None  # the shared cluster's refcount is at its maximum: start a new one
        if pos is not None and pos % cs and pos + size <= -(-pos // cs) * cs:
            rc.add(pos // cs, 1, 1)  # fits in the current partly used cluster
        elif pos is not None and pos % cs and -(-pos // cs) * cs == rc.next_free:
            first = pos // cs
            extra = -(-(pos + size - rc.next_free) // cs)
            got = rc.alloc(extra)
            if got != (first + 1) * cs:
                pos = None
            else:
                rc.add(first, 1, 1)
        else:
            pos = None
        if pos is None:
            pos = rc.alloc(-(-size // cs))
        self.store.pwrite(pos, payload)
        self._cpos = pos + size
        l1i = gc >> self.l2_span_bits
        l2off, raw = self._l2_for_write(l1i)
        i = (gc >> self.cluster_bits) & (self.l2_entries - 1)
        entry = QCOW_OFLAG_COMPRESSED | qcompress.encode_descriptor(pos, size, self.cluster_bits)
        if self.extended:
            old = int(raw[2 * i])
            raw[2 * i] = np.uint64(entry)
            raw[2 * i + 1] = np.uint64(0)
        else:
            old = int(raw[i])
            raw[i] = entry
        if old and (old & ~1):
            self._free_entry(old)
        self.cache.drop(l2off)
