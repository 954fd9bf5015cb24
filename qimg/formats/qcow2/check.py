"""qcow2 consistency check and repair.

References:
  qcow2 specification (qemu docs/interop/qcow2.txt): "Host cluster management", "Cluster mapping",
  "Snapshots".  The counting rules, the per-cluster messages and the summary follow what qemu-img 7.2
  prints for the same images (observed, not ported).

The walk recomputes every cluster's reference count from the header, the active and the snapshot
L1/L2 tables, the snapshot table, the refcount table and blocks, the crypto header and the bitmaps,
and compares it with the stored refcounts.  Repair rebuilds the whole refcount structure (and fixes
OFLAG_COPIED) copy-on-write through ``lifecycle.commit``, so a repair that is killed half-way leaves
the image as it was.
"""

from __future__ import annotations

import struct

from ...core.check import CheckResult
from ...errors import QimgError
from . import lifecycle as lc
from .header import MAX_L1_SIZE_BYTES, QCOW2_INCOMPAT_CORRUPT, QCOW2_INCOMPAT_DIRTY, Header
from .refcount import decode_block, encode_block
from .tables import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_L2_BITMAP_ALL_ALLOC,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    LazyNumpy,
)

np = LazyNumpy(globals())

#: where the incompatible feature bits lie in a version 3 header (qcow2.txt, "Header")
INCOMPAT_FEATURES_OFFSET = 72


def _np_l2(meta, offset: int):
    """An L2 table as uint64 entries ((n, 2) with the subcluster bitmaps for extended L2); the
    lifecycle reads it as ``array('Q')``, the walk works on numpy."""
    l2 = np.frombuffer(meta.read_l2(offset), np.uint64)
    return l2.reshape(-1, 2) if meta.l2_entry_words == 2 else l2


def _words(l2):
    return l2[:, 0] if l2.ndim == 2 else l2


def _grow(arr, n: int):
    if n <= len(arr):
        return arr
    return np.concatenate((arr, np.zeros(n - len(arr), arr.dtype)))


