"""qcow2 metadata read and rewritten as a whole: the base of check, snapshot, resize, amend and backing changes.

References:
  qcow2 specification (qemu docs/interop/qcow2.txt): "Header", "Header extensions", "Host cluster
  management" (refcount table and refcount blocks, refcount_order), "Cluster mapping" (L1/L2 entries,
  the compressed cluster descriptor, extended L2 entries), "Snapshots" (table entries and extra data),
  "Bitmaps" (bitmap directory and bitmap tables, for their cluster references).
  Observed behaviour of qemu-img 7.2 (check, snapshot, resize, amend, rebase, commit).

The header is read by ``header.Header.parse`` (the driver's own reader) and written back with
``Header.repack``; this module reads and rewrites the tables behind it.

How a change is made (crash safety): live metadata is never edited in place.  New L1 and L2 tables,
a new snapshot table and a complete new refcount structure go to clusters that are free both in the
old and in the new image; everything is flushed (fdatasync); then ONE write of the header page (the
header, its extensions and the backing file name, at most 4 KiB from offset 0, so a killed process
leaves it all old or all new) switches the image over, and is flushed in turn.  A process killed
before the switch leaves the old image exactly as it was; after it, the new one.  Clusters only the
old image used become free (refcount 0), never leaked.
"""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass, field

from ...errors import QimgError, check_limit
from .bitmaps import BME_OFFSET_MASK, pack_directory, set_extension
from .header import (
    MAX_L1_SIZE_BYTES,
    MAX_REFTABLE_SIZE_BYTES,
    MAX_SNAPSHOT_TABLE_BYTES,
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW2_INCOMPAT_DIRTY,
    Header,
    read_bitmap_directory,
)
from .refcount import REFT_OFFSET_MASK, decode_block, encode_block
from .snapshot import read_snapshots
from .tables import L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, LazyNumpy

np = LazyNumpy(globals())

REFT_RESERVED_MASK = 0x1FF
HEADER_PAGE = 4096
L2_CACHE_BYTES = 64 << 20

class RefcountOverflow(QimgError):
    """A reference count would not fit in refcount_bits."""


def _be64(buf) -> np.ndarray:
    return np.frombuffer(buf, ">u8").astype(np.uint64)


