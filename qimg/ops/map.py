"""map: the allocation of an image, as qemu-img 7.2's ``map`` reports it.

Entries are produced lazily (a generator), so a huge sparse image costs memory for one
entry at a time.  Each probe asks the chain for the whole rest of the range (drivers
answer with their first run), so a hostile size field cannot turn into billions of
probes; adjacent runs are merged by qemu's rules: same flags, same depth, same file,
contiguous host offsets.  The result equals qemu-img's 1 GiB probes once merged.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.chain import Chain
from ..errors import QimgError


@dataclass(slots=True)
class MapEntry:
    """One line of ``qemu-img map`` output."""

    start: int
    length: int
    depth: int = 0
    present: bool = False
    zero: bool = False
    data: bool = False
    offset: int | None = None
    filename: str | None = None

    @property
    def end(self) -> int:
        """The offset just past the entry."""
        return self.start + self.length

    def to_dict(self) -> dict:
        """One entry of ``qimg map --output=json`` as a dict."""
        out = {"start": self.start, "length": self.length, "depth": self.depth, "present": self.present,
               "zero": self.zero, "data": self.data}
        if self.offset is not None:
            out["offset"] = self.offset
        return out


def mergeable(cur: MapEntry, nxt: MapEntry) -> bool:
    """qemu-img's rule for joining two adjacent map entries."""
    if cur.length == 0:
        return False
    if (cur.zero, cur.data, cur.depth, cur.present) != (nxt.zero, nxt.data, nxt.depth, nxt.present):
        return False
    if (cur.filename is None) != (nxt.filename is None) or (cur.offset is None) != (nxt.offset is None):
        return False
    if cur.filename is not None and cur.filename != nxt.filename:
        return False
    return cur.offset is None or cur.offset + cur.length == nxt.offset


def _entry(chain: Chain, offset: int, length: int) -> MapEntry:
    try:
        ext = chain.block_status(offset, length)
    except QimgError as e:
        if str(e).startswith("Could not open"):
            raise  # a driver that opens lazily: report it as the open error it is
        raise QimgError(f"Could not read file metadata: {e}", diagnostics=e.diagnostics) from None
    if ext.length <= 0:
        raise QimgError("Could not read file metadata: Input/output error")
    n = min(ext.length, length)
    # qemu prints a host offset whenever block status has a valid one; drivers report an offset only then
    # (plain data, allocated zero runs, unallocated subclusters of allocated extended-L2 clusters)
    has_offset = ext.offset is not None
    return MapEntry(offset, n, ext.depth, bool(ext.present), bool(ext.zero), bool(ext.data),
                    ext.offset if has_offset else None, ext.filename if has_offset else None)


def map_entries(chain: Chain, start: int = 0, max_length: int | None = None):
    """Merged map entries of ``chain`` from ``start`` (at most ``max_length`` bytes).

    Like qemu-img, an empty range yields one zero-length entry at ``start``.
    """
    end = chain.virtual_size
    if max_length is not None:
        end = min(start + max_length, end)
    cur = MapEntry(start, 0)
    while cur.end < end:
        pos = cur.end
        nxt = _entry(chain, pos, end - pos)
        if mergeable(cur, nxt):
            cur.length += nxt.length
            continue
        if cur.length > 0:
            yield cur
        cur = nxt
    yield cur


def check_human(entry: MapEntry) -> None:
    """The human table cannot show data without a host offset (qemu-img refuses)."""
    if entry.data and entry.offset is None:
        raise QimgError("File contains external, encrypted or compressed clusters.")


def open_for_map(filename: str, fmt: str | None = None, options: dict | None = None, policy=None) -> Chain:
    """The chain ``map`` walks (the image and its backing files, read-only)."""
    return Chain.open(filename, fmt, options=options, policy=policy)
