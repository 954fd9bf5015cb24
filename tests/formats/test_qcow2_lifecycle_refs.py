"""The whole-table helpers of the copy-on-write lifecycle against entry-by-entry reference versions,
on ordinary and crafted L2 tables (compressed entries, offset-0 entries with flags, offsets past the
refcounts, refcounts of 0, 1 and 2, duplicate references)."""

from __future__ import annotations

import random
from array import array
from collections import Counter
from types import SimpleNamespace

import pytest

from qimg.formats.qcow2.lifecycle_refs import RefCollector, copied_lookup, last_used, set_copied_flags
from qimg.formats.qcow2.tables import L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO

BITS = 16
CS = 1 << BITS


def _meta(extended=False, data_file=False):
    return SimpleNamespace(cluster_bits=BITS, l2_entry_words=2 if extended else 1,
                           header=SimpleNamespace(has_data_file=data_file),
                           l2_words=lambda l2: l2[0::2] if extended else l2)


def _expected(words, ref):
    """OFLAG_COPIED exactly on the standard entries whose data cluster has a refcount of 1."""
    out = []
    for e in words:
        e &= ~QCOW_OFLAG_COPIED
        off = e & L2E_OFFSET_MASK
        c = off >> BITS
        if not e & QCOW_OFLAG_COMPRESSED and off and 0 < c < len(ref) and ref[c] == 1:
            e |= QCOW_OFLAG_COPIED
        out.append(e)
    return out


def _table(rng, n, span, kinds):
    words = []
    for k in range(n):
        kind = rng.choice(kinds)
        c = k % span if rng.random() < 0.5 else rng.randrange(1, span)
        if kind == "std":
            words.append((c << BITS) | (QCOW_OFLAG_COPIED if rng.random() < 0.5 else 0))
        elif kind == "std-right":
            words.append(c << BITS)   # flagged below from the refcounts
        elif kind == "zero":
            words.append(QCOW_OFLAG_ZERO | (QCOW_OFLAG_COPIED if rng.random() < 0.2 else 0))
        elif kind == "comp":
            flag = QCOW_OFLAG_COPIED if rng.random() < 0.2 else 0
            words.append(QCOW_OFLAG_COMPRESSED | rng.randrange(1 << 40) | flag)
        else:
            words.append(0)
    return words


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kinds", [("std", "none"), ("std-right", "none"), ("std", "zero"),
                                   ("std", "zero", "comp", "none"), ("std-right",), ("comp", "std-right")])
def test_set_copied_flags_matches_entry_by_entry(seed, kinds):
    rng = random.Random(seed)
    nref = 300
    ref = [rng.choice((0, 1, 1, 1, 2)) for _ in range(nref)]
    if seed % 3 == 0:
        ref = [1] * nref   # every cluster once: the fast path's "all flagged" case
    elif seed % 3 == 1:
        ref = [2] * nref   # shared with a snapshot: the "none flagged" case
    words = _table(rng, 512, nref + 8 if seed >= 6 else nref, kinds)  # (then some past the refcounts)
    if "std-right" in kinds:
        words = _expected(words, ref)   # already right: must come back as it is
    look = copied_lookup(ref)
    for extended in (False, True):
        l2 = array("Q", words) if not extended else array("Q", [w for e in words for w in (e, 0xF0F0)])
        got = set_copied_flags(_meta(extended), l2, look)
        want = _expected(words, ref)
        assert list(got[0::2] if extended else got) == want
        if extended:
            assert set(got[1::2]) == {0xF0F0}
        if list(words) == want:
            assert got is l2
    # an external data file keeps the flags as they are
    assert list(set_copied_flags(_meta(data_file=True), array("Q", words), look)) == words


def test_set_copied_flags_counts_alone_do_not_decide():
    """As many flagged entries as data clusters with a refcount of 1, but the flag on the wrong entry."""
    ref = [1, 1, 1]
    words = [(1 << BITS) | QCOW_OFLAG_COPIED, 2 << BITS, QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED, 0]
    got = set_copied_flags(_meta(), array("Q", words), copied_lookup(ref))
    assert list(got) == [(1 << BITS) | QCOW_OFLAG_COPIED, (2 << BITS) | QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, 0]


@pytest.mark.parametrize("seed", range(6))
def test_ref_collector_counts_like_counter(seed):
    rng = random.Random(seed)
    limit = 5000 if seed % 2 else None
    rc = RefCollector(BITS, limit=limit)
    want = Counter()
    for _ in range(40):
        w = rng.choice((1, 1, 2, 3))
        idx = rng.sample(range(1, 6000), 50) if seed < 3 else [rng.randrange(1, 6000) for _ in range(50)]
        rc.add_indices(idx, w)
        for i in idx:
            if limit is None or i < limit:
                want[i] += w
        off, length = rng.randrange(0, 6000 * CS), rng.randrange(1, 3 * CS)
        rc.add_range(off, length)
        last = (off + length - 1) >> BITS
        for c in range(off >> BITS, (last if limit is None else min(last, limit - 1)) + 1):
            want[c] += 1
    first = [rng.randrange(1, 6000) for _ in range(30)]
    last = [f + rng.randrange(0, 3) for f in first]
    rc.add_spans(first, last)
    for f, la in zip(first, last):
        for c in range(f, la + 1):
            if limit is None or f < limit:
                if limit is None or c <= limit - 1:
                    want[c] += 1
    got = rc.counts(10)
    assert len(got) >= 10
    assert {i: v for i, v in enumerate(got) if v} == dict(want)


def test_last_used():
    assert last_used([]) == 0
    assert last_used([0, 0]) == 0
    assert last_used([1, 0, 3, 0, 0]) == 3
    assert last_used(array("q", [0, 0, 5])) == 3
