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
from array import array
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import add, and_, eq, mul, not_, or_, rshift

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
from .lifecycle_refs import (
    NOT_COMPRESSED_BYTES,
    RefCollector,
    copied_lookup,
    last_used,
    masked,
    nonzero,
    set_copied_flags,
    top_bytes,
)
from .refcount import REFT_OFFSET_MASK, decode_block, encode_block
from .snapshot import read_snapshots
from .tables import (
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    be_bytes,
    be_u64_array,
)

__all__ = ["RefCollector", "copied_lookup", "last_used", "masked", "nonzero", "set_copied_flags"]

REFT_RESERVED_MASK = 0x1FF
HEADER_PAGE = 4096
L2_CACHE_BYTES = 64 << 20
# Tables are plain ``array('Q')`` (native integers; an extended L2 table interleaves each entry with
# its subcluster bitmap), reference counts are lists of ints.  Whole tables are handled with C-level
# operations (``map`` over ``operator`` functions, ``itertools.compress``, ``Counter``, slices), so the
# Python work grows with the number of tables, not of entries.


class RefcountOverflow(QimgError):
    """A reference count would not fit in refcount_bits."""


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
        self._l2_cache: dict[int, array] = {}
        # the whole tables are read on first use (header-only changes never need them; their sizes are
        # bounded by the header's limits); what lies past the end of the file reads as zeros, as in qemu,
        # and check counts it
        self._l1 = self._reftable = None
        self.snapshots = read_snapshots(store, h.snapshots_offset, h.nb_snapshots, cs, self.file_size)
        self.snapshot_table_bytes = sum(s.entry_size for s in self.snapshots)

    @property
    def l1(self) -> array:
        if self._l1 is None:
            h = self.header
            self._l1 = self.read_table(h.l1_table_offset, h.l1_size)
        return self._l1

    @property
    def reftable(self) -> array:
        if self._reftable is None:
            h = self.header
            n = h.refcount_table_clusters * self.cluster_size // 8
            self._reftable = self.read_table(h.refcount_table_offset, n)
        return self._reftable

    # ----- reading -----
    def read_table(self, offset: int, entries: int) -> array:
        if entries == 0:
            return array("Q")
        return be_u64_array(_pread_zeros(self.store, offset, entries * 8))

    def read_l2(self, offset: int) -> array:
        """An L2 table as ``array('Q')`` (entry and subcluster bitmap interleaved for extended L2).
        Shared with the cache: copy it before changing it."""
        arr = self._l2_cache.get(offset)
        if arr is None:
            arr = be_u64_array(_pread_zeros(self.store, offset, self.cluster_size))
            if len(self._l2_cache) * self.cluster_size >= L2_CACHE_BYTES:
                self._l2_cache.clear()   # bounded memory on huge images; tables are re-read when needed
            self._l2_cache[offset] = arr
        return arr

    def read_refcounts(self, nb_clusters: int | None = None) -> list:
        """The refcounts stored on disk, one per host cluster."""
        n = self.file_clusters if nb_clusters is None else nb_clusters
        rpb = self.rc_per_block
        out = [0] * n
        for i, ent in enumerate(self.reftable):
            off = ent & REFT_OFFSET_MASK
            if not off or ent & REFT_RESERVED_MASK or off % self.cluster_size or off >= self.file_size:
                continue
            first = i * rpb
            if first >= n:
                break
            vals = decode_block(self.store.pread_full(off, self.cluster_size), self.header.refcount_bits)
            k = min(rpb, n - first)
            out[first:first + k] = vals[:k]
        return out

    # ----- mapping helpers -----
    def l2_words(self, l2) -> array:
        """The entries of an L2 table (without the subcluster bitmaps)."""
        return l2[0::2] if self.l2_entry_words == 2 else l2

    def data_refs(self, l2) -> tuple[list, list, list]:
        """(standard cluster indices, compressed first clusters, compressed last clusters) of one L2 table."""
        e = self.l2_words(l2)
        if not any(e):
            return [], [], []
        bits = self.cluster_bits
        if not top_bytes(e).translate(None, NOT_COMPRESSED_BYTES):
            std = filter(None, map(and_, e, repeat(L2E_OFFSET_MASK)))
            return list(map(rshift, std, repeat(bits))), [], []
        comp = list(map(and_, e, repeat(QCOW_OFLAG_COMPRESSED)))
        std = filter(None, map(and_, compress(e, map(not_, comp)), repeat(L2E_OFFSET_MASK)))
        ce = list(compress(e, comp))
        coff = list(map(and_, ce, repeat(self.cluster_offset_mask & ~511)))
        nsec = map(and_, map(rshift, ce, repeat(self.csize_shift)), repeat(self.csize_mask))
        # last byte: coff + (nsec + 1) * 512 - 1
        end = map(add, map(add, coff, map(mul, nsec, repeat(512))), repeat(511))
        return (list(map(rshift, std, repeat(bits))), list(map(rshift, coff, repeat(bits))),
                list(map(rshift, end, repeat(bits))))

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
                tab = masked(self.read_table(bm.table_offset, bm.table_size))
                out.extend(zip(filter((1).__lt__, tab), repeat(self.cluster_size)))
        return out


