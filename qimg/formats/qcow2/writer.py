"""Writing qcow2: cluster allocation, L2 updates, zero clusters, compressed clusters, flushing.

References: QEMU docs/interop/qcow2.txt ("Cluster mapping", "Extended L2 Entries",
"Reference counts", "Compressed Clusters Descriptor").

Data goes to the file at once; metadata is kept in memory (L1, the L2 tables touched,
the refcount blocks touched) and written by ``_flush_metadata`` in a crash-safe order:
refcount blocks (and a moved refcount table, with the header pointing at it), then L2 tables,
then the L1 table, then the header, then the refcount decrements of freed clusters.
New clusters come from ``Refcounts.alloc`` at the end of the file, contiguous,
so convert's sequential writes produce one pwrite per chunk and one L2 write per table.
"""

from __future__ import annotations

import struct
from array import array

from ...errors import QimgError, Unsupported
from ...options import CACHE_UNSAFE
from . import compress as qcompress
from .refcount import Refcounts
from .tables import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_L2_BITMAP_ALL_ZERO,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    SUBCLUSTERS_PER_CLUSTER,
    LazyNumpy,
    copy_table,
    table_bytes,
)

np = LazyNumpy(globals())

DIRTY_L2_LIMIT_BYTES = 64 << 20
class Qcow2Writer:
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
        pos = 0
        for i in range(i0, i1):
            gc = (c0 + (i - i0)) << cb
            lo = max(off, gc) - gc
            hi = min(end, gc + cs) - gc
            self._write_cluster(raw, i, gc, lo, hi, data[pos:pos + hi - lo])
            pos += hi - lo
        self.cache.drop(l2off)

    def _segment_plan(self, raw, off: int, end: int):
        """How guest bytes [off, end) inside one L2 table can be written with a single write:
        (host offset of ``off``, claim) or None.  ``claim`` is None when the clusters are already
        allocated here, contiguously, and writable in place; otherwise fresh clusters were allocated
        and ``_claim(raw, l2off, *claim)`` enters them once the data is written."""
        if self.extended:
            return None
        cs, cb = self.cs, self.cluster_bits
        c0 = off >> cb
        c1 = ((end - 1) >> cb) + 1
        i0 = c0 & (self.l2_entries - 1)
        i1 = i0 + (c1 - c0)
        ents = raw[i0:i1]  # (a standard table is an array('Q'): plain Python below)
        if not any(ents):
            edges_ok = self._aligned(off) and self._aligned(end)
            if edges_ok or (self.backing is None and not self.h.has_data_file and not self.encrypted):
                host = self._alloc_data(c0 << cb, c1 - c0)
                return host + (off - (c0 << cb)), (i0, i1, host)
            return None
        # every entry COPIED, neither compressed nor zero, host offsets contiguous: write in place
        h0 = ents[0] & L2E_OFFSET_MASK
        check = QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO | L2E_OFFSET_MASK
        want = QCOW_OFLAG_COPIED | h0
        if (h0 or self.h.has_data_file) and all((e & check) == want + k * cs for k, e in enumerate(ents)):
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

    # ------------------------------------------------------------------ zeroes
    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        self._check_writable()
        self._track(offset, min(length, self.virtual_size - offset))
        self._flush_pending()
        self._zero_now(offset, length, may_unmap)

    def _zero_now(self, offset: int, length: int, may_unmap: bool = True) -> None:
        end = min(offset + length, self.virtual_size)
        if self.h.version < 3:
            self._zero_by_writing(offset, end)
            return
        unit = self.cs // SUBCLUSTERS_PER_CLUSTER if self.extended else self.cs
        a = -(-offset // unit) * unit
        b = end if end == self.virtual_size else end // unit * unit
        if b <= a:
            self._zero_by_writing(offset, end)
            return
        if a > offset:
            self._zero_by_writing(offset, a)
        span = 1 << self.l2_span_bits
        pos = a
        while pos < b:
            l1i = pos >> self.l2_span_bits
            n = min(b - pos, (l1i + 1) * span - pos)
            self._zero_segment(l1i, pos, pos + n, may_unmap)
            pos += n
        if b < end:
            self._zero_by_writing(b, end)
        self._maybe_flush()

    def _zero_by_writing(self, start: int, end: int) -> None:
        """Zeros as data, skipping runs that already read as zeros with nothing showing through."""
        pos = start
        chunk = None
        while pos < end:
            ext = self.block_status(pos, end - pos)
            n = min(ext.length, end - pos)
            if not (ext.zero and (ext.present or self.backing is None)):
                if chunk is None:
                    chunk = bytes(min(end - start, 1 << 20))
                p = pos
                while p < pos + n:
                    k = min(len(chunk), pos + n - p)
                    self._pwrite_now(p, chunk[:k])
                    p += k
            pos += n

    def _zero_segment(self, l1i: int, start: int, end: int, may_unmap: bool) -> None:
        l2off, raw = self._l2_for_write(l1i)
        try:
            self._zero_entries(raw, start, end, may_unmap)
        finally:
            self.cache.drop(l2off)

    def _zero_entries(self, raw, start: int, end: int, may_unmap: bool) -> None:
        cs, cb = self.cs, self.cluster_bits
        if not self.extended:
            c0, c1 = start >> cb, -(-end // cs)
            i0 = c0 & (self.l2_entries - 1)
            i1 = i0 + (c1 - c0)
            ents = raw[i0:i1]
            keep = [not may_unmap and bool(e & QCOW_OFLAG_COPIED) and not e & QCOW_OFLAG_COMPRESSED
                    and bool(e & L2E_OFFSET_MASK) for e in ents]
            for e, k in zip(ents, keep):
                if e and not k:
                    self._free_entry(e)
            if self.h.data_file_raw:
                self._zero_data_file(start, end)
            raw[i0:i1] = array("Q", [(e | QCOW_OFLAG_ZERO) if k else QCOW_OFLAG_ZERO for e, k in zip(ents, keep)])
            return
        sc = cs // SUBCLUSTERS_PER_CLUSTER
        pos = start
        while pos < end:
            gc = pos & ~(cs - 1)
            i = (pos >> cb) & (self.l2_entries - 1)
            s0 = (pos - gc) // sc
            s1 = min(SUBCLUSTERS_PER_CLUSTER, -(-(min(end, gc + cs) - gc) // sc))
            e, bm = int(raw[2 * i]), int(raw[2 * i + 1])
            vend_sub = -(-min(cs, self.virtual_size - gc) // sc)
            whole = s0 == 0 and s1 >= vend_sub
            if whole and (may_unmap or e & QCOW_OFLAG_COMPRESSED or not e & QCOW_OFLAG_COPIED):
                if e:
                    self._free_entry(e)
                raw[2 * i] = np.uint64(0)
                raw[2 * i + 1] = np.uint64(QCOW_L2_BITMAP_ALL_ZERO)
            elif e & QCOW_OFLAG_COMPRESSED:
                self._zero_by_writing(gc + s0 * sc, min(gc + s1 * sc, self.virtual_size))
            else:
                mask = ((1 << (s1 - s0)) - 1) << s0
                raw[2 * i + 1] = np.uint64(((bm & ~mask) & 0xFFFFFFFF) | (((bm >> 32) | mask) << 32))
            if self.h.data_file_raw:
                self._zero_data_file(gc + s0 * sc, min(gc + s1 * sc, self.virtual_size))
            pos = gc + cs

    def _zero_data_file(self, start: int, end: int) -> None:
        st = self.data_store
        size = st.size()
        if start >= size:
            return
        end = min(end, size)
        if hasattr(st, "punch_hole") and st.punch_hole(start, end - start):
            return
        zero = bytes(min(end - start, 1 << 20))
        pos = start
        while pos < end:
            n = min(len(zero), end - pos)
            st.pwrite(pos, zero[:n])
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """Release whole clusters (they read as zeros afterwards, as qemu's discard leaves them)."""
        if self.h.version < 3:
            return
        start = -(-offset // self.cs) * self.cs
        end = min(offset + length, self.virtual_size)
        if end < self.virtual_size:
            end = end // self.cs * self.cs
        if end > start:
            self.write_zeroes(start, end - start, True)

    # ------------------------------------------------------------------ compressed clusters
    def prepare_compressed(self, offset: int, data) -> list:
        """Compress the whole clusters in ``data`` (runs in worker threads).

        Returns [(kind, guest offset, payload)]: "z" all zeros, "c" compressed bytes, "p" did not
        shrink (plain bytes), "part" a piece of a cluster (merged in ``write_prepared``).
        """
        cs = self.cs
        view = memoryview(data).cast("B")
        out = []
        pos = 0
        total = len(view)
        while pos < total:
            off = offset + pos
            gc = off - off % cs
            n = min(total - pos, gc + cs - off)
            piece = view[pos:pos + n]
            pos += n
            if off != gc or (n < cs and off + n < self.virtual_size):
                out.append(("part", off, bytes(piece)))
                continue
            chunk = piece if n == cs else bytes(piece) + bytes(cs - n)
            out.append(self._compress_cluster(gc, chunk, n))
        return out

    def _compress_cluster(self, gc: int, chunk, n: int) -> tuple:
        if not np.frombuffer(chunk, dtype=np.uint64).any():
            return ("z", gc, None)
        comp = qcompress.compress(chunk, self.cs, self.h.compression_type)
        return ("c", gc, comp) if comp is not None else ("p", gc, bytes(chunk[:n]))

    def write_prepared(self, offset: int, prepared: list) -> None:
        self._check_writable()
        self._track(offset, min(len(prepared) * self.cs, self.virtual_size - offset))
        if self.h.has_data_file:
            raise Unsupported("Compression is not supported with an external data file")
        if self.encrypted:
            raise Unsupported("Compression is not supported for encrypted qcow2 images")
        plain: list = []  # a run of uncompressible clusters, written with one pwrite
        plain_at = plain_end = 0
        for kind, gc, payload in prepared:
            if gc >= self.virtual_size:
                break
            if kind == "part":
                if plain:
                    self._pwrite_now(plain_at, b"".join(plain))
                    plain = []
                self._add_partial(gc, payload)
                continue
            pend = self._pending
            if pend is not None:
                if pend[0] == gc:
                    self._pending = None  # a whole-cluster write replaces the partial one
                else:
                    self._flush_pending()
            if kind == "p":
                if plain and plain_end != gc:
                    self._pwrite_now(plain_at, b"".join(plain))
                    plain = []
                if not plain:
                    plain_at = gc
                plain.append(payload)
                plain_end = gc + len(payload)
                continue
            if plain:
                self._pwrite_now(plain_at, b"".join(plain))
                plain = []
            self._write_cluster_item(kind, gc, payload)
        if plain:
            self._pwrite_now(plain_at, b"".join(plain))
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
        self._write_cluster_item(*self._compress_cluster(gc, chunk, n))

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

    # ------------------------------------------------------------------ flushing
    def _maybe_flush(self) -> None:
        if len(self._l2_dirty) * self.cs * (2 if self.extended else 1) > DIRTY_L2_LIMIT_BYTES:
            self._flush_metadata(sync=self._sync_meta)

    def _flush_metadata(self, sync: bool) -> None:
        """Write metadata so that a crash after any single write leaves a consistent image.

        Order: data -> refcount blocks and table (and the header's refcount table fields when the
        table moved) -> L2 tables -> L1 table -> header -> refcount decrements.  Every cluster an
        L2/L1 entry on disk references is counted by the refcount structure the header on disk
        points at; clusters freed meanwhile at worst leak.  With ``sync`` each stage is made
        durable (fdatasync) before the next one starts.
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
            if sync:
                store.flush()  # data before the refcounts that count it
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
                store.flush()
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
