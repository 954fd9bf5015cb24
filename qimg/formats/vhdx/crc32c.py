"""CRC-32C (Castagnoli), the checksum of every VHDX header, region table and log entry.

References:
  - RFC 3720 appendix B.4 (CRC-32C, reflected polynomial 0x82F63B78).
  - [MS-VHDX] 2.2.2 / 2.2.3 / 2.3.1: the checksum field is computed with itself zeroed.
"""

from __future__ import annotations

import struct

_CRC_TABLE = None


def _crc_table():
    global _CRC_TABLE
    if _CRC_TABLE is None:
        table = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            table.append(c)
        _CRC_TABLE = table
    return _CRC_TABLE


#: from this many bytes on, the CRC runs in numpy lanes: a crafted 256 MiB log entry costs about a
#: second instead of the ~20 s of the byte loop
CRC_LANES_FROM = 256 << 10


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of ``data`` (used on headers, tables and log entries).

    Short inputs are table driven, with long runs of zero bytes (most of a 64 KiB region or
    metadata table) skipped in O(log n) with the CRC's zero-byte operator; long ones (log
    entries) go through ``_crc_lanes``.
    """
    global _ZERO_RUN
    table = _crc_table()
    c = crc ^ 0xFFFFFFFF
    data = bytes(data)
    if len(data) >= CRC_LANES_FROM:
        c, done = _crc_lanes(c, data)
        data = data[done:]
    if _ZERO_RUN is None:
        import re

        _ZERO_RUN = re.compile(rb"\0{256,}")
    pos = 0
    for m in _ZERO_RUN.finditer(data):
        for b in data[pos:m.start()]:
            c = table[(c ^ b) & 0xFF] ^ (c >> 8)
        c = _crc_zeros(c, m.end() - m.start())
        pos = m.end()
    for b in data[pos:]:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


_ZERO_RUN = None
#: _ZERO_OPS[i]: the CRC register's linear map over GF(2) for 2**i zero bytes (images of the 32 bits)
_ZERO_OPS: list = []


def _gf2_apply(mat, vec: int) -> int:
    out = 0
    i = 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _crc_zeros(c: int, n: int) -> int:
    """The CRC register after ``n`` zero bytes (zlib's crc32_combine idea)."""
    i = 0
    while n:
        while len(_ZERO_OPS) <= i:
            if not _ZERO_OPS:
                t = _crc_table()  # one zero byte: c -> table[c & 0xff] ^ (c >> 8), linear in c
                _ZERO_OPS.append([t[(1 << j) & 0xFF] ^ ((1 << j) >> 8) for j in range(32)])
            else:
                sq = _ZERO_OPS[-1]
                _ZERO_OPS.append([_gf2_apply(sq, col) for col in sq])
        if n & 1:
            c = _gf2_apply(_ZERO_OPS[i], c)
        n >>= 1
        i += 1
    return c


def _crc_lanes(c: int, data: bytes) -> tuple[int, int]:
    """Advance the CRC register ``c`` over the first ``k * step`` bytes of ``data`` (returned too).

    The CRC register is linear in its input: the register after A+B is Z(A's register) ^ (B's
    register from 0), Z being the map of len(B) zero bytes; and four bytes from register c give
    Z4(c ^ word), Z4 split into two 65536-entry tables by the word's halves.  So the data is cut
    into ``k`` lanes (a power of two) that numpy advances side by side, a 32-bit word of each per
    step, and neighbouring lanes are then merged pairwise with the zero operator, log2(k) rounds.
    """
    import numpy as np

    k = 1 << min(16, (len(data) // 64).bit_length() - 1)
    step = len(data) // k // 4 * 4
    words = np.frombuffer(data, dtype="<u4", count=k * step // 4).reshape(k, step // 4)
    rows = words.T.copy()  # row t: word t of every lane
    low, high = _zero_word_tables()
    regs = np.zeros(k, dtype=np.uint32)
    regs[0] = c
    for row in rows:
        regs ^= row
        regs = low[regs & 0xFFFF] ^ high[regs >> 16]
    span = step
    while len(regs) > 1:
        a, b = regs[0::2], regs[1::2]
        regs = _gf2_apply_array(_zero_columns(span), a) ^ b
        span *= 2
    return int(regs[0]), k * step


def _zero_columns(n: int) -> list[int]:
    """The images of the 32 register bits after ``n`` zero bytes."""
    return [_crc_zeros(1 << j, n) for j in range(32)]


def _gf2_apply_array(cols, vals):
    """``_gf2_apply`` over a numpy array of registers."""
    import numpy as np

    out = np.zeros_like(vals)
    for j, col in enumerate(cols):
        if col:
            out ^= ((vals >> j) & 1) * np.uint32(col)
    return out


_ZERO_WORD_TABLES: list = []


def _zero_word_tables():
    """(low, high): the register after four zero bytes from each 16-bit low half and high half."""
    if not _ZERO_WORD_TABLES:
        import numpy as np

        cols = _zero_columns(4)
        vals = np.arange(65536, dtype=np.uint32)
        _ZERO_WORD_TABLES.extend((_gf2_apply_array(cols[:16], vals), _gf2_apply_array(cols[16:], vals)))
    return _ZERO_WORD_TABLES


def _checksum_ok(buf: bytes, off: int = 4) -> bool:
    stored = struct.unpack_from("<I", buf, off)[0]
    return crc32c(buf[:off] + bytes(4) + buf[off + 4:]) == stored


def _with_checksum(buf: bytearray, off: int = 4) -> bytearray:
    buf[off:off + 4] = bytes(4)
    struct.pack_into("<I", buf, off, crc32c(buf))
    return buf

