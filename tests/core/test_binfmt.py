"""binfmt.Record: fields by name both ways, reserved fields zero, mistakes refused."""

from __future__ import annotations

import pytest

from qimg.binfmt import Record

R = Record("<", ("signature", "4s"), ("count", "I"), ("_reserved", "4s"), ("offset", "Q"))


def test_pack_unpack_by_name():
    raw = R.pack(signature=b"regi", count=2, offset=1 << 40)
    assert raw == b"regi" + b"\x02\0\0\0" + bytes(4) + (1 << 40).to_bytes(8, "little")
    assert R.size == len(raw) == 20
    assert R.unpack(b"xx" + raw, 2) == {"signature": b"regi", "count": 2, "_reserved": bytes(4), "offset": 1 << 40}
    buf = bytearray(24)
    R.pack_into(buf, 4, signature=b"regi", count=2, offset=1 << 40)
    assert bytes(buf[4:]) == raw


def test_mistakes_are_refused():
    with pytest.raises(TypeError, match="missing fields: offset"):
        R.pack(signature=b"regi", count=2)
    with pytest.raises(TypeError, match="unknown fields: cuont"):
        R.pack(signature=b"regi", cuont=2, offset=0)
    with pytest.raises(ValueError):
        Record("<", ("a", "I"), ("a", "I"))
