"""Extent, clip() and coalesce()."""

from __future__ import annotations

from qimg.core.extent import Extent, clip, coalesce


def data(start, length, offset=None, **kw):
    return Extent(start, length, data=True, zero=False, present=True, offset=offset, **kw)


def zero(start, length, **kw):
    return Extent(start, length, data=False, zero=True, present=True, **kw)


def test_clip_inside_returns_same_object():
    e = data(0, 100, offset=1000)
    assert clip(e, 0, 100) is e
    assert clip(e, -5, 500) is e


def test_clip_unaligned_start_shortens_and_moves_offset():
    e = data(4096, 65536, offset=1 << 20)
    c = clip(e, 5000, 1 << 30)
    assert (c.start, c.length, c.end) == (5000, 65536 - (5000 - 4096), 4096 + 65536)
    assert c.offset == (1 << 20) + (5000 - 4096)
    assert e.start == 4096 and e.length == 65536 and e.offset == 1 << 20  # the original is untouched


def test_clip_end_and_both_sides():
    e = data(100, 100, offset=7)
    c = clip(e, 0, 150)
    assert (c.start, c.length, c.offset) == (100, 50, 7)
    c = clip(e, 120, 130)
    assert (c.start, c.length, c.offset) == (120, 10, 27)


def test_clip_without_offset_and_empty():
    e = zero(0, 10)
    assert clip(e, 5, 20).offset is None
    assert clip(e, 10, 20) is None
    assert clip(e, 20, 30) is None
    assert clip(e, 5, 5) is None
    assert clip(e, 5, 3) is None


def test_clip_keeps_flags():
    e = Extent(0, 10, data=True, zero=False, present=False, depth=2, compressed=True, filename="x")
    c = clip(e, 3, 7)
    assert (c.data, c.zero, c.present, c.depth, c.compressed, c.filename) == (True, False, False, 2, True, "x")


def test_coalesce_merges_same_kind_and_contiguous_offsets():
    out = list(coalesce([data(0, 10, offset=100), data(10, 10, offset=110), data(20, 5, offset=120)]))
    assert [(e.start, e.length, e.offset) for e in out] == [(0, 25, 100)]


def test_coalesce_keeps_discontiguous_offsets_apart():
    out = list(coalesce([data(0, 10, offset=100), data(10, 10, offset=500)]))
    assert [(e.start, e.length) for e in out] == [(0, 10), (10, 10)]
    out = list(coalesce([data(0, 10, offset=100), data(10, 10)]))
    assert len(out) == 2


def test_coalesce_keeps_kinds_and_gaps_apart():
    out = list(coalesce([zero(0, 10), data(10, 10), zero(20, 10), zero(40, 10)]))
    assert [(e.start, e.length, e.data) for e in out] == [(0, 10, False), (10, 10, True), (20, 10, False),
                                                          (40, 10, False)]
    out = list(coalesce([zero(0, 10, depth=0), zero(10, 10, depth=1)]))
    assert len(out) == 2


def test_coalesce_merges_zero_runs_and_skips_empty():
    out = list(coalesce([zero(0, 10), Extent(10, 0), zero(10, 10), zero(20, 10)]))
    assert [(e.start, e.length) for e in out] == [(0, 30)]
    assert list(coalesce([])) == []
    # the inputs are not modified in place
    a, b = zero(0, 10), zero(10, 10)
    list(coalesce([a, b]))
    assert a.length == 10 and b.length == 10


def test_extent_end_and_same_kind():
    a = data(0, 10, offset=0)
    assert a.end == 10
    assert a.same_kind(data(10, 5, offset=10))
    assert not a.same_kind(data(10, 5, offset=11))
    assert not a.same_kind(zero(10, 5))


def test_split_at_cuts_at_absolute_boundaries():
    from qimg.core.extent import split_at

    assert list(split_at(100, 300, 128)) == [(100, 128), (128, 256), (256, 300)]
    assert list(split_at(0, 256, 128)) == [(0, 128), (128, 256)]
    assert list(split_at(5, 5, 128)) == []
