"""dmg: corpus images, crafted UDIF images (plist and resource fork; zlib, bzip2, ADC, raw, zero,
ignore chunks) against qemu-img where it can read them, the ADC decoder, hostile trailers."""

from __future__ import annotations

import bz2
import hashlib
import plistlib
import random
import struct
import zlib

import pytest

from tests.conftest import guest_sha256, qemu, run_qimg, sha256_file

ZERO, RAW, IGNORE, ADC, ZLIB, BZIP2, TERM = 0, 1, 2, 0x80000004, 0x80000005, 0x80000006, 0xFFFFFFFF


def adc_encode(data: bytes) -> bytes:
    """A tiny ADC encoder: literals, plus back-references for runs repeating at distance 3."""
    out = bytearray()
    i = 0
    lit = bytearray()

    def flush():
        nonlocal lit
        while lit:
            part, lit = lit[:128], lit[128:]
            out.append(0x80 | (len(part) - 1))
            out.extend(part)

    while i < len(data):
        run = 0
        while i >= 3 and i + run < len(data) and data[i + run] == data[i + run - 3] and run < 67:
            run += 1
        if run >= 4:
            flush()
            if run <= 18 and run % 2:
                out += bytes([((run - 3) << 2) | 0, 2])             # two-byte code, distance 3
            else:
                out += bytes([0x40 | (run - 4), 0, 2])              # three-byte code, distance 3
            i += run
        else:
            lit.append(data[i])
            i += 1
    flush()
    return bytes(out)


def _mish(first_sector, chunks):
    """chunks: (type, sector_in_block, sectors, offset, length)."""
    total = max((c[1] + c[2] for c in chunks), default=0)
    head = bytearray(204)
    head[0:4] = b"mish"
    struct.pack_into(">IQQQII", head, 4, 1, first_sector, total, 0, 0, 0)
    struct.pack_into(">I", head, 200, len(chunks) + 1)
    body = b"".join(struct.pack(">IIQQQQ", t, 0, s, n, o, ln) for t, s, n, o, ln in chunks)
    return bytes(head) + body + struct.pack(">IIQQQQ", TERM, 0, total, 0, 0, 0)


def _rsrc(blocks):
    data = b"".join(struct.pack(">I", len(b)) + b for b in blocks)
    data_off = 256
    map_rel_types = 28
    refs = bytearray()
    pos = 0
    for i, b in enumerate(blocks):
        refs += struct.pack(">HHII", i, 0xFFFF, pos, 0)
        pos += 4 + len(b)
    types = struct.pack(">H4sHH", 0, b"blkx", len(blocks) - 1, 2 + 8)
    mp = bytearray(28)
    struct.pack_into(">HH", mp, 24, map_rel_types, 0)
    mp += types + refs
    map_off = data_off + len(data)
    hdr = struct.pack(">IIII", data_off, map_off, len(data), len(mp)).ljust(data_off, b"\0")
    return hdr + data + bytes(mp)


