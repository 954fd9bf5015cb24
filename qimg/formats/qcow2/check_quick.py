"""qcow2 check without numpy: the common case of a consistent image, verified in plain Python.

References: see check.py (qcow2 specification, "Host cluster management" and "Cluster mapping";
qemu-img 7.2's check output).

``check`` of a healthy image is a metadata command: it should cost about what reading the tables
costs, not numpy's import.  This pass recomputes every reference count the way check.py's walk does
(header, L1/L2 tables of the active state and of the snapshots, snapshot table, refcount table and
blocks), compares them with the stored refcounts and checks OFLAG_COPIED and the alignment of every
entry.  Bulk steps stay in C (``bytes.translate``, slices, ``array`` comparisons): the data clusters
of a table are taken as runs of contiguous host clusters, and the Python work grows with the runs,
not with the entries.  The moment anything is unusual (compressed clusters, extended L2,
an external data file, bitmaps, encryption, other refcount widths, or any disagreement at all) it
gives up and check.py's full walk runs, which reports every problem with qemu-img's messages.
"""

from __future__ import annotations

import operator
import sys
from array import array
from itertools import repeat

from ...core.check import CheckResult
from .header import MAX_L1_SIZE_BYTES
from .refcount import REFT_OFFSET_MASK
from .tables import L1E_OFFSET_MASK, NONZERO_BYTE, QCOW_OFLAG_COPIED, be_u64_array, run_length

REFT_RESERVED_MASK = 0x1FF
#: first bytes (big-endian) an entry may have here: 0, or only OFLAG_COPIED; anything else (compressed,
#: offsets past 2**56) leaves the decision to the full walk
_PLAIN_FIRST_BYTES = b"\x00\x80"


class _GiveUp(Exception):
    """Something the quick pass does not decide: the full walk takes over."""


def quick_check(meta) -> CheckResult | None:
    """The result of ``check`` for a consistent image, or None when the full walk must decide."""
    q = _quick(meta)
    return None if q is None else q[0]


def quick_refcounts(meta) -> list | None:
    """The reference counts check computes, for a consistent image (None: the full walk must decide)."""
    q = _quick(meta)
    return None if q is None else q[1].tolist()


def _quick(meta):
    h = meta.header
    if (h.extended_l2 or h.has_data_file or h.refcount_order != 4 or h.crypto_header or h.bitmaps_ext
            or h.incompatible_features & 1):  # (a dirty image: lazy refcounts are stale by design)
        return None
    q = _Quick(meta)
    try:
        return q.run(), q.counts
    except (_GiveUp, OverflowError):  # (OverflowError: a refcount past 65535, which the walk reports)
        return None