class _Walk:
    """One pass over the metadata: reference counts, statistics and diagnostics."""

    def __init__(self, meta: lc.Qcow2Meta, res: CheckResult, fix_errors: bool, emit):
        self.meta = meta
        self.res = res
        self.fix_errors = fix_errors
        self.emit = emit
        self.rc = lc.RefCollector(meta.cluster_bits)
        self.file_len = meta.file_size
        self.rebuild = False
        self.bad_l2 = {}    # (l1 offset, index) problems that repair cannot touch

    def inc(self, offset: int, size: int) -> bool:
        if size <= 0:
            return True
        cs = self.meta.cluster_size
        # a reference must not reach a cluster or more past the end of the file
        if offset + size > self.file_len and offset + size - self.file_len >= cs and \
                ((offset + size - 1) >> self.meta.cluster_bits) >= self.meta.file_clusters:
            self.emit("ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                      f"offset 0x{offset:x} size 0x{size:x}")
            self.res.corruptions += 1
            return False
        self.rc.add_range(offset, size)
        return True

    def l1(self, offset: int, size: int, active: bool) -> None:
        meta = self.meta
        cs = meta.cluster_size
        if not self.inc(offset, size * 8):
            return
        ents = meta.read_table(offset, size)
        for i, ent in enumerate(ents.tolist()):
            if not ent:
                continue
            l2_off = ent & L1E_OFFSET_MASK
            if not l2_off:
                continue
            if l2_off % cs:
                self.emit(f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted")
                self.res.corruptions += 1
                continue
            if not self.inc(l2_off, cs):
                continue
            self.l2(l2_off, active)

    def l2(self, offset: int, active: bool) -> None:
        meta = self.meta
        res = self.res
        cs = meta.cluster_size
        l2 = _np_l2(meta, offset)
        e = _words(l2)
        bitmap = l2[:, 1] if l2.ndim == 2 else None
        comp = (e & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
        off = e & np.uint64(L2E_OFFSET_MASK)
        data_file = meta.header.has_data_file
        # compressed clusters
        if comp.any():
            ce = e[comp]
            bad = (ce & np.uint64(QCOW_OFLAG_COPIED)) != 0
            for v in ce[bad].tolist():
                self.emit(f"ERROR: coffset=0x{v & meta.cluster_offset_mask:x}: copied flag must never be set "
                          "for compressed clusters")
                res.corruptions += 1
            if data_file:
                for _ in range(int(comp.sum())):
                    self.emit("ERROR compressed cluster with data file")
                    res.corruptions += 1
            coff = (ce & np.uint64(meta.cluster_offset_mask)) & ~np.uint64(511)
            nsec = ((ce >> np.uint64(meta.csize_shift)) & np.uint64(meta.csize_mask)) + np.uint64(1)
            for o, s in zip(coff.tolist(), (nsec * np.uint64(512)).tolist()):
                self.inc(o, s)
            if active:
                n = int(comp.sum())
                res.allocated_clusters += n
                res.compressed_clusters += n
                res.fragmented_clusters += n
        std = ~comp & (off != 0)
        if data_file:
            # offset 0 is a valid host offset in an external data file: OFLAG_COPIED tells it apart
            std |= ~comp & (off == 0) & ((e & np.uint64(QCOW_OFLAG_COPIED)) != 0) & \
                ((e & np.uint64(QCOW_OFLAG_ZERO)) == 0)
        if bitmap is not None:
            corrupt_bm = std & (((bitmap >> np.uint64(32)) & bitmap) != 0)
            for o in off[corrupt_bm].tolist():
                self.emit(f"ERROR offset={o:x}: Allocated cluster has corrupted subcluster allocation bitmap")
                res.corruptions += 1
            unalloc_bm = ~comp & (off == 0) & ((bitmap & np.uint64(QCOW_L2_BITMAP_ALL_ALLOC)) != 0)
            for _ in range(int(unalloc_bm.sum())):
                self.emit("ERROR: Unallocated cluster has non-zero subcluster allocation bitmap")
                res.corruptions += 1
        if not std.any():
            return
        offs = off[std]
        unaligned = (offs & np.uint64(cs - 1)) != 0
        if unaligned.any():
            zero = (e[std] & np.uint64(QCOW_OFLAG_ZERO)) != 0 if bitmap is None else \
                (bitmap[std] & np.uint64(QCOW_L2_BITMAP_ALL_ALLOC)) == 0
            for o, z in zip(offs[unaligned].tolist(), zero[unaligned].tolist()):
                res.corruptions += 1
                if z:
                    self.emit(f"ERROR offset={o:x}: Preallocated cluster is not properly aligned; "
                              "L2 entry corrupted.")
                else:
                    self.emit(f"ERROR offset={o:x}: Data cluster is not properly aligned; L2 entry corrupted.")
        if active:
            res.allocated_clusters += len(offs)
            if len(offs) > 1:
                res.fragmented_clusters += int((offs[1:] != offs[:-1] + np.uint64(cs)).sum())
        if data_file:
            return
        idx = (offs >> np.uint64(meta.cluster_bits)).astype(np.int64)
        past = idx >= meta.file_clusters
        for o in offs[past].tolist():
            self.emit("ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                      f"offset 0x{o:x} size 0x{cs:x}")
            res.corruptions += 1
        # a cluster-sized region at an unaligned offset reaches into the next cluster: qemu counts both
        straddle = idx[~past & unaligned] + 1
        self.rc.add_indices(np.concatenate((idx[~past], straddle)) if len(straddle) else idx[~past])


def run_check(store, repair: str | None = None, emit=None) -> CheckResult:
    """Check (and with repair='leaks'/'all' repair) the qcow2 image in ``store``."""
    messages: list[str] = []
    if emit is None:
        emit = messages.append
    res = _run_check(store, repair, emit, messages)
    res.messages = messages
    return res


def _run_check(store, repair, emit, messages) -> CheckResult:
    res = _check_and_repair(store, repair, emit, messages)
    if repair and not res.corruptions and not res.check_errors:
        _mark_consistent(store)
    return res


def _mark_consistent(store) -> None:
    """After a repair that leaves no corruption, clear the dirty and corrupt bits, as qemu does."""
    h = Header.parse(store)
    bits = h.incompatible_features & (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT)
    if h.version >= 3 and bits:
        store.flush()
        store.pwrite(INCOMPAT_FEATURES_OFFSET, struct.pack(">Q", h.incompatible_features & ~bits))
        store.flush()


def _check_and_repair(store, repair, emit, messages) -> CheckResult:
    fix_leaks = repair in ("leaks", "all")
    fix_errors = repair == "all"
    meta = lc.Qcow2Meta(store)
    if not repair:
        from .check_quick import quick_check

        quick = quick_check(meta)  # a consistent image is verified without numpy
        if quick is not None:
            return quick
    res, state = _check_once(meta, fix_errors, emit, fix_leaks)
    if not repair or (res.leaks == 0 and res.corruptions == 0):
        return res
    if not store.writable:
        raise QimgError("Cannot repair an image opened read-only")
    if state["rebuild"] and not fix_errors:
        emit("ERROR need to rebuild refcount structures")
        # the diagnostics go out before the error that ends the command
        raise QimgError("Check failed: Input/output error", diagnostics=messages)
    leaks_fixed = res.leaks if fix_leaks else 0
    corr_fixed = state["copied_fixable"]
    if fix_errors:
        corr_fixed += state["fixable_corruptions"]
    if state["rebuild"]:
        emit("Rebuilding refcount structure")
        corr_fixed = res.corruptions
        old_structure = _refcount_structure_clusters(meta)
        _repair(meta, state, fix_leaks, fix_errors)
        for c in old_structure:
            emit(f"Repairing cluster {c} refcount=1 reference=0")
    else:
        if leaks_fixed == 0 and corr_fixed == 0:
            return res
        _repair_in_place(meta, state, fix_leaks, fix_errors, emit)
    for m in state["deferred"]:
        emit(m)
    # "Double checking the fixed image now": what that pass finds is reported too, as by qemu-img
    meta2 = lc.Qcow2Meta(store)
    res2, _ = _check_once(meta2, False, emit)
    res2.leaks_fixed = leaks_fixed
    res2.corruptions_fixed = corr_fixed
    return res2


def _repair_in_place(meta, state, fix_leaks, fix_errors, emit) -> None:
    """Fix refcount entries and OFLAG_COPIED where they are: each write only lowers a leak or raises a
    too-low refcount, so a repair cut short leaves an image no worse than before."""
    ondisk, computed = state["ondisk"], state["computed"]
    new = ondisk.copy()
    if fix_leaks:
        leak = np.nonzero(ondisk > computed)[0]
        for i in leak.tolist():
            emit(f"Repairing cluster {i} refcount={int(ondisk[i])} reference={int(computed[i])}")
        new[leak] = computed[leak]
    if fix_errors:
        low = np.nonzero((ondisk < computed) & (ondisk > 0))[0]
        new[low] = computed[low]
    store = meta.store
    cs = meta.cluster_size
    rpb = meta.rc_per_block
    changed = np.nonzero(new != ondisk)[0]
    for blk in sorted(set((changed // rpb).tolist())):
        ent = int(meta.reftable[blk])
        off = ent & lc.REFT_OFFSET_MASK
        vals = np.array(decode_block(store.pread_full(off, cs), meta.header.refcount_bits), np.int64)
        lo = blk * rpb
        hi = min(lo + rpb, len(new))
        vals[:hi - lo] = new[lo:hi]
        store.pwrite(off, encode_block(vals, meta.header.refcount_bits, rpb))
    store.flush()
    # OFLAG_COPIED from the repaired refcounts, entry by entry
    look = lc.copied_lookup(new)
    bits = meta.cluster_bits
    for i, ent in enumerate(meta.l1.tolist()):
        l2_off = ent & L1E_OFFSET_MASK
        if not l2_off or l2_off % cs:
            continue
        c = l2_off >> bits
        r = int(new[c]) if c < len(new) else 0
        want = (ent & ~QCOW_OFLAG_COPIED) | (QCOW_OFLAG_COPIED if r == 1 else 0)
        if want != ent:
            store.pwrite(meta.header.l1_table_offset + 8 * i, want.to_bytes(8, "big"))
        if c >= meta.file_clusters:
            continue
        l2 = meta.read_l2(l2_off)
        fixed = lc.set_copied_flags(meta, l2, look)
        e_old, e_new = np.frombuffer(meta.l2_words(l2), np.uint64), np.frombuffer(meta.l2_words(fixed), np.uint64)
        for j in np.nonzero(e_old != e_new)[0].tolist():
            store.pwrite(l2_off + j * 8 * meta.l2_entry_words, int(e_new[j]).to_bytes(8, "big"))
    store.flush()


def _refcount_structure_clusters(meta) -> list[int]:
    h = meta.header
    out = set(range(h.refcount_table_offset >> meta.cluster_bits,
                    (h.refcount_table_offset >> meta.cluster_bits) + h.refcount_table_clusters))
    for ent in meta.reftable.tolist():
        off = ent & lc.REFT_OFFSET_MASK
        if off and not ent & lc.REFT_RESERVED_MASK and not off % meta.cluster_size and off < meta.file_size:
            out.add(off >> meta.cluster_bits)
    return sorted(out)


def _check_once(meta: lc.Qcow2Meta, fix_errors: bool, emit, fix_leaks: bool = False):
    res = CheckResult()
    h = meta.header
    cs = meta.cluster_size
    walk = _Walk(meta, res, fix_errors, emit)
    res.total_clusters = -(-h.size // cs)
    walk.inc(0, cs)
    walk.l1(h.l1_table_offset, h.l1_size, True)
    for s in meta.snapshots:
        if s.l1_table_offset % cs:
            emit(f"ERROR snapshot {s.id_str} ({s.name}) l1_offset=0x{s.l1_table_offset:x}: L1 table is not cluster "
                 "aligned; snapshot table entry corrupted")
            res.corruptions += 1
            continue
        if s.l1_size > MAX_L1_SIZE_BYTES // 8:
            emit(f"ERROR snapshot {s.id_str} ({s.name}) l1_size=0x{s.l1_size:x}: L1 table is too large; snapshot "
                 "table entry corrupted")
            res.corruptions += 1
            continue
        walk.l1(s.l1_table_offset, s.l1_size, False)
    if h.nb_snapshots:
        walk.inc(h.snapshots_offset, meta.snapshot_table_bytes)
    walk.inc(h.refcount_table_offset, h.refcount_table_clusters * cs)
    for off, length in meta.static_refs():
        walk.inc(off, length)
    # refcount blocks
    nb = meta.file_clusters
    rpb = meta.rc_per_block
    rebuild = False
    block_clusters = []
    unreadable = []
    for i, ent in enumerate(meta.reftable.tolist()):
        off = ent & lc.REFT_OFFSET_MASK
        if ent & lc.REFT_RESERVED_MASK:
            emit(f"ERROR refcount table entry {i} has reserved bits set")
            res.corruptions += 1
            rebuild = True
            unreadable.append((i, ent))
            continue
        if off % cs:
            emit(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
            res.corruptions += 1
            rebuild = True
            unreadable.append((i, ent))
            continue
        if off and (off >> meta.cluster_bits) >= nb:
            emit(f"ERROR refcount block {i} is outside image")
            res.corruptions += 1
            rebuild = True  # (its refcounts read as zeros, past the end of the file)
            continue
        if off:
            walk.inc(off, cs)
            block_clusters.append((i, off >> meta.cluster_bits))
    computed = np.array(walk.rc.counts(nb), np.int64)
    for i, c in block_clusters:
        if computed[c] != 1:
            emit(f"ERROR refcount block {i} refcount={computed[c]}")
            res.corruptions += 1
            rebuild = True
    ondisk = np.array(meta.read_refcounts(max(nb, len(computed))), np.int64)
    n = max(len(ondisk), len(computed))
    ondisk = _grow(ondisk, n)
    computed = _grow(computed, n)
    comparable = np.ones(n, bool)
    for k, (i, ent) in enumerate(unreadable):
        if k == 0:
            idx = "0" if i == 0 else f"0x{i:x}"
            emit(f"qcow2: Image is corrupt: Refblock offset 0x{ent & lc.REFT_OFFSET_MASK:x} "
                 f"unaligned (reftable index: {idx}); further non-fatal corruption events will be suppressed")
        lo, hi = i * rpb, min(n, (i + 1) * rpb)
        if lo < hi:
            comparable[lo:hi] = False
            for c in range(lo, min(hi, max(nb, 0))):
                emit(f"Can't get refcount for cluster {c}: Input/output error")
                res.check_errors += 1
    diff = np.nonzero((ondisk != computed) & comparable)[0]
    fixable = 0
    # like qemu, OFLAG_COPIED is judged by the refcounts as this pass leaves them (repaired ones included)
    after = ondisk
    for i in diff.tolist():
        r1, r2 = int(ondisk[i]), int(computed[i])
        if r1 == 0 and r2 > 0:
            rebuild = True
            emit(f"ERROR cluster {i} refcount={r1} reference={r2}")
            res.corruptions += 1
            fixable += 1
        elif r1 < r2:
            emit(f"{'Repairing' if fix_errors else 'ERROR'} cluster {i} refcount={r1} reference={r2}")
            res.corruptions += 1
            fixable += 1
            if fix_errors:
                after = after.copy() if after is ondisk else after
                after[i] = r2
        else:
            emit(f"Leaked cluster {i} refcount={r1} reference={r2}")
            res.leaks += 1
            if fix_leaks:
                after = after.copy() if after is ondisk else after
                after[i] = r2
    nz = np.nonzero(((ondisk > 0) | (computed > 0)) & comparable)[0] if n else []
    res.image_end_offset = (int(nz[-1]) + 1) * cs if len(nz) else cs
    copied_fixable = 0
    deferred: list[str] = []
    if rebuild and (fix_errors or fix_leaks):
        pass  # qemu rebuilds (or gives up) before looking at OFLAG_COPIED
    elif not res.check_errors:
        # (when repairing, qemu reports these after the refcount repairs: held back until then)
        copied_emit = deferred.append if (fix_leaks or fix_errors) else emit
        copied_fixable = _check_copied(meta, after, res, fix_leaks or fix_errors, copied_emit)
    state = {"computed": computed, "ondisk": ondisk, "rebuild": rebuild, "fixable_corruptions": fixable,
             "copied_fixable": copied_fixable, "deferred": deferred}
    return res, state


def _refcount_of(meta, cluster: int) -> int:
    """The on-disk refcount of one cluster past what the pass read (0 without a refcount block for it)."""
    i = cluster // meta.rc_per_block
    if i >= len(meta.reftable):
        return 0
    off = int(meta.reftable[i]) & lc.REFT_OFFSET_MASK
    if not off or off % meta.cluster_size or off >= meta.file_size:
        return 0
    vals = decode_block(meta.store.pread_full(off, meta.cluster_size), meta.header.refcount_bits)
    return int(vals[cluster % meta.rc_per_block])


def _check_copied(meta, ondisk, res, fix_errors, emit) -> int:
    bits = meta.cluster_bits
    fixable = 0
    word = "Repairing" if fix_errors else "ERROR"
    for i, ent in enumerate(meta.l1.tolist()):
        l2_off = ent & L1E_OFFSET_MASK
        if not l2_off or l2_off % meta.cluster_size:
            continue
        c = l2_off >> bits
        r = int(ondisk[c]) if c < len(ondisk) else _refcount_of(meta, c)
        if (r == 1) != bool(ent & QCOW_OFLAG_COPIED):
            emit(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={ent:x} refcount={r}")
            res.corruptions += 1
            fixable += 1
        if c >= meta.file_clusters:
            continue
        e = _words(_np_l2(meta, l2_off))
        comp = (e & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
        off = e & np.uint64(L2E_OFFSET_MASK)
        std = ~comp & (off != 0)
        if meta.header.has_data_file or not std.any():
            continue
        idx = (off >> np.uint64(bits)).astype(np.int64)
        refs = np.zeros(len(e), np.int64)
        ok = std & (idx < len(ondisk))
        refs[ok] = ondisk[idx[ok]]
        for k in np.nonzero(std & ~ok)[0].tolist():  # past what the pass read: qemu looks the refcount up
            refs[k] = _refcount_of(meta, int(idx[k]))
        copied = (e & np.uint64(QCOW_OFLAG_COPIED)) != 0
        bad = std & ((refs == 1) != copied)
        for v, r in zip(e[bad].tolist(), refs[bad].tolist()):
            emit(f"{word} OFLAG_COPIED data cluster: l2_entry={v:x} refcount={r}")
            res.corruptions += 1
            fixable += 1
    return fixable


def _repair(meta: lc.Qcow2Meta, state: dict, fix_leaks: bool, fix_errors: bool) -> None:
    """Write a fresh refcount structure (and corrected OFLAG_COPIED flags) copy-on-write."""
    change = lc.current_plan(meta)
    computed = state["computed"]
    extra = []
    if not fix_errors or not fix_leaks:
        # keep what this repair mode must not touch: leaked clusters stay counted
        ondisk = state["ondisk"]
        keep = np.nonzero(ondisk > computed)[0] if not fix_leaks else np.zeros(0, np.int64)
        for c in keep.tolist():
            extra.append((c * meta.cluster_size, meta.cluster_size))
    change.extra_refs = extra
    lc.commit(meta, change, old_refs=computed)
