"""Block maps of the fixed-block formats (vdi, vpc, vhdx): entry tables and new blocks.

A block map is one unsigned integer per block (VDI's u32 little-endian block map, VHD's u32
big-endian BAT, VHDX's u64 little-endian BAT).  Small maps are ``array`` objects (importing numpy
costs more than walking them); large ones are numpy arrays; both turn back into on-disk bytes here.
"""

from __future__ import annotations

import sys
from array import array

from ..errors import QimgError

#: up to this many entries a block map is handled without numpy (importing it costs more than the walk)
SMALL_TABLE = 1 << 16

_TYPECODES = {4: "I", 8: "Q"}


def uint_table(raw: bytes, width: int, little: bool = True) -> array:
    """An ``array`` of the ``width``-byte unsigned entries in ``raw`` (native order in memory)."""
    tab = array(_TYPECODES[width])
    if tab.itemsize != width:  # pragma: no cover - exotic platforms
        raise QimgError(f"unsupported platform: {width * 8}-bit unsigned array items are not {width} bytes")
    tab.frombytes(raw)
    if (sys.byteorder == "little") != little:
        tab.byteswap()
    return tab


def uint_table_bytes(tab, width: int, little: bool = True) -> bytes:
    """The on-disk bytes of a block map (an ``array`` from ``uint_table`` or a numpy array)."""
    if not isinstance(tab, array):
        return tab.astype(f"{'<' if little else '>'}u{width}").tobytes()
    if (sys.byteorder == "little") == little:
        return tab.tobytes()
    out = array(tab.typecode, tab)
    out.byteswap()
    return out.tobytes()


def zero_stale(store, start: int, length: int, size: int) -> None:
    """A new block normally starts past ``size`` (the file size at open); if old bytes lie there, clear them."""
    if start < size:
        end = min(start + length, size)
        chunk = bytes(min(end - start, 1 << 20))
        pos = start
        while pos < end:
            n = min(len(chunk), end - pos)
            store.pwrite(pos, chunk[:n])
            pos += n