def _host_runs(v: array, step: int) -> list[tuple[int, int, int]]:
    """(index, first value, count) of each run of non-zero entries of ``v`` that rise by ``step`` from
    one to the next (contiguous host clusters), split at zero entries (no host cluster)."""
    runs = []
    n = len(v)
    i = 0
    while i < n:
        x = v[i]
        if not x:
            m = NONZERO_BYTE.search(v, 4 * i)
            if m is None:
                break
            i = m.start() >> 2
            continue
        try:
            stop = v.index(0, i)
        except ValueError:
            stop = n
        stop = min(stop, i + (0xFFFFFFFF - x) // step + 1)  # (the values stay 32-bit)
        count = run_length(v, i, stop, lambda k, c, x=x: array("I", range(x + k * step, x + (k + c) * step, step)))
        runs.append((i, x, count))
        i += count
    return runs


class _Quick:
    def __init__(self, meta):
        self.meta = meta
        self.h = meta.header
        self.cs = meta.cluster_size
        self.bits = meta.cluster_bits
        self.nb = meta.file_clusters
        self.file_len = meta.file_size
        self.counts = array("H", bytes(2 * max(self.nb, 1)))

    def inc(self, offset: int, size: int) -> None:
        if size <= 0:
            return
        first, last = offset >> self.bits, (offset + size - 1) >> self.bits
        if last >= self.nb:
            raise _GiveUp
        counts = self.counts
        for c in range(first, last + 1):
            counts[c] += 1

    def table(self, offset: int, entries: int) -> array:
        if offset + entries * 8 > self.file_len:
            raise _GiveUp
        return be_u64_array(self.meta.store.pread_full(offset, entries * 8))

    def l1(self, offset: int, size: int, tables: dict) -> list:
        """Count an L1 table and its L2 table clusters; ``tables`` counts references per L2 table."""
        if size > MAX_L1_SIZE_BYTES // 8 or offset % self.cs:
            raise _GiveUp
        self.inc(offset, size * 8)
        ents = self.table(offset, size) if size else array("Q")
        out = []
        for ent in ents:
            l2 = ent & L1E_OFFSET_MASK
            if not l2:
                continue
            if l2 % self.cs:
                raise _GiveUp
            self.inc(l2, self.cs)
            tables[l2] = tables.get(l2, 0) + 1
            out.append(ent)
        return out

    def run(self) -> CheckResult:
        meta, h, cs, bits = self.meta, self.h, self.cs, self.bits
        res = CheckResult(total_clusters=-(-h.size // cs))
        self.inc(0, cs)
        active_tables: dict = {}
        all_tables: dict = {}
        active_l1 = self.l1(h.l1_table_offset, h.l1_size, active_tables)
        for l2, k in active_tables.items():
            if k > 1:
                raise _GiveUp  # one L2 table twice in the active L1: the full walk's statistics decide
            all_tables[l2] = 1
        for s in meta.snapshots:
            snap: dict = {}
            self.l1(s.l1_table_offset, s.l1_size, snap)
            for l2, k in snap.items():
                all_tables[l2] = all_tables.get(l2, 0) + k
        if h.nb_snapshots:
            self.inc(h.snapshots_offset, meta.snapshot_table_bytes)
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * cs)
        reftable = self.table(h.refcount_table_offset, h.refcount_table_clusters * cs // 8)
        # the unused tail of the table (zero entries) needs no look: the refcounts it would cover are
        # checked to be zero below
        used = len(reftable.tobytes().rstrip(b"\0"))
        reftable = reftable[:-(-used // 8)]
        blocks = []
        for ent in reftable:
            off = ent & REFT_OFFSET_MASK
            if ent & REFT_RESERVED_MASK or off % cs or (off >> bits) >= self.nb:
                raise _GiveUp
            if off:
                self.inc(off, cs)
            blocks.append(off)
        # the data clusters, one pass per distinct L2 table, weighted by its references.  Entries are
        # taken apart with byte slices: bits 8-39 of every entry become one small int (no 64-bit ints
        # with flags to mask), which holds any host offset below 1 TiB (larger: the full walk)
        counts = self.counts
        shift = bits - 8
        # bytes 6 and 5 of an entry hold bits 8-15 and 16-23: reserved bit 8 and the offset bits below
        # the cluster size must be clear (the bytes that may appear there)
        low = ((1 << shift) - 1) | 1
        ok6 = bytes(b for b in range(256) if not b & low & 0xFF)
        ok5 = bytes(b for b in range(256) if not b & (low >> 8)) if low >> 8 else None
        step = cs >> 8
        entries = meta.l2_entries
        active_runs: list = []  # (each entry's first byte, its runs) of the tables in the active L1
        for l2, weight in all_tables.items():
            if (l2 >> bits) >= self.nb:
                raise _GiveUp
            raw = meta.store.pread_full(l2, entries * 8)
            first = raw[0::8]
            if (first.translate(None, _PLAIN_FIRST_BYTES) or raw[1::8].count(0) != entries
                    or raw[2::8].count(0) != entries or raw[6::8].translate(None, ok6)
                    or (ok5 is not None and raw[5::8].translate(None, ok5))):
                raise _GiveUp  # compressed, offsets of 1 TiB or more, reserved bit 8 set, unaligned
            w = bytearray(4 * entries)
            for k in range(4):
                w[k::4] = raw[3 + k::8]
            v = array("I")
            v.frombytes(w)  # host offset >> 8 of each entry, 0 when it has no host cluster
            if sys.byteorder == "little":
                v.byteswap()
            runs = _host_runs(v, step)
            for _i, x, count in runs:
                a = x >> shift
                if a + count > self.nb:
                    raise _GiveUp  # past the end of the file: the full walk reports it
                seg = counts[a:a + count]
                if seg.count(0) == count:  # the common case: clusters no other table has counted
                    counts[a:a + count] = array("H", (weight,)) * count
                else:
                    counts[a:a + count] = array("H", map(operator.add, seg, repeat(weight)))
            if l2 in active_tables and runs:
                active_runs.append((first, runs))
                res.allocated_clusters += sum(r[2] for r in runs)
                # fragmented: a host cluster not right after the one before it (entries without one skipped)
                res.fragmented_clusters += sum(1 for p, q in zip(runs, runs[1:]) if q[1] != p[1] + p[2] * step)
        # the stored refcounts must be exactly these
        computed = counts
        rpb = meta.rc_per_block
        n = len(computed)
        for i, off in enumerate(blocks):
            lo = i * rpb
            if not off:
                if any(computed[lo:lo + rpb]):
                    raise _GiveUp
                continue
            blk = array("H", meta.store.pread_full(off, cs))
            if sys.byteorder == "little":
                blk.byteswap()
            # (past the clusters of the file every stored refcount must be 0)
            if blk[:max(0, n - lo)] != computed[lo:lo + rpb] or any(blk[max(0, n - lo):]):
                raise _GiveUp
        if len(blocks) * rpb < n and any(computed[len(blocks) * rpb:]):
            raise _GiveUp
        if any(counts[off >> bits] != 1 for off in blocks if off):
            raise _GiveUp
        # OFLAG_COPIED: set exactly where the refcount is 1 (L2 tables in the active L1, and their data)
        for ent in active_l1:
            if (counts[(ent & L1E_OFFSET_MASK) >> bits] == 1) != bool(ent & QCOW_OFLAG_COPIED):
                raise _GiveUp
        for first, runs in active_runs:  # first: each entry's first byte, 0x80 when COPIED
            for i, x, count in runs:
                refs = counts[x >> shift:(x >> shift) + count]
                flags = first[i:i + count]
                ones = refs.count(1)
                if ones == count:
                    ok = flags.count(0x80) == count
                elif ones == 0:
                    ok = flags.count(0) == count
                else:
                    ok = [f >> 7 for f in flags] == [int(r == 1) for r in refs]
                if not ok:
                    raise _GiveUp
        last = n - 1
        while last >= 0 and not counts[last]:
            last -= 1
        res.image_end_offset = (last + 1) * cs if last >= 0 else cs
        return res