# --------------------------------------------------------------------------------------------
# References of a whole image state, and the copy-on-write commit
# --------------------------------------------------------------------------------------------

@dataclass
class L1Plan:
    """An L1 table of the new image: entries (L2 offsets) plus L2 tables to write afresh."""

    entries: array
    l2_new: dict = field(default_factory=dict)   # l1 index -> L2 array('Q') to write to a new cluster
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
    plans = [L1Plan(masked(meta.read_table(s.l1_table_offset, s.l1_size)), location=s.l1_table_offset)
             for s in snaps]
    active = L1Plan(masked(meta.l1))
    return Change(h, active, snaps, plans)


def _plan_refs(meta: Qcow2Meta, plan: L1Plan, rc: RefCollector, tables: dict) -> None:
    """References of one L1 plan: its table and the L2 tables written afresh go to ``rc``, the L2
    tables on disk to ``tables`` (offset -> number of references; see _table_refs)."""
    ents = plan.entries
    if plan.location is not None:
        rc.add_range(plan.location, len(ents) * 8)
    for i in nonzero(ents):
        if i in plan.l2_new:
            _l2_refs(meta, plan.l2_new[i], rc, 1)
        else:
            tables[ents[i]] = tables.get(ents[i], 0) + 1


def _table_refs(meta: Qcow2Meta, tables: dict, rc: RefCollector) -> None:
    """The L2 tables on disk and their data clusters, each table read once however many L1 tables
    (the active one, snapshots) share it."""
    for off, weight in tables.items():
        for _ in range(weight):
            rc.add_range(off, meta.cluster_size)
        _l2_refs(meta, meta.read_l2(off), rc, weight)


def _l2_refs(meta: Qcow2Meta, l2, rc: RefCollector, weight: int) -> None:
    std, cf, cl = meta.data_refs(l2)
    if not meta.header.has_data_file:
        rc.add_indices(std, weight)
    for _ in range(weight):
        rc.add_spans(cf, cl)


class _Allocator:
    """First fit over clusters free in the old and the new image; grows past the end."""

    def __init__(self, used: bytearray):
        self.used = bytearray(used)   # one byte per cluster: 1 in use

    def alloc(self, n: int) -> int:
        if n <= 0:
            return 0
        used = self.used
        # first run of n free clusters (cluster 0 is never free)
        start = used.find(bytes(n))
        if start < 0:
            # extend from the last used cluster
            start = len(used.rstrip(b"\0")) or 1
        end = start + n
        if end > len(used):
            used.extend(bytes(end - len(used) + 64))
        used[start:end] = b"\1" * n
        return start


def _flags(vals) -> bytearray:
    """One byte per value: 1 where it is non-zero."""
    return bytearray(map(bool, vals))


def _or_into(dst: bytearray, src: bytearray) -> None:
    """dst[:len(src)] |= src (growing dst), on whole byte strings."""
    if len(src) > len(dst):
        dst.extend(bytes(len(src) - len(dst)))
    k = len(src)
    dst[:k] = (int.from_bytes(dst[:k], "little") | int.from_bytes(src, "little")).to_bytes(k, "little")


def _add_one(vals: list, first: int, count: int) -> None:
    """vals[first:first + count] += 1 (growing vals)."""
    if first + count > len(vals):
        vals.extend([0] * (first + count - len(vals)))
    vals[first:first + count] = map(add, vals[first:first + count], repeat(1))


