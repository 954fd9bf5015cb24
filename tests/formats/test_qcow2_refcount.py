"""The one refcount codec: every width from 1 to 64 bits, sub-byte entries packed low bits first."""

from __future__ import annotations

from array import array

import numpy as np
import pytest

from qimg.formats.qcow2.refcount import decode_block, encode_block


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_round_trip_and_padding(bits):
    rng = np.random.default_rng(bits)
    entries = 4096 * 8 // bits
    vals = rng.integers(0, 1 << min(bits, 63), size=entries // 2, dtype=np.uint64)
    raw = encode_block(vals, bits, entries)
    assert len(raw) == 4096
    back = decode_block(raw, bits)
    assert isinstance(back, array) and back.typecode == "Q" and len(back) == entries
    assert back[:len(vals)].tolist() == vals.tolist() and not any(back[len(vals):])
    # the same bytes from a plain list, and numpy's own packing of them (an independent encoder)
    assert encode_block(vals.tolist(), bits, entries) == raw
    full = np.zeros(entries, np.uint64)
    full[:len(vals)] = vals
    if bits >= 8:
        assert full.astype(f">u{bits // 8}").tobytes() == raw
    else:
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
        packed = np.bitwise_or.reduce(full.astype(np.uint8).reshape(-1, per) << shifts, axis=1)
        assert packed.astype(np.uint8).tobytes() == raw


def test_layout_matches_the_spec():
    # qcow2.txt: sub-byte refcounts are packed starting at the least significant bit
    assert encode_block(np.array([1, 0, 1, 1, 0, 0, 0, 1], np.uint64), 1) == b"\x8d"
    assert encode_block(np.array([3, 1], np.uint64), 4) == b"\x13"
    assert encode_block(np.array([1, 258], np.uint64), 16) == b"\x00\x01\x01\x02"
