"""bochs: the corpus image, crafted growing images (v1 and v2 headers) against qemu-img, hostile headers."""

from __future__ import annotations

import hashlib
import json
import random
import struct

import pytest

from tests.conftest import decompress_to, guest_sha256, run_qimg, sha256_file


def make_bochs(path, disk=1 << 20, extent=4096, seed=3, v1=False, allocated=(0, 3, -1)):
    """A Bochs growing redolog with random sector bitmaps; returns the expected guest bytes."""
    rnd = random.Random(seed)
    catalog = (disk + extent - 1) // extent
    hdr = bytearray(512)
    hdr[0:22] = b"Bochs Virtual HD Image"
    hdr[32:39] = b"Redolog"
    hdr[48:55] = b"Growing"
    struct.pack_into("<IIIII", hdr, 64, 0x10000 if v1 else 0x20000, 512, catalog, 1, extent)
    struct.pack_into("<Q", hdr, 84 if v1 else 88, disk)
    cat = [0xFFFFFFFF] * catalog
    blocks = []
    expect = bytearray(disk)
    for i, idx in enumerate(allocated):
        idx %= catalog
        cat[idx] = i
        bits = rnd.getrandbits(extent // 512)
        data = rnd.randbytes(extent)
        blocks.append(bits.to_bytes((extent // 512 + 7) // 8, "little").ljust(512, b"\0") + data)
        for s in range(extent // 512):
            if bits >> s & 1:
                expect[idx * extent + s * 512:idx * extent + (s + 1) * 512] = data[s * 512:(s + 1) * 512]
    path.write_bytes(bytes(hdr) + struct.pack(f"<{catalog}I", *cat) + b"".join(blocks))
    return bytes(expect)


def test_corpus_empty(shared_images, expected_images, tmp_path, oracle):
    exp = expected_images.get("images", expected_images)["bochs/empty.bochs.bz2"]
    img = decompress_to(shared_images / "bochs" / "empty.bochs.bz2", tmp_path)
    assert guest_sha256(img) == exp["raw_sha256"]
    for args in ([], ["--output=json"]):
        assert run_qimg("info", *args, img).out == oracle("info", *args, img).out
    assert run_qimg("map", "--output=json", img).out == oracle("map", "--output=json", img).out


@pytest.mark.parametrize("v1", [False, True])
def test_crafted_against_qemu(tmp_path, oracle, v1):
    img = tmp_path / "d.bochs"
    expect = make_bochs(img, v1=v1)
    raw = tmp_path / "q.raw"
    oracle("convert", "-O", "raw", img, raw)
    assert sha256_file(raw) == hashlib.sha256(expect).hexdigest()
    assert guest_sha256(img) == hashlib.sha256(expect).hexdigest()
    # unaligned reads across sector and extent boundaries
    from qimg.core.chain import Chain

    with Chain.open(str(img)) as ch:
        for off, n in ((100, 1000), (4000, 200), (12287, 4098), ((1 << 20) - 5000, 5000)):
            assert ch.read(off, n) == expect[off:off + n]


def test_read_only(tmp_path):
    img = tmp_path / "d.bochs"
    make_bochs(img)
    r = run_qimg("convert", "-O", "bochs", img, tmp_path / "x.bochs")
    assert r.rc == 1


@pytest.mark.parametrize("off,value,needle", [
    (72, 0x7FFFFFFF, "bochs catalog entries"),
    (80, 100, "Extent size 100"),
    (80, 0x7FFFFFFF, "bochs extent size"),
    (76, 0, "bochs bitmap size 0"),
    (68, 0x7FFFFFFF, "bochs header size"),
])
def test_hostile(tmp_path, off, value, needle):
    img = tmp_path / "h.bochs"
    make_bochs(img)
    d = bytearray(img.read_bytes())
    struct.pack_into("<I", d, off, value)
    img.write_bytes(d)
    r = run_qimg("info", img)
    assert r.rc == 1 and needle in r.err and r.err.count("\n") == 1


def test_hostile_disk_size(tmp_path):
    img = tmp_path / "h.bochs"
    make_bochs(img)
    d = bytearray(img.read_bytes())
    struct.pack_into("<Q", d, 88, 1 << 50)
    img.write_bytes(d)
    r = run_qimg("info", img)
    assert r.rc == 1 and "Catalog size is too small" in r.err
    assert json.loads(run_qimg("info", "--output=json", "-f", "raw", img).out)["format"] == "raw"
