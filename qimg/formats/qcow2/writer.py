"""Writing qcow2: cluster allocation, data writes and L2 updates (the writer's core).

References: QEMU docs/interop/qcow2.txt ("Cluster mapping", "Extended L2 Entries",
"Reference counts", "Compressed Clusters Descriptor").

Data goes to the file at once; metadata is kept in memory (L1, the L2 tables touched,
the refcount blocks touched) and written by ``_flush_metadata`` (flush.py) in a crash-safe order:
refcount blocks (and a moved refcount table, with the header pointing at it), then L2 tables,
then the L1 table, then the header, then the refcount decrements of freed clusters.
New clusters come from ``Refcounts.alloc`` at the end of the file, contiguous,
so convert's sequential writes produce one pwrite per chunk and one L2 write per table.

This module allocates and writes data; its neighbours hold the other jobs of the writer:
zeroes.py (write_zeroes, discard), compressed.py (the compressed-cluster pipeline) and flush.py
(metadata written back, and the sync policy).  An image opened with the ``CACHE_UNSAFE`` open option
(convert's target, created or -n: qemu-img's cache mode unsafe) is not synced between metadata
stages and may be written by the copy engine's workers directly.
"""

from __future__ import annotations

from array import array

from ...errors import QimgError, Unsupported
from ...options import CACHE_UNSAFE
from . import compress as qcompress
from .compressed import Qcow2CompressedWriter
from .flush import Qcow2MetadataFlush
from .refcount import Refcounts
from .tables import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    NONZERO_BYTE,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    SUBCLUSTERS_PER_CLUSTER,
    LazyNumpy,
    LiveL2,
    copy_table,
    run_length,
)
from .zeroes import Qcow2ZeroWriter

np = LazyNumpy(globals())


