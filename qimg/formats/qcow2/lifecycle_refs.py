"""Whole-table helpers of the copy-on-write lifecycle (lifecycle.py): reference counting and
OFLAG_COPIED, on plain ``array('Q')`` tables and lists of refcounts.

References: qcow2 specification (qemu docs/interop/qcow2.txt), "Host cluster management" (refcounts,
OFLAG_COPIED) and "Cluster mapping" (standard and compressed L2 entries).

Every step works on a whole table at a time with C-level operations (``map`` over ``operator``
functions, ``itertools.compress``, byte slices of the tables, ``Counter``), so the Python work grows
with the number of tables, not of entries.
"""

from __future__ import annotations

import sys
from array import array
from collections import Counter, deque
from itertools import compress, repeat
from operator import add, and_, eq, ge, mul, not_, or_, rshift

from .tables import L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED

_NOT_COPIED = ((1 << 64) - 1) ^ QCOW_OFLAG_COPIED
#: most significant bytes without the compressed flag (bit 62 is 0x40 of that byte)
NOT_COMPRESSED_BYTES = bytes(b for b in range(256) if not b & 0x40)
_TOP = 7 if sys.byteorder == "little" else 0


def masked(table, mask: int = L1E_OFFSET_MASK) -> array:
    """``table`` with every entry ANDed with ``mask``."""
    return array("Q", map(and_, table, repeat(mask)))


def last_used(vals) -> int:
    """One past the last non-zero value of ``vals`` (0 if there is none)."""
    n = len(vals)
    return n - next(compress(range(n), map(bool, reversed(vals))), n)


def top_bytes(words: array) -> bytes:
    """The most significant byte of every entry: its flags (0x80 OFLAG_COPIED, 0x40 compressed)."""
    return words.tobytes()[_TOP::8]


def nonzero(seq) -> list[int]:
    """Indices of the non-zero values of ``seq``."""
    return list(compress(range(len(seq)), seq))


class RefCollector:
    """Collects referenced cluster indices; counts them in one pass (``Counter``)."""

    def __init__(self, cluster_bits: int, limit: int | None = None):
        self.bits = cluster_bits
        self.idx: list[int] = []
        self.weighted: dict[int, list[int]] = {}   # weight -> indices counted that many times each
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
            self.idx.extend(range(first, last + 1))

    def add_indices(self, idx, weight: int = 1) -> None:
        if not isinstance(idx, (list, array, range)):
            idx = idx.tolist()
        dst = self.idx if weight == 1 else self.weighted.setdefault(weight, [])
        dst.extend(idx if self.limit is None else filter(self.limit.__gt__, idx))

    def add_spans(self, first: list, last: list) -> None:
        if self.limit is not None and first:
            keep = list(map(self.limit.__gt__, first))
            first = list(compress(first, keep))
            last = list(map(min, compress(last, keep), repeat(self.limit - 1)))
        if not first:
            return
        self.idx.extend(first)
        span = list(map(int.__sub__, last, first))
        k = 1
        while any(map(ge, span, repeat(k))):
            self.idx.extend(compress(map(add, first, repeat(k)), map(ge, span, repeat(k))))
            k += 1

    def counts(self, minlength: int = 0) -> list:
        groups = {1: self.idx, **self.weighted}
        n = max([minlength] + [max(g) + 1 for g in groups.values() if g])
        out = [0] * n
        # the common case, no cluster referenced twice: each group's weight is stored (not added);
        # a cluster that was would leave the sum short of the number of references, and is counted
        for w, idx in groups.items():
            deque(map(out.__setitem__, idx, repeat(w)), 0)
        if sum(out) == sum(w * len(idx) for w, idx in groups.items()):
            return out
        out = [0] * n
        for w, idx in groups.items():
            c = Counter(idx)
            keys = list(c)
            vals = map(mul, c.values(), repeat(w)) if w != 1 else c.values()
            deque(map(out.__setitem__, keys, map(add, map(out.__getitem__, keys), vals)), 0)
        return out


def copied_lookup(ref) -> list:
    """Refcounts (a list or any sequence) as set_copied_flags looks them up: cluster 0 and one past
    the end (where every index past the end is sent) read as 0."""
    look = (ref if isinstance(ref, list) else ref.tolist()) + [0]
    look[0] = 0
    return look


def set_copied_flags(meta, l2, look: list) -> array:
    """L2 table ``l2`` with OFLAG_COPIED set exactly where the data cluster's refcount (``look``, from
    copied_lookup) is 1: ``l2`` itself when that is so already, else a new table."""
    if meta.header.has_data_file:
        # external data file: no refcounts for data, and OFLAG_COPIED on an offset-0 entry is what
        # marks it allocated; the flags stay as they are
        return l2
    e = meta.l2_words(l2)
    n = len(look) - 1
    top = top_bytes(e)
    if not top.translate(None, b"\0\x80"):
        # no compressed entries (the common case): the table is right as it is when no data cluster
        # has a refcount of 1 and no entry is flagged, or all have and exactly the entries with a
        # host cluster are flagged
        idx = list(map(rshift, filter(None, map(and_, e, repeat(L2E_OFFSET_MASK))), repeat(meta.cluster_bits)))
        if not idx or max(idx) < n:
            ones = list(map(look.__getitem__, idx)).count(1)
            flagged = len(top) - top.count(0)
            if ones == flagged == 0 or (ones == len(idx) == flagged and all(
                    map(and_, compress(e, top), repeat(L2E_OFFSET_MASK)))):
                return l2
    # offsets of the standard entries (0 for compressed and unallocated ones), as cluster indices;
    # index 0 and those past the end look up a refcount of 0
    offs = map(and_, e, repeat(L2E_OFFSET_MASK))
    if any(map(and_, e, repeat(QCOW_OFLAG_COMPRESSED))):
        offs = map(mul, offs, map(not_, map(and_, e, repeat(QCOW_OFLAG_COMPRESSED))))
    idx = map(min, map(rshift, offs, repeat(meta.cluster_bits)), repeat(n))
    one = map(eq, map(look.__getitem__, idx), repeat(1))
    words = array("Q", map(or_, map(and_, e, repeat(_NOT_COPIED)), map(mul, one, repeat(QCOW_OFLAG_COPIED))))
    if words == e:
        return l2
    if meta.l2_entry_words == 1:
        return words
    out = array("Q", l2)
    out[0::2] = words
    return out