class Qcow2Meta:
    """All metadata of one qcow2 file, read through a store; nothing is cached across changes."""

    def __init__(self, store):
        self.store = store
        self.file_size = store.size()
        h = Header.parse(store, self.file_size)   # every header field checked against its limit
        self.header = h
        cs = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.cluster_size = cs
        self.l2_entry_words = 2 if h.extended_l2 else 1
        self.l2_entries = h.l2_entries
        self.csize_shift = 62 - (h.cluster_bits - 8)
        self.csize_mask = (1 << (h.cluster_bits - 8)) - 1
        self.cluster_offset_mask = (1 << self.csize_shift) - 1
        self.rc_per_block = cs * 8 // h.refcount_bits
        self.file_clusters = -(-self.file_size // cs)
        self._l2_cache: dict[int, np.ndarray] = {}
        # the whole tables are read on first use (header-only changes never need them; their sizes are
        # bounded by the header's limits); what lies past the end of the file reads as zeros, as in qemu,
        # and check counts it
        self._l1 = self._reftable = None
        self.snapshots = read_snapshots(store, h.snapshots_offset, h.nb_snapshots, cs, self.file_size)
        self.snapshot_table_bytes = sum(s.entry_size for s in self.snapshots)

    @property
    def l1(self) -> np.ndarray:
        if self._l1 is None:
            h = self.header
            self._l1 = self.read_table(h.l1_table_offset, h.l1_size)
        return self._l1

    @property
    def reftable(self) -> np.ndarray:
        if self._reftable is None:
            h = self.header
            n = h.refcount_table_clusters * self.cluster_size // 8
            self._reftable = self.read_table(h.refcount_table_offset, n)
        return self._reftable

    # ----- reading -----
    def read_table(self, offset: int, entries: int) -> np.ndarray:
        if entries == 0:
            return np.zeros(0, np.uint64)
        return _be64(_pread_zeros(self.store, offset, entries * 8))

    def read_l2(self, offset: int) -> np.ndarray:
        """An L2 table as uint64 entries ((n, 2) with the subcluster bitmaps for extended L2)."""
        arr = self._l2_cache.get(offset)
        if arr is None:
            arr = _be64(_pread_zeros(self.store, offset, self.cluster_size))
            if self.l2_entry_words == 2:
                arr = arr.reshape(-1, 2)
            if len(self._l2_cache) * self.cluster_size >= L2_CACHE_BYTES:
                self._l2_cache.clear()   # bounded memory on huge images; tables are re-read when needed
            self._l2_cache[offset] = arr
        return arr

    def read_refcounts(self, nb_clusters: int | None = None) -> np.ndarray:
        """The refcounts stored on disk, one per host cluster (int64)."""
        n = self.file_clusters if nb_clusters is None else nb_clusters
        rpb = self.rc_per_block
        out = np.zeros(max(n, len(self.reftable) * 0), np.int64)
        for i, ent in enumerate(self.reftable.tolist()):
            off = ent & REFT_OFFSET_MASK
            if not off or ent & REFT_RESERVED_MASK or off % self.cluster_size or off >= self.file_size:
                continue
            first = i * rpb
            if first >= n:
                break
            raw = self.store.pread_full(off, self.cluster_size)
            vals = decode_block(raw, self.header.refcount_bits).astype(np.int64)
            k = min(rpb, n - first)
            out[first:first + k] = vals[:k]
        return out

    # ----- mapping helpers -----
    def l2_words(self, l2) -> np.ndarray:
        return l2[:, 0] if l2.ndim == 2 else l2

    def data_refs(self, l2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(standard cluster indices, compressed first clusters, compressed last clusters) of one L2 table."""
        e = self.l2_words(l2)
        comp = (e & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
        off = e & np.uint64(L2E_OFFSET_MASK)
        std = off[~comp & (off != 0)] >> np.uint64(self.cluster_bits)
        ce = e[comp]
        coff = (ce & np.uint64(self.cluster_offset_mask)) & ~np.uint64(511)
        nsec = ((ce >> np.uint64(self.csize_shift)) & np.uint64(self.csize_mask)) + np.uint64(1)
        first = coff >> np.uint64(self.cluster_bits)
        last = (coff + nsec * np.uint64(512) - np.uint64(1)) >> np.uint64(self.cluster_bits)
        return std.astype(np.int64), first.astype(np.int64), last.astype(np.int64)

    def static_refs(self, bitmaps: bool = True) -> list[tuple[int, int]]:
        """Byte ranges referenced by the header's extensions (crypto header, bitmaps) besides cluster 0."""
        h = self.header
        out = []
        if h.crypto_header:
            out.append(h.crypto_header)
        if bitmaps and h.bitmaps_ext and h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
            _nb, dir_size, dir_off = h.bitmaps_ext
            out.append((dir_off, dir_size))
            for bm in read_bitmap_directory(self.store, h, self.file_size):
                out.append((bm.table_offset, bm.table_size * 8))
                check_limit("qcow2 bitmap table size", bm.table_size, MAX_L1_SIZE_BYTES)
                tab = self.read_table(bm.table_offset, bm.table_size) & np.uint64(L1E_OFFSET_MASK)
                out.extend((o, self.cluster_size) for o in tab[tab > 1].tolist())
        return out


# --------------------------------------------------------------------------------------------
# References of a whole image state, and the copy-on-write commit
# --------------------------------------------------------------------------------------------

class RefCollector:
    """Collects referenced cluster indices; counts them with one bincount."""

    def __init__(self, cluster_bits: int, limit: int | None = None):
        self.bits = cluster_bits
        self.parts: list[np.ndarray] = []
        # clusters at or past ``limit`` (the end of the file) cannot hold data: references to them are
        # corruption that check reports, and counting them would size the refcounts for a hostile offset
        self.limit = limit

    def add_range(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = offset >> self.bits
        last = (offset + length - 1) >> self.bits
        if self.limit is not None:
            last = min(last, self.limit - 1)
        if last >= first:
            self.parts.append(np.arange(first, last + 1, dtype=np.int64))

    def add_indices(self, idx: np.ndarray) -> None:
        if len(idx):
            idx = np.asarray(idx, np.int64)
            self.parts.append(idx if self.limit is None else idx[idx < self.limit])

    def add_spans(self, first: np.ndarray, last: np.ndarray) -> None:
        if self.limit is not None and len(first):
            keep = first < self.limit
            first, last = first[keep], np.minimum(last[keep], self.limit - 1)
        if not len(first):
            return
        self.parts.append(first)
        span = last - first
        k = 1
        while True:
            sel = span >= k
            if not sel.any():
                break
            self.parts.append(first[sel] + k)
            k += 1

    def counts(self, minlength: int = 0) -> np.ndarray:
        if not self.parts:
            return np.zeros(minlength, np.int64)
        allidx = np.concatenate(self.parts)
        return np.bincount(allidx, minlength=minlength).astype(np.int64)


@dataclass
class L1Plan:
    """An L1 table of the new image: entries (L2 offsets) plus L2 tables to write afresh."""

    entries: np.ndarray
    l2_new: dict = field(default_factory=dict)   # l1 index -> L2 array to write to a new cluster
    location: int | None = None                  # existing on-disk L1 offset to keep, or None: write anew


@dataclass
class Change:
    """The new image: header (copy), active L1 plan, snapshots (each with its plan), extra data ranges."""

    header: Header
    active: L1Plan
    snapshots: list
    snapshot_plans: list
    extra_refs: list = field(default_factory=list)    # (offset, length) of new data clusters
    zero_fill: list = field(default_factory=list)     # (offset, length) to zero before the switch
    truncate_file: bool = False
    bitmaps: list | None = None                       # bitmaps.BitmapPlan list: a new bitmap directory


def current_plan(meta: Qcow2Meta) -> Change:
    """A Change describing the image as it is (ops edit it, then commit)."""
    h = copy.deepcopy(meta.header)
    snaps = [copy.copy(s) for s in meta.snapshots]
    for s in snaps:
        err = s.l1_error(meta.cluster_size)
        if err:
            raise QimgError(err)  # (qemu-img: every rewrite of the snapshot table validates its tables)
    plans = [L1Plan(meta.read_table(s.l1_table_offset, s.l1_size) & np.uint64(L1E_OFFSET_MASK),
                    location=s.l1_table_offset) for s in snaps]
    active = L1Plan(meta.l1 & np.uint64(L1E_OFFSET_MASK))
    return Change(h, active, snaps, plans)


def _plan_refs(meta: Qcow2Meta, plan: L1Plan, rc: RefCollector, table_refs: bool = True) -> None:
    data_file = meta.header.has_data_file
    ents = plan.entries
    if plan.location is not None and table_refs:
        rc.add_range(plan.location, len(ents) * 8)
    for i in np.nonzero(ents)[0].tolist():
        if i in plan.l2_new:
            l2 = plan.l2_new[i]
        else:
            off = int(ents[i])
            if table_refs:
                rc.add_range(off, meta.cluster_size)
            l2 = meta.read_l2(off)
        std, cf, cl = meta.data_refs(l2)
        if not data_file:
            rc.add_indices(std)
        rc.add_spans(cf, cl)


def set_copied_flags(meta: Qcow2Meta, l2: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """L2 entries with OFLAG_COPIED set exactly where the data cluster's refcount is 1."""
    if meta.header.has_data_file:
        # external data file: no refcounts for data, and OFLAG_COPIED on an offset-0 entry is what
        # marks it allocated; the flags stay as they are
        return l2.copy()
    l2 = l2.copy()
    e = meta.l2_words(l2)
    comp = (e & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
    off = e & np.uint64(L2E_OFFSET_MASK)
    idx = (off >> np.uint64(meta.cluster_bits)).astype(np.int64)
    std = ~comp & (off != 0)
    one = np.zeros(len(e), bool)
    if meta.header.has_data_file:
        one[std] = True
    else:
        inrange = std & (idx < len(ref))
        one[inrange] = ref[idx[inrange]] == 1
    e &= ~np.uint64(QCOW_OFLAG_COPIED)
    e[one] |= np.uint64(QCOW_OFLAG_COPIED)
    if l2.ndim == 2:
        l2[:, 0] = e
    else:
        l2 = e
    return l2


class _Allocator:
    """First fit over clusters free in the old and the new image; grows past the end."""

    def __init__(self, used: np.ndarray):
        self.used = used.copy()

    def alloc(self, n: int) -> int:
        if n <= 0:
            return 0
        used = self.used
        free = ~used
        # first run of n free clusters (cluster 0 is never free)
        if n == 1:
            cand = np.nonzero(free)[0]
            start = int(cand[0]) if len(cand) else len(used)
        else:
            start = len(used)
            if free.any():
                f = np.concatenate(([0], free.astype(np.int8), [0]))
                d = np.diff(f)
                starts = np.nonzero(d == 1)[0]
                ends = np.nonzero(d == -1)[0]
                ok = np.nonzero(ends - starts >= n)[0]
                if len(ok):
                    start = int(starts[ok[0]])
            if start == len(used):
                # extend from the last used cluster
                tail = np.nonzero(used)[0]
                start = int(tail[-1]) + 1 if len(tail) else 1
        end = start + n
        if end > len(self.used):
            self.used = np.concatenate((self.used, np.zeros(end - len(self.used) + 64, bool)))
        self.used[start:end] = True
        return start


def commit(meta: Qcow2Meta, change: Change, old_refs: np.ndarray | None = None, flush: bool = True,
           progress=None) -> dict:
    """Write ``change`` copy-on-write and switch the header to it; returns the final refcounts info."""
    store = meta.store
    cs = meta.cluster_size
    bits = meta.cluster_bits
    h = change.header
    # 1. references of the new image, except the tables written afresh
    rc = RefCollector(bits, limit=-(-store.size() // cs))
    rc.add_range(0, cs)
    for off, length in meta.static_refs(bitmaps=change.bitmaps is None):
        rc.add_range(off, length)
    for bp in change.bitmaps or ():
        for i, e in enumerate(bp.table):
            if e & BME_OFFSET_MASK and i not in bp.fresh:
                rc.add_range(e & BME_OFFSET_MASK, cs)
    for off, length in change.extra_refs:
        rc.add_range(off, length)
    plans = [change.active] + list(change.snapshot_plans)
    for p in plans:
        _plan_refs(meta, p, rc)
    ref = rc.counts(meta.file_clusters)
    # 2. active L2 tables whose COPIED flags would be wrong are rewritten (copy-on-write)
    act = change.active
    for i in np.nonzero(act.entries)[0].tolist():
        if i in act.l2_new:
            continue
        off = int(act.entries[i])
        l2 = meta.read_l2(off)
        fixed = set_copied_flags(meta, l2, ref)
        if not np.array_equal(fixed, l2):
            act.l2_new[i] = fixed
            ref[off >> bits] -= 1
    for i in list(act.l2_new):
        act.l2_new[i] = set_copied_flags(meta, act.l2_new[i], ref)
    act.location = None
    # 3. clusters in use by the old image or the new one are off limits
    n = max(len(ref), meta.file_clusters)
    used = np.zeros(n + 1, bool)
    used[:len(ref)] |= ref > 0
    ondisk = meta.read_refcounts(meta.file_clusters)
    used[:len(ondisk)] |= ondisk > 0
    if old_refs is not None:
        k = min(len(old_refs), len(used))
        used[:k] |= old_refs[:k] > 0
        if len(old_refs) > len(used):
            used = np.concatenate((used, old_refs[len(used):] > 0))
    used[0] = True
    alloc = _Allocator(used)
    new_clusters: list[tuple[int, int]] = []   # (first cluster, count)

    def take(count):
        first = alloc.alloc(count)
        new_clusters.append((first, count))
        return first * cs

    l2_where = {}
    for pi, p in enumerate(plans):
        for i in sorted(p.l2_new):
            l2_where[(pi, i)] = take(1)
    l1_where = {}
    for pi, p in enumerate(plans):
        if p.location is None:
            l1_where[pi] = take(max(1, -(-len(p.entries) * 8 // cs))) if len(p.entries) else 0
    snap_bytes = b""
    # snapshot entries carry their L1 offsets: fill them before sizing the table
    for si, s in enumerate(change.snapshots):
        p = change.snapshot_plans[si]
        s.l1_table_offset = p.location if p.location is not None else l1_where[si + 1]
        s.l1_size = len(p.entries)
    for s in change.snapshots:
        if s.disk_size is None:
            s.disk_size = h.size
    # qemu writes the full extra data (vm_state_size_large, disk_size, icount) for every entry, v2 too
    snap_bytes = b"".join(s.pack(3) for s in change.snapshots)
    check_limit("qcow2 snapshot table size", len(snap_bytes), MAX_SNAPSHOT_TABLE_BYTES)
    snap_off = take(-(-len(snap_bytes) // cs)) if change.snapshots else 0
    if change.bitmaps is not None:
        _write_bitmaps(store, h, change.bitmaps, take, cs)
    # 4. the refcount structure, sized for everything above plus itself
    final = np.zeros(len(alloc.used), np.int64)
    final[:len(ref)] = ref
    for first, count in new_clusters:
        final = _grow(final, first + count)
        final[first:first + count] += 1
    rpb = cs * 8 // h.refcount_bits
    top = int(np.nonzero(final)[0][-1]) + 1
    slack = 0   # grows when the structure lands past what the blocks cover (clusters the old image still uses)
    while True:
        nblocks = -(-top // rpb)
        rt_clusters = max(1, -(-nblocks * 8 // cs))
        # room for growth caused by the structure itself
        nblocks_try = -(-(top + nblocks + rt_clusters + 2 + slack) // rpb)
        rt_clusters = max(1, -(-nblocks_try * 8 // cs))
        check_limit("qcow2 refcount table size", rt_clusters * cs, MAX_REFTABLE_SIZE_BYTES)
        saved = alloc.used.copy()
        rt_first = alloc.alloc(rt_clusters)
        blocks = [alloc.alloc(1) for _ in range(nblocks_try)]
        trial = _grow(final.copy(), max([rt_first + rt_clusters] + [b + 1 for b in blocks]))
        trial[rt_first:rt_first + rt_clusters] += 1
        for b in blocks:
            trial[b] += 1
        top2 = int(np.nonzero(trial)[0][-1]) + 1
        if -(-top2 // rpb) <= nblocks_try and nblocks_try * 8 <= rt_clusters * cs:
            final = trial
            break
        alloc.used = saved
        slack = max(slack + 1, top2 - top)
    maxrc = (1 << h.refcount_bits) - 1
    if int(final.max()) > maxrc:
        raise RefcountOverflow(f"Cannot update refcounts: a refcount exceeds the {h.refcount_bits}-bit limit")
    # 5. write everything that the new header points to, then flush
    for (pi, i), where in l2_where.items():
        arr = plans[pi].l2_new[i]
        store.pwrite(where, arr.reshape(-1).astype(">u8").tobytes())
        plans[pi].entries = plans[pi].entries.copy()
        plans[pi].entries[i] = where
    for pi, where in l1_where.items():
        p = plans[pi]
        ents = p.entries.copy()
        if pi == 0:
            l2idx = (ents >> np.uint64(bits)).astype(np.int64)
            nz = (ents != 0) & (l2idx < len(final))   # (an L2 table past the end of the file has no refcount)
            one = np.zeros(len(ents), bool)
            one[nz] = final[l2idx[nz]] == 1
            ents[one] |= np.uint64(QCOW_OFLAG_COPIED)
        if len(ents):
            nbytes = -(-len(ents) * 8 // cs) * cs
            store.pwrite(where, ents.astype(">u8").tobytes().ljust(nbytes, b"\0"))
    for off, length in change.zero_fill:
        _write_zeros(store, off, length)
    if change.snapshots:
        store.pwrite(snap_off, snap_bytes.ljust(-(-len(snap_bytes) // cs) * cs, b"\0"))
    reft = np.zeros(rt_clusters * cs // 8, np.uint64)
    for bi, b in enumerate(blocks):
        vals = final[bi * rpb:(bi + 1) * rpb]
        store.pwrite(b * cs, encode_block(vals, 1 << h.refcount_order, cs * 8 >> h.refcount_order))
        reft[bi] = b * cs
    store.pwrite(rt_first * cs, reft.astype(">u8").tobytes())
    if flush:
        store.flush()
    # 6. the switch
    h.l1_size = len(change.active.entries)
    h.l1_table_offset = l1_where[0] if h.l1_size else 0
    h.refcount_table_offset = rt_first * cs
    h.refcount_table_clusters = rt_clusters
    h.nb_snapshots = len(change.snapshots)
    h.snapshots_offset = snap_off
    h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY
    page = h.repack()
    store.pwrite(0, page)
    if flush:
        store.flush()
    image_end = int(np.nonzero(final)[0][-1] + 1) * cs
    if change.truncate_file and store.size() > image_end:
        store.truncate(image_end)
        if flush:
            store.flush()
    return {"refcounts": final, "image_end": image_end}


def _write_bitmaps(store, h: Header, plans: list, take, cs: int) -> None:
    """Fresh bitmap clusters, the tables and a new directory, to new clusters; the header is pointed
    at the directory (the switch itself is the caller's header write)."""
    for bp in plans:
        table = list(bp.table)
        for i in sorted(bp.fresh):
            data = bp.fresh[i]()
            if not data.strip(b"\0"):
                table[i] = 0      # an all-zero cluster needs no data cluster
                continue
            table[i] = take(1)
            store.pwrite(table[i], data.ljust(cs, b"\0"))
        n = len(table)
        bp.info.table_size = n
        bp.info.table_offset = take(max(1, -(-n * 8 // cs)))
        store.pwrite(bp.info.table_offset, struct.pack(f">{n}Q", *table).ljust(-(-max(n, 1) * 8 // cs) * cs, b"\0"))
    directory = pack_directory(plans)
    doff = take(-(-len(directory) // cs)) if plans else 0
    if plans:
        store.pwrite(doff, directory.ljust(-(-len(directory) // cs) * cs, b"\0"))
    set_extension(h, plans, doff, len(directory))


def _pread_zeros(store, offset: int, n: int) -> bytes:
    """``n`` bytes at ``offset``; past the end of the file they read as zeros (qemu's file driver)."""
    raw = store.pread(offset, n)
    return raw if len(raw) == n else bytes(raw) + bytes(n - len(raw))


def _grow(arr: np.ndarray, n: int) -> np.ndarray:
    if n <= len(arr):
        return arr
    return np.concatenate((arr, np.zeros(n - len(arr), arr.dtype)))


def _write_zeros(store, off: int, length: int) -> None:
    chunk = 1 << 20
    zero = bytes(min(chunk, length))
    pos = off
    while pos < off + length:
        n = min(chunk, off + length - pos)
        store.pwrite(pos, zero[:n])
        pos += n


def compute_refs(meta: Qcow2Meta) -> np.ndarray:
    """Reference counts of the image as it is (quietly; check.py reports the details)."""
    ch = current_plan(meta)
    rc = RefCollector(meta.cluster_bits, limit=meta.file_clusters)
    rc.add_range(0, meta.cluster_size)
    for off, length in meta.static_refs():
        rc.add_range(off, length)
    h = meta.header
    _plan_refs(meta, L1Plan(ch.active.entries, location=h.l1_table_offset if h.l1_size else None), rc)
    for p in ch.snapshot_plans:
        _plan_refs(meta, p, rc)
    if h.nb_snapshots:
        rc.add_range(h.snapshots_offset, meta.snapshot_table_bytes)
    rc.add_range(h.refcount_table_offset, h.refcount_table_clusters * meta.cluster_size)
    for ent in meta.reftable.tolist():
        off = ent & REFT_OFFSET_MASK
        if off:
            rc.add_range(off, meta.cluster_size)
    return rc.counts(meta.file_clusters)


def write_header_only(meta: Qcow2Meta, header: Header, flush: bool = True) -> None:
    """Switch header fields that need no new clusters (backing file, feature bits) in one page write."""
    if flush:
        meta.store.flush()
    meta.store.pwrite(0, header.repack())
    if flush:
        meta.store.flush()