class Qcow2Writer(Qcow2CompressedWriter, Qcow2ZeroWriter, Qcow2MetadataFlush):
    """Mixin for Qcow2Driver: everything that changes the image."""

    def _init_writer(self, options: dict | None = None) -> None:
        self._rc = None
        self._l2_dirty: dict[int, np.ndarray] = {}
        self._l1_dirty = False
        self._header_dirty = False
        self._cpos = None  # byte pointer for packing compressed clusters
        self._pending = None  # (guest cluster offset, bytearray): a cluster being assembled for compression
        # refcount decrements wait until no L2/L1 entry on disk references the clusters any more
        self._deferred_frees: list[tuple[int, int]] = []
        # in-place edits flush (fdatasync) between the metadata stages; convert's target does not
        self._sync_meta = not (options or {}).get(CACHE_UNSAFE)

    # ------------------------------------------------------------------ helpers
    def _dwrite(self, host: int, data, guest: int) -> None:
        """Write guest data (guest offset ``guest``) at a host offset of the data file, encrypting whole
        sectors when the image is encrypted (LUKS numbers sectors by host offset, legacy AES by guest offset)."""
        if not self.encrypted:
            self.data_store.pwrite(host, data)
            return
        cipher = self._crypto()
        view = memoryview(data).cast("B")
        n = len(view)
        first = host - host % 512
        last = -(-(host + n) // 512) * 512
        sector = self._iv_sector(first, guest - (host - first))
        if first != host or last != host + n:
            # partial sectors: read, decrypt, patch (only ever inside clusters that hold valid data)
            plain = bytearray(cipher.decrypt(sector, self.data_store.pread_full(first, last - first)))
            plain[host - first:host - first + n] = view
            self.data_store.pwrite(first, cipher.encrypt(sector, bytes(plain)))
        else:
            self.data_store.pwrite(host, cipher.encrypt(sector, bytes(view)))

    def _refcounts(self) -> Refcounts:
        if self._rc is None:
            self._rc = Refcounts(self.store, self.h, self.store.size(), self.writable)
        return self._rc

    def _dirty_l2_get(self, l2_offset: int):
        return self._l2_dirty.get(l2_offset)

    def _live_l2(self, l2_offset: int):
        """A standard table being written, read where it is (no copy, no whole-table decode), or None."""
        pending = None if self.extended else self._l2_dirty.get(l2_offset)
        return None if pending is None else LiveL2(pending, self.cs, self.h.has_data_file)

    @property
    def has_zero_init(self) -> bool:
        return not self.encrypted

    def _check_writable(self) -> None:
        if not self.writable:
            raise Unsupported("qcow2 image is opened read-only")
        if self.encrypted:
            self._crypto()  # the key is needed
        if self.snapshot_view is not None:
            raise Unsupported("Cannot write to a snapshot view")

    def _l2_for_write(self, l1i: int) -> tuple[int, np.ndarray]:
        """The L2 table for L1 index ``l1i`` as a mutable array, allocated or copied as needed."""
        if l1i >= len(self.l1):
            raise QimgError("qcow2: write beyond the L1 table")
        entry = int(self.l1[l1i])
        off = entry & L1E_OFFSET_MASK
        n = self.l2_entries * (2 if self.extended else 1)
        rc = self._refcounts()
        if off == 0:
            new = rc.alloc(1)
            raw = np.zeros(n, dtype=np.uint64) if self.extended else array("Q", bytes(8 * n))
        elif not entry & QCOW_OFLAG_COPIED and rc.get(off // self.cs) != 1:
            # shared with a snapshot: copy the table (data refcounts already count both users)
            raw = copy_table(self._read_l2_raw(off))
            new = rc.alloc(1)
            self._deferred_frees.append((off // self.cs, 1))
            self.cache.drop(off)
        else:
            raw = self._l2_dirty.get(off)
            if raw is None:
                raw = copy_table(self._read_l2_raw(off))
                self._l2_dirty[off] = raw
            if not entry & QCOW_OFLAG_COPIED:
                self.l1[l1i] = off | QCOW_OFLAG_COPIED
                self._l1_dirty = True
            self.cache.drop(off)
            return off, raw
        self._l2_dirty[new] = raw
        self.l1[l1i] = new | QCOW_OFLAG_COPIED
        self._l1_dirty = True
        self._l1_nonzero = None
        return new, raw

    def _backing_read(self, offset: int, view) -> None:
        """Fill ``view`` with the backing chain's guest bytes (zeros without a backing file)."""
        if self.backing is None or not self.backing.filename:
            view[:] = bytes(len(view))
            return
        self.readinto_below(offset, view)  # the chain this image was opened in hands it the layers below

    def _guest_read(self, offset: int, n: int) -> bytearray:
        """The current guest view (this layer over its backing chain) of a small range."""
        buf = bytearray(n)
        view = memoryview(buf)
        pos = 0
        while pos < n:
            ext = self.block_status(offset + pos, n - pos)
            k = min(ext.length, n - pos)
            sub = view[pos:pos + k]
            if ext.present:
                if ext.data:
                    self.readinto(offset + pos, sub)
            else:
                self._backing_read(offset + pos, sub)
            pos += k
        return buf

    def _free_entry(self, entry: int) -> None:
        """Drop this L2 reference to a host cluster (normal, zero-allocated or compressed)."""
        if self.h.has_data_file:
            return
        # applied by _flush_metadata once the L2 tables that dropped the references are written
        if entry & QCOW_OFLAG_COMPRESSED:
            host, length = qcompress.decode_descriptor(entry & ~(3 << 62), self.cluster_bits)
            first = host // self.cs
            last = (host + length - 1) // self.cs
            self._deferred_frees.append((first, last - first + 1))
            return
        host = entry & L2E_OFFSET_MASK
        if host:
            self._deferred_frees.append((host // self.cs, 1))

    def _alloc_data(self, guest_cluster: int, count: int) -> int:
        """Host offset for ``count`` new data clusters from guest cluster offset ``guest_cluster``."""
        if self.h.has_data_file:
            return guest_cluster  # external data files map guest offset == host offset
        return self._refcounts().alloc(count)

    # ------------------------------------------------------------------ pwrite
    def pwrite(self, offset: int, data) -> None:
        self._check_writable()
        self._track(offset, len(memoryview(data).cast("B")))
        self._flush_pending()
        self._pwrite_now(offset, data)

    def _pwrite_now(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        total = len(view)
        if offset + total > self.virtual_size:
            raise QimgError(f"qcow2: write at {offset}+{total} beyond the end of the image ({self.virtual_size})")
        pos = 0
        span = 1 << self.l2_span_bits
        while pos < total:
            off = offset + pos
            l1i = off >> self.l2_span_bits
            n = min(total - pos, (l1i + 1) * span - off)
            self._write_segment(l1i, off, view[pos:pos + n])
            pos += n
        self._maybe_flush()

    def _aligned(self, off: int) -> bool:
        return off % self.cs == 0 or off >= self.virtual_size

    def _write_segment(self, l1i: int, off: int, data) -> None:
        cs, cb = self.cs, self.cluster_bits
        end = off + len(data)
        l2off, raw = self._l2_for_write(l1i)
        plan = self._segment_plan(raw, off, end)
        if plan is not None:
            host, claim = plan
            self._dwrite(host, data, off)  # data first: the entries point at it afterwards
            if claim is not None:
                self._claim(raw, l2off, *claim)
            return
        c0 = off >> cb
        c1 = ((end - 1) >> cb) + 1
        i0 = c0 & (self.l2_entries - 1)
        i1 = i0 + (c1 - c0)
        # a mix: each run of never-written entries, or of clusters writable in place and contiguous,
        # still goes in one write (as qemu-img splits a request at allocation changes); the rest
        # cluster by cluster
        i = i0
        while i < i1:
            j = i + 1 if self.extended else max(self._same_run_end(raw, i, i1), i + 1)
            lo, hi = max(off, (c0 + (i - i0)) << cb), min(end, (c0 + (j - i0)) << cb)
            plan = self._segment_plan(raw, lo, hi) if j - i > 1 else None
            if plan is not None:
                host, claim = plan
                self._dwrite(host, data[lo - off:hi - off], lo)
                if claim is not None:
                    self._claim(raw, l2off, *claim)
            else:
                for k in range(i, j):
                    gc = (c0 + (k - i0)) << cb
                    a, b = max(off, gc), min(end, gc + cs)
                    self._write_cluster(raw, k, gc, a - gc, b - gc, data[a - off:b - off])
            i = j
        self.cache.drop(l2off)

    def _same_run_end(self, raw, i: int, stop: int) -> int:
        """End of the run of L2 entries from ``i`` that one write may cover: entries never written,
        or COPIED data clusters (not compressed, not zero) at contiguous host offsets (found in C:
        a byte scan, slice comparisons); ``i`` itself when entry ``i`` is neither."""
        e = raw[i]
        if not e:
            m = NONZERO_BYTE.search(raw, 8 * i, 8 * stop)
            return stop if m is None else m.start() >> 3
        if e & (QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO) != QCOW_OFLAG_COPIED:
            return i  # not writable in place (shared, compressed or zero): no run
        cs = self.cs
        stop = min(stop, i + ((1 << 64) - 1 - e) // cs + 1)  # (the entries stay 64-bit)
        return i + run_length(raw, i, stop, lambda k, c: array("Q", range(e + k * cs, e + (k + c) * cs, cs)))

    def _segment_plan(self, raw, off: int, end: int):
        """How guest bytes [off, end) inside one L2 table can be written with a single write:
        (host offset of ``off``, claim) or None.  ``claim`` is None when the clusters are already
        allocated here, contiguously, and writable in place; otherwise fresh clusters were allocated
        and ``_claim(raw, l2off, *claim)`` enters them once the data is written."""
        if self.extended:
            return None
        cb = self.cluster_bits
        c0 = off >> cb
        c1 = ((end - 1) >> cb) + 1
        i0 = c0 & (self.l2_entries - 1)
        i1 = i0 + (c1 - c0)
        if self._same_run_end(raw, i0, i1) < i1:
            return None
        if not raw[i0]:  # never written: fresh clusters
            edges_ok = self._aligned(off) and self._aligned(end)
            if edges_ok or (self.backing is None and not self.h.has_data_file and not self.encrypted):
                host = self._alloc_data(c0 << cb, c1 - c0)
                return host + (off - (c0 << cb)), (i0, i1, host)
            return None
        # every entry COPIED, neither compressed nor zero, host offsets contiguous: write in place
        h0 = raw[i0] & L2E_OFFSET_MASK
        if h0 or self.h.has_data_file:
            return h0 + (off - (c0 << cb)), None
        return None

    def _claim(self, raw, l2off: int, i0: int, i1: int, host: int) -> None:
        """Enter freshly allocated contiguous clusters at L2 indexes [i0, i1)."""
        first = host | QCOW_OFLAG_COPIED
        raw[i0:i1] = array("Q", range(first, first + (i1 - i0) * self.cs, self.cs))
        self.cache.drop(l2off)

    # ------------------------------------------------------------------ workers writing directly
    @property
    def direct_writes(self) -> str:
        """A freshly created plain image (convert's target) may be written by the copy engine's
        workers: its metadata only matters once the copy is complete."""
        fd = getattr(self.data_store, "fd", -1)
        ok = (self.writable and not self._sync_meta and not self.encrypted and not self.extended
              and not self.h.has_data_file and self.snapshot_view is None and self._pending is None
              and getattr(self, "_bitmap_writes", None) is None
              and fd is not None and fd >= 0)
        return "locked" if ok else ""

    def direct_map(self, offset: int, length: int):
        if length <= 0 or offset + length > self.virtual_size:
            return None
        out = []
        span = 1 << self.l2_span_bits
        pos = 0
        while pos < length:
            off = offset + pos
            l1i = off >> self.l2_span_bits
            n = min(length - pos, (l1i + 1) * span - off)
            l2off, raw = self._l2_for_write(l1i)
            plan = self._segment_plan(raw, off, off + n)
            if plan is None:
                return None  # pwrite takes it (segments claimed so far are then written in place)
            host, claim = plan
            if claim is not None:
                self._claim(raw, l2off, *claim)
            out.append((self.data_store, host, n))
            pos += n
        self._maybe_flush()
        return out

    def _write_cluster(self, raw, i: int, gc: int, lo: int, hi: int, data) -> None:
        """Write bytes [lo, hi) of the guest cluster at ``gc`` (L2 index ``i``)."""
        if self.extended:
            self._write_subclusters(raw, i, gc, lo, hi, data)
            return
        cs = self.cs
        e = int(raw[i])
        host = e & L2E_OFFSET_MASK
        is_comp = bool(e & QCOW_OFLAG_COMPRESSED)
        valid = host or self.h.has_data_file
        if not is_comp and valid and e & QCOW_OFLAG_COPIED and not e & QCOW_OFLAG_ZERO:
            self._dwrite(host + lo, data, gc + lo)
            return
        vend = min(cs, self.virtual_size - gc)
        full = lo == 0 and hi >= vend
        fresh_ok = e == 0 and self.backing is None and not self.h.has_data_file and not self.encrypted
        if full or fresh_ok:
            newhost = self._alloc_data(gc, 1)
            self._dwrite(newhost + lo, data, gc + lo)
        else:
            buf = self._guest_read(gc, vend)
            buf[lo:hi] = data
            newhost = self._alloc_data(gc, 1)
            self._dwrite(newhost, buf, gc)
        if e:
            self._free_entry(e)
        raw[i] = newhost | QCOW_OFLAG_COPIED

    def _write_subclusters(self, raw, i: int, gc: int, lo: int, hi: int, data) -> None:
        cs = self.cs
        sc = cs // SUBCLUSTERS_PER_CLUSTER
        e = int(raw[2 * i])
        bm = int(raw[2 * i + 1])
        host = e & L2E_OFFSET_MASK
        is_comp = bool(e & QCOW_OFLAG_COMPRESSED)
        valid = (host or (self.h.has_data_file and e & QCOW_OFLAG_COPIED)) and not is_comp
        s0, s1 = lo // sc, (hi - 1) // sc + 1
        vend = min(cs, self.virtual_size - gc)
        wlo, whi = s0 * sc, min(s1 * sc, vend)
        mask = ((1 << (s1 - s0)) - 1) << s0
        if valid and e & QCOW_OFLAG_COPIED:
            # in place; partial edge subclusters that are not allocated need their old view
            if (lo != wlo and not (bm >> s0) & 1) or (hi != whi and not (bm >> (s1 - 1)) & 1):
                buf = self._guest_read(gc + wlo, whi - wlo)
                buf[lo - wlo:hi - wlo] = data
                self._dwrite(host + wlo, buf, gc + wlo)
            else:
                self._dwrite(host + lo, data, gc + lo)
            raw[2 * i + 1] = np.uint64((bm | mask) & ~(mask << 32) & 0xFFFFFFFFFFFFFFFF)
            return
        if is_comp or valid:
            # compressed or shared: copy the whole cluster as the guest sees it
            buf = self._guest_read(gc, vend)
            buf[lo:hi] = data
            newhost = self._alloc_data(gc, 1)
            self._dwrite(newhost, buf, gc)
            self._free_entry(e)
            raw[2 * i] = np.uint64(newhost | QCOW_OFLAG_COPIED)
            nsub = -(-vend // sc)
            raw[2 * i + 1] = np.uint64((1 << nsub) - 1) if is_comp else np.uint64((bm | mask) & 0xFFFFFFFF)
            if not is_comp:
                # subclusters the old cluster left unallocated now hold their guest view too
                raw[2 * i + 1] = np.uint64((1 << nsub) - 1)
            return
        # unallocated cluster: allocate, write the touched subclusters only
        newhost = self._alloc_data(gc, 1)
        if lo != wlo or hi != whi:
            buf = self._guest_read(gc + wlo, whi - wlo)
            buf[lo - wlo:hi - wlo] = data
            self._dwrite(newhost + wlo, buf, gc + wlo)
        else:
            self._dwrite(newhost + lo, data, gc + lo)
        raw[2 * i] = np.uint64(newhost | QCOW_OFLAG_COPIED)
        raw[2 * i + 1] = np.uint64(((bm >> 32) & ~mask) << 32 | mask)


def _prealloc_method(self, mode: str) -> None:
    """preallocation=metadata/falloc/full: every L2 table followed by its data clusters."""
    cs, span = self.cs, 1 << self.l2_span_bits
    size = self.virtual_size
    data_end = 0
    for l1i in range(-(-size // span)):
        start = l1i * span
        end = min(size, start + span)
        l2off, raw = self._l2_for_write(l1i)
        n = -(-(end - start) // cs)
        host = self._alloc_data(start, n)
        if self.extended:
            hosts = (np.uint64(host) + np.arange(n, dtype=np.uint64) * np.uint64(cs)) | np.uint64(QCOW_OFLAG_COPIED)
            raw[0:2 * n:2] = hosts
        else:
            first = host | QCOW_OFLAG_COPIED
            raw[0:n] = array("Q", range(first, first + n * cs, cs))
        self.cache.drop(l2off)
        st = self.data_store
        length = end - start if self.h.has_data_file else n * cs
        if mode == "mapping":
            continue
        if mode == "falloc":
            st.fallocate(host, length)
        elif mode == "full":
            zero = bytes(min(length, 1 << 20))
            pos = 0
            while pos < length:
                k = min(len(zero), length - pos)
                st.pwrite(host + pos, zero[:k])
                pos += k
        data_end = max(data_end, host + length)
    st = self.data_store
    if st.size() < data_end:
        st.truncate(data_end)


Qcow2Writer._preallocate = _prealloc_method
