"""Inflating a compressed block into a buffer of its own size, a piece at a time.

A block whose format declares its size (a cloop block, a DMG chunk) is inflated into one buffer of
that size: the decompressor never holds more than a piece beyond it, so the peak memory of a
64 MiB block is about 64 MiB, and a stream going on past the size (a decompression bomb) stops there.
"""

from __future__ import annotations

#: bytes asked of the decompressor at a time
PIECE = 1 << 20


def inflate_into(d, data: bytes, size: int) -> tuple[bytearray, int, bool]:
    """(buffer of ``size`` bytes, bytes inflated, whether the stream ended there) for decompressor ``d``
    (zlib or bz2) fed ``data``; the stream is not inflated past ``size``."""
    out = bytearray(size)
    pos = 0
    while pos < size:
        piece = d.decompress(data, min(PIECE, size - pos))
        if not piece:
            break
        out[pos:pos + len(piece)] = piece
        pos += len(piece)
        # zlib keeps what it did not read in unconsumed_tail; bz2 keeps it inside
        data = getattr(d, "unconsumed_tail", b"")
    return out, pos, d.eof
