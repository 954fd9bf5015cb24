"""Extents: what a range of an image is (data, zeros, allocated where), and the two helpers."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(slots=True)
class Extent:
    """A run of guest bytes with one allocation state.

    ``present``: allocated in the layer that answered (else it falls through to the backing file).
    ``data``: backed by host data (else unallocated or a zero cluster).
    ``zero``: reads as zeros.  ``offset``: host offset of ``start`` when the data is stored plainly.
    """

    start: int
    length: int
    data: bool = False
    zero: bool = True
    present: bool = False
    depth: int = 0
    offset: int | None = None
    compressed: bool = False
    filename: str | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    def same_kind(self, other: Extent) -> bool:
        """True when two extents may be merged (flags equal; offsets contiguous if any)."""
        if (self.data, self.zero, self.present, self.depth, self.compressed, self.filename) != (
            other.data, other.zero, other.present, other.depth, other.compressed, other.filename
        ):
            return False
        if self.offset is None and other.offset is None:
            return True
        if self.offset is None or other.offset is None:
            return False
        return self.offset + self.length == other.offset


def clip(ext: Extent, start: int, end: int) -> Extent | None:
    """The part of ``ext`` inside [start, end), with its host offset moved along; None if empty."""
    s = max(ext.start, start)
    e = min(ext.end, end)
    if e <= s:
        return None
    if s == ext.start and e == ext.end:
        return ext
    off = None if ext.offset is None else ext.offset + (s - ext.start)
    return replace(ext, start=s, length=e - s, offset=off)


def coalesce(extents):
    """Merge adjacent extents of the same kind (an iterator in, a generator out)."""
    cur = None
    for ext in extents:
        if ext.length <= 0:
            continue
        if cur is not None and cur.end == ext.start and cur.same_kind(ext):
            cur = replace(cur, length=cur.length + ext.length)
            continue
        if cur is not None:
            yield cur
        cur = ext
    if cur is not None:
        yield cur


def split_at(start: int, end: int, unit: int):
    """Cut [start, end) at absolute multiples of ``unit``: yields (pos, next) pairs.

    The one place where a range that crosses block, table or chunk boundaries is split.
    """
    pos = start
    while pos < end:
        nxt = min((pos // unit + 1) * unit, end)
        yield pos, nxt
        pos = nxt