def make_dmg(path, kinds, mode="plist", seed=5):
    """A UDIF image: one mish block per entry of ``kinds`` (each 64 KiB of guest data)."""
    rnd = random.Random(seed)
    sectors = 128
    data_fork = bytearray()
    blocks = []
    expect = bytearray()
    for k, kind in enumerate(kinds):
        plain = (rnd.randbytes(20000) + b"abc" * 8000 + bytes(65536))[:65536]
        first = k * sectors
        if kind in (ZERO, IGNORE):
            blocks.append(_mish(first, [(kind, 0, sectors, 0, 0)]))
            expect += bytes(65536)
            continue
        enc = {RAW: lambda b: b, ZLIB: zlib.compress, BZIP2: bz2.compress, ADC: adc_encode}[kind](plain)
        # two chunks per block to cover chunk boundaries inside a block
        half = len(plain) // 2
        enc1 = {RAW: lambda b: b, ZLIB: zlib.compress, BZIP2: bz2.compress, ADC: adc_encode}[kind](plain[:half])
        enc2 = {RAW: lambda b: b, ZLIB: zlib.compress, BZIP2: bz2.compress, ADC: adc_encode}[kind](plain[half:])
        del enc
        o1 = len(data_fork)
        data_fork += enc1
        o2 = len(data_fork)
        data_fork += enc2
        blocks.append(_mish(first, [(kind, 0, sectors // 2, o1, len(enc1)),
                                    (kind, sectors // 2, sectors // 2, o2, len(enc2))]))
        expect += plain
    total_sectors = len(kinds) * sectors
    xml_off = xml_len = rsrc_off = rsrc_len = 0
    tail = b""
    if mode == "plist":
        pl = {"resource-fork": {"blkx": [{"Attributes": "0x0050", "CFName": f"b{i}", "Data": b, "ID": str(i),
                                          "Name": f"b{i}"} for i, b in enumerate(blocks)]}}
        tail = plistlib.dumps(pl)
        xml_off, xml_len = len(data_fork), len(tail)
    else:
        tail = _rsrc(blocks)
        rsrc_off, rsrc_len = len(data_fork), len(tail)
    koly = bytearray(512)
    koly[0:4] = b"koly"
    struct.pack_into(">IIIQQQQQII", koly, 4, 4, 512, 1, 0, 0, len(data_fork), rsrc_off, rsrc_len, 1, 1)
    struct.pack_into(">QQ", koly, 216, xml_off, xml_len)
    struct.pack_into(">IQ", koly, 488, 1, total_sectors)
    path.write_bytes(bytes(data_fork) + tail + bytes(koly))
    return bytes(expect)


def test_adc_decoder():
    from qimg.formats.dmg import adc_decompress

    rnd = random.Random(1)
    data = rnd.randbytes(300) + b"xyz" * 100 + b"q" * 7 + rnd.randbytes(50) + b"abab" * 30
    enc = adc_encode(data)
    assert len(enc) < len(data)
    assert adc_decompress(enc, len(data)) == data
    # a run copied from one byte back (overlapping copy)
    assert adc_decompress(bytes([0x80, ord("z"), 0x40 | 6, 0, 0]), 11) == b"z" * 11


@pytest.mark.parametrize("name", ["simple-dmg.dmg.bz2", "hfsplus_zlib.dmg"])
def test_corpus(shared_images, expected_images, tmp_path, oracle, name):
    from tests.conftest import decompress_to

    exp = expected_images.get("images", expected_images)[f"dmg/{name}"]
    img = decompress_to(shared_images / "dmg" / name, tmp_path)
    assert guest_sha256(img) == exp["raw_sha256"]
    for args in ([], ["--output=json"]):
        assert run_qimg("info", *args, img).out == oracle("info", *args, img).out


@pytest.mark.parametrize("mode", ["plist", "rsrc"])
def test_crafted_qemu_readable(tmp_path, oracle, mode):
    img = tmp_path / "a.dmg"
    expect = make_dmg(img, [ZLIB, RAW, ZERO, IGNORE, ZLIB], mode)
    raw = tmp_path / "q.raw"
    oracle("convert", "-O", "raw", img, raw)
    assert sha256_file(raw) == hashlib.sha256(expect).hexdigest()
    assert guest_sha256(img) == hashlib.sha256(expect).hexdigest()
    assert run_qimg("map", "--output=json", img).out == oracle("map", "--output=json", img).out


@pytest.mark.parametrize("mode", ["plist", "rsrc"])
def test_crafted_bzip2_and_adc(tmp_path, mode):
    img = tmp_path / "b.dmg"
    expect = make_dmg(img, [BZIP2, ADC, ZERO, BZIP2, ADC], mode)
    assert guest_sha256(img) == hashlib.sha256(expect).hexdigest()
    from qimg.core.chain import Chain

    with Chain.open(str(img)) as ch:
        for off, n in ((1, 70000), (32760, 20), (65530, 131100)):
            assert ch.read(off, n) == expect[off:off + n]


def _patch_first_chunk(img, field_off, value, fmt=">Q"):
    """Patch a field of the first chunk of the first mish block inside the plist."""
    d = img.read_bytes()
    koly = d[-512:]
    xo, xl = struct.unpack_from(">QQ", koly, 216)
    pl = plistlib.loads(d[xo:xo + xl])
    m = bytearray(pl["resource-fork"]["blkx"][0]["Data"])
    struct.pack_into(fmt, m, 204 + field_off, value)
    pl["resource-fork"]["blkx"][0]["Data"] = bytes(m)
    tail = plistlib.dumps(pl)
    koly = bytearray(koly)
    struct.pack_into(">QQ", koly, 216, xo, len(tail))
    img.write_bytes(d[:xo] + tail + bytes(koly))


@pytest.mark.parametrize("field,value,fmt,needle", [
    (16, 1 << 40, ">Q", "Sector count"),
    (32, 1 << 40, ">Q", "Length"),
    (0, 0x80000009, ">I", "not supported"),
])
def test_hostile_chunks(tmp_path, field, value, fmt, needle):
    img = tmp_path / "h.dmg"
    make_dmg(img, [ZLIB, RAW])
    _patch_first_chunk(img, field, value, fmt)
    r = run_qimg("info", img)
    assert r.rc == 1 and needle in r.err and r.err.count("\n") == 1


def test_chunk_past_eof(tmp_path):
    """A chunk past the end of the file: qemu-img opens the image (and reads zeros); untrusted mode
    refuses it at open, naming the image and the offset."""
    img = tmp_path / "h.dmg"
    make_dmg(img, [ZLIB, RAW])
    _patch_first_chunk(img, 24, 1 << 40, ">Q")
    assert run_qimg("info", img).rc == qemu("info", img, check=False).rc == 0
    r = run_qimg("--untrusted", "info", img)
    assert r.rc == 1 and r.err.count("\n") == 1
    assert r.err.startswith(f"qimg: Could not open '{img}': dmg chunk at host offset 0x1") and "past the end" in r.err


def test_hostile_trailer(tmp_path):
    img = tmp_path / "h.dmg"
    make_dmg(img, [ZLIB])
    d = bytearray(img.read_bytes())
    struct.pack_into(">QQ", d, len(d) - 512 + 216, 10, 1 << 40)
    img.write_bytes(d)
    r = run_qimg("info", img)
    assert r.rc == 1 and "Invalid argument" in r.err  # qemu-img's answer: the plist overlaps the trailer
    d[-512:-508] = b"xxxx"
    img.write_bytes(d)
    r = run_qimg("info", "-f", "dmg", img)
    assert r.rc == 1 and "koly" in r.err
    img.write_bytes(b"<plist>" + bytes(600))
    struct.pack_into(">4s", d, len(d) - 512, b"koly")
    r = run_qimg("info", "-f", "dmg", img)
    assert r.rc == 1


def test_lzfse_chunk_refused_when_untrusted(tmp_path):
    """An LZFSE chunk is inflated by an optional decoder with no bound on its output: untrusted mode
    refuses the image at open, with one line naming the chunk; trusted mode opens it as qemu-img does."""
    img = tmp_path / "l.dmg"
    make_dmg(img, [ZLIB, RAW])
    _patch_first_chunk(img, 0, 0x80000007, ">I")
    assert run_qimg("info", img).rc == qemu("info", img, check=False).rc == 0
    r = run_qimg("--untrusted", "info", img)
    assert r.rc == 1 and r.err.count("\n") == 1
    assert r.err.startswith(f"qimg: Could not open '{img}': dmg chunk at host offset 0x0 is LZFSE-compressed")