def commit(meta: Qcow2Meta, change: Change, old_refs=None, flush: bool = True, progress=None) -> dict:
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
    tables: dict = {}
    for p in plans:
        _plan_refs(meta, p, rc, tables)
    _table_refs(meta, tables, rc)
    ref = rc.counts(meta.file_clusters)
    # 2. active L2 tables whose COPIED flags would be wrong are rewritten (copy-on-write)
    act = change.active
    look = copied_lookup(ref)
    for i in nonzero(act.entries):
        if i in act.l2_new:
            continue
        off = act.entries[i]
        l2 = meta.read_l2(off)
        fixed = set_copied_flags(meta, l2, look)
        if fixed is not l2:
            act.l2_new[i] = fixed
            c = off >> bits
            ref[c] -= 1
            if 0 < c < len(look) - 1:
                look[c] -= 1
    for i in list(act.l2_new):
        act.l2_new[i] = array("Q", set_copied_flags(meta, act.l2_new[i], look))
    act.location = None
    # 3. clusters in use by the old image or the new one are off limits
    used = bytearray(max(len(ref), meta.file_clusters) + 1)
    _or_into(used, _flags(ref))
    _or_into(used, _flags(meta.read_refcounts(meta.file_clusters)))
    if old_refs is not None:
        _or_into(used, _flags(old_refs.tolist() if hasattr(old_refs, "tolist") else old_refs))
    used[0] = 1
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
    final = list(ref)
    for first, count in new_clusters:
        _add_one(final, first, count)
    rpb = cs * 8 // h.refcount_bits
    top = last_used(final)
    slack = 0   # grows when the structure lands past what the blocks cover (clusters the old image still uses)
    while True:
        nblocks = -(-top // rpb)
        rt_clusters = max(1, -(-nblocks * 8 // cs))
        # room for growth caused by the structure itself
        nblocks_try = -(-(top + nblocks + rt_clusters + 2 + slack) // rpb)
        rt_clusters = max(1, -(-nblocks_try * 8 // cs))
        check_limit("qcow2 refcount table size", rt_clusters * cs, MAX_REFTABLE_SIZE_BYTES)
        saved = bytearray(alloc.used)
        rt_first = alloc.alloc(rt_clusters)
        blocks = [alloc.alloc(1) for _ in range(nblocks_try)]
        trial = list(final)
        _add_one(trial, rt_first, rt_clusters)
        for b in blocks:
            _add_one(trial, b, 1)
        top2 = last_used(trial)
        if -(-top2 // rpb) <= nblocks_try and nblocks_try * 8 <= rt_clusters * cs:
            final = trial
            break
        alloc.used = saved
        slack = max(slack + 1, top2 - top)
    maxrc = (1 << h.refcount_bits) - 1
    if max(final) > maxrc:
        raise RefcountOverflow(f"Cannot update refcounts: a refcount exceeds the {h.refcount_bits}-bit limit")
    # 5. write everything that the new header points to, then flush
    for (pi, i), where in l2_where.items():
        store.pwrite(where, be_bytes(plans[pi].l2_new[i]))
        plans[pi].entries = array("Q", plans[pi].entries)
        plans[pi].entries[i] = where
    for pi, where in l1_where.items():
        p = plans[pi]
        ents = p.entries
        if pi == 0:
            # OFLAG_COPIED on the L2 tables with a refcount of 1 (one past the end of the file has none)
            look = final + [0]
            idx = map(min, map(rshift, ents, repeat(bits)), repeat(len(final)))
            one = map(mul, map(bool, ents), map(eq, map(look.__getitem__, idx), repeat(1)))
            ents = array("Q", map(or_, ents, map(mul, one, repeat(QCOW_OFLAG_COPIED))))
        if len(ents):
            nbytes = -(-len(ents) * 8 // cs) * cs
            store.pwrite(where, be_bytes(ents).ljust(nbytes, b"\0"))
    for off, length in change.zero_fill:
        _write_zeros(store, off, length)
    if change.snapshots:
        store.pwrite(snap_off, snap_bytes.ljust(-(-len(snap_bytes) // cs) * cs, b"\0"))
    reft = array("Q", bytes(rt_clusters * cs))
    for bi, b in enumerate(blocks):
        store.pwrite(b * cs, encode_block(final[bi * rpb:(bi + 1) * rpb], 1 << h.refcount_order,
                                          cs * 8 >> h.refcount_order))
        reft[bi] = b * cs
    store.pwrite(rt_first * cs, be_bytes(reft))
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
    image_end = last_used(final) * cs
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


def _write_zeros(store, off: int, length: int) -> None:
    chunk = 1 << 20
    zero = bytes(min(chunk, length))
    pos = off
    while pos < off + length:
        n = min(chunk, off + length - pos)
        store.pwrite(pos, zero[:n])
        pos += n


def compute_refs(meta: Qcow2Meta) -> list:
    """Reference counts of the image as it is (quietly; check.py reports the details)."""
    ch = current_plan(meta)
    rc = RefCollector(meta.cluster_bits, limit=meta.file_clusters)
    rc.add_range(0, meta.cluster_size)
    for off, length in meta.static_refs():
        rc.add_range(off, length)
    h = meta.header
    tables: dict = {}
    _plan_refs(meta, L1Plan(ch.active.entries, location=h.l1_table_offset if h.l1_size else None), rc, tables)
    for p in ch.snapshot_plans:
        _plan_refs(meta, p, rc, tables)
    _table_refs(meta, tables, rc)
    if h.nb_snapshots:
        rc.add_range(h.snapshots_offset, meta.snapshot_table_bytes)
    rc.add_range(h.refcount_table_offset, h.refcount_table_clusters * meta.cluster_size)
    for off in filter(None, map(and_, meta.reftable, repeat(REFT_OFFSET_MASK))):
        rc.add_range(off, meta.cluster_size)
    return rc.counts(meta.file_clusters)


def write_header_only(meta: Qcow2Meta, header: Header, flush: bool = True) -> None:
    """Switch header fields that need no new clusters (backing file, feature bits) in one page write."""
    if flush:
        meta.store.flush()
    meta.store.pwrite(0, header.repack())
    if flush:
        meta.store.flush()
