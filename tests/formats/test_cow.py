"""cow (UML copy-on-write): create with -b, writes, read through the backing file, v1/v2/v3 headers."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

from tests.conftest import guest_sha256, open_rw, run_qimg, sha256_file, write_pattern

MAGIC = 0x4F4F4F4D


def _v1(name, size, ss=512, le=True):
    e = "<" if le else ">"
    return struct.pack(e + "II256sIQi", MAGIC, 1, name, 0, size, ss), 280, ss


def _v2(name, size, ss=512):
    return struct.pack(">II4096sIQi", MAGIC, 2, name, 0, size, ss), 4120, ss


def _v3(name, size, ss=512, align=4096, broken=False):
    if broken:
        hdr = struct.pack(">IIqQIII4096s", MAGIC, 3, 0, size, ss, align, 0, name)
        return hdr, len(hdr), align
    return struct.pack(">IIIQIII4096s", MAGIC, 3, 0, size, ss, align, 0, name), 4128, align


def craft(path, kind, backing_name, size, sectors, seed=4):
    """A COW file of the given header kind with random data in ``sectors``; returns {sector: bytes}."""
    rnd = random.Random(seed)
    name = backing_name.encode()
    hdr, hsize, align = {"v1": lambda: _v1(name, size), "v1be": lambda: _v1(name, size, le=False),
                         "v2": lambda: _v2(name, size), "v3": lambda: _v3(name, size),
                         "v3broken": lambda: _v3(name, size, broken=True)}[kind]()
    ss = 512
    if kind.startswith("v3"):
        bitmap_off = -(-hsize // align) * align
        bitmap_len = (-(-size // ss) + 7) // 8
        data_off = -(-(bitmap_off + bitmap_len) // align) * align
    else:
        bitmap_off = hsize
        bitmap_len = (size + ss - 1) // (8 * ss)
        data_off = -(-(bitmap_off + bitmap_len) // ss) * ss
    bitmap = bytearray(bitmap_len)
    out = bytearray(data_off + size)
    out[:len(hdr)] = hdr
    written = {}
    for s in sectors:
        bitmap[s // 8] |= 1 << (s % 8)
        written[s] = rnd.randbytes(ss)
        out[data_off + s * ss:data_off + (s + 1) * ss] = written[s]
    out[bitmap_off:bitmap_off + bitmap_len] = bitmap
    path.write_bytes(out)
    return written


@pytest.mark.parametrize("kind", ["v1", "v1be", "v2", "v3", "v3broken"])
def test_read_header_versions(tmp_path, kind):
    base = write_pattern(tmp_path / "base.raw", 1 << 20, [(0, 1 << 20)])
    img = tmp_path / "o.cow"
    written = craft(img, kind, "base.raw", 1 << 20, [0, 1, 7, 8, 100, 2047])
    expect = bytearray(base.read_bytes())
    for s, b in written.items():
        expect[s * 512:(s + 1) * 512] = b
    r = run_qimg("info", img)
    assert r.rc == 0, r.err
    assert "file format: cow" in r.out and "backing file: base.raw" in r.out
    assert guest_sha256(img) == hashlib.sha256(expect).hexdigest()
    from qimg.core.chain import Chain

    with Chain.open(str(img)) as ch:
        exts = [(e.start, e.length, e.depth) for e in ch.extents() if e.depth == 0]
        assert exts[0] == (0, 1024, 0) and (3584, 1024, 0) in exts


def test_create_write_commit(tmp_path):
    base = write_pattern(tmp_path / "base.raw", 4 << 20, [(0, 4 << 20)])
    img = tmp_path / "o.cow"
    r = run_qimg("create", "-f", "cow", "-b", "base.raw", "-F", "raw", img)
    assert r.rc == 0, r.err
    assert r.out == f"Formatting '{img}', fmt=cow size=4194304 backing_file=base.raw backing_fmt=raw\n"
    assert guest_sha256(img) == sha256_file(base)

    expect = bytearray(base.read_bytes())
    drv = open_rw(str(img), "cow")
    try:
        for off, data in ((100, b"A" * 50), (1000, b"B" * 5000), ((4 << 20) - 3, b"C" * 3)):
            drv.pwrite(off, data)
            expect[off:off + len(data)] = data
        drv.write_zeroes(2 << 20, 777)
        expect[2 << 20:(2 << 20) + 777] = bytes(777)
    finally:
        drv.close()
    assert guest_sha256(img) == hashlib.sha256(expect).hexdigest()
    out = tmp_path / "flat.raw"
    assert run_qimg("convert", "-O", "raw", img, out).rc == 0
    assert out.read_bytes() == bytes(expect)
    # the header stays a valid version 3 UML header
    hdr = img.read_bytes()[:40]
    assert struct.unpack_from(">IIIQIII", hdr) [:2] == (MAGIC, 3)
    # emptying drops the overlay data
    drv = open_rw(str(img), "cow")
    drv.make_empty()
    drv.close()
    assert guest_sha256(img) == sha256_file(base)


def test_convert_into_cow_with_backing(tmp_path):
    write_pattern(tmp_path / "base.raw", 2 << 20, [(0, 1 << 20)])
    top = write_pattern(tmp_path / "top.raw", 2 << 20, [(0, 1 << 20), (1 << 20, 4096)], seed=9)
    out = tmp_path / "t.cow"
    r = run_qimg("convert", "-O", "cow", "-B", "base.raw", "-F", "raw", top, out)
    assert r.rc == 0, r.err
    assert guest_sha256(out) == sha256_file(top)


def test_set_backing(tmp_path):
    write_pattern(tmp_path / "a.raw", 1 << 20, [(0, 4096)])
    write_pattern(tmp_path / "b.raw", 1 << 20, [(0, 4096)], seed=8)
    img = tmp_path / "o.cow"
    assert run_qimg("create", "-f", "cow", "-b", "a.raw", "-F", "raw", img).rc == 0

    drv = open_rw(str(img), "cow")
    drv.set_backing("b.raw", "raw")
    drv.close()
    assert guest_sha256(img) == sha256_file(tmp_path / "b.raw")


@pytest.mark.parametrize("patch,needle", [
    ((4, struct.pack(">I", 9)), "Unsupported cow version 9"),
    ((20, struct.pack(">I", 100)), "cow sector size 100"),
    ((20, struct.pack(">I", 1 << 20)), "cow sector size"),
    ((24, struct.pack(">I", 1 << 30)), "cow alignment"),
    ((12, struct.pack(">Q", 1 << 63)), "cow disk size"),
    ((28, struct.pack(">I", 7)), "cow format 7"),
])
def test_hostile(tmp_path, patch, needle):
    write_pattern(tmp_path / "a.raw", 1 << 20, [(0, 4096)])
    img = tmp_path / "o.cow"
    assert run_qimg("create", "-f", "cow", "-b", "a.raw", "-F", "raw", img).rc == 0
    d = bytearray(img.read_bytes())
    off, b = patch
    d[off:off + len(b)] = b
    img.write_bytes(d)
    r = run_qimg("info", "-f", "cow", img)
    assert r.rc == 1 and needle in r.err and r.err.count("\n") == 1
