"""cloop: the corpus image, crafted images against qemu-img, hostile headers."""

from __future__ import annotations

import hashlib
import random
import struct
import zlib

import pytest

from tests.conftest import decompress_to, guest_sha256, run_qimg, sha256_file

PREAMBLE = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"


def make_cloop(path, block_size=65536, n_blocks=5, seed=2):
    rnd = random.Random(seed)
    blocks = [rnd.randbytes(block_size // 2) + bytes(block_size // 2) for _ in range(n_blocks)]
    blocks[2] = bytes(block_size)
    comp = [zlib.compress(b) for b in blocks]
    head = PREAMBLE.ljust(128, b"\0") + struct.pack(">II", block_size, n_blocks)
    pos = len(head) + 8 * (n_blocks + 1)
    offs = [pos]
    for c in comp:
        pos += len(c)
        offs.append(pos)
    path.write_bytes(head + struct.pack(f">{n_blocks + 1}Q", *offs) + b"".join(comp))
    return b"".join(blocks)


def test_corpus(shared_images, expected_images, tmp_path, oracle):
    exp = expected_images.get("images", expected_images)["cloop/simple-pattern.cloop.bz2"]
    img = decompress_to(shared_images / "cloop" / "simple-pattern.cloop.bz2", tmp_path)
    assert guest_sha256(img) == exp["raw_sha256"]
    for args in ([], ["--output=json"]):
        assert run_qimg("info", *args, img).out == oracle("info", *args, img).out
    assert run_qimg("map", "--output=json", img).out == oracle("map", "--output=json", img).out


def test_crafted_against_qemu(tmp_path, oracle):
    img = tmp_path / "c.cloop"
    expect = make_cloop(img)
    raw = tmp_path / "q.raw"
    oracle("convert", "-O", "raw", img, raw)
    assert sha256_file(raw) == hashlib.sha256(expect).hexdigest() == guest_sha256(img)
    from qimg.core.chain import Chain

    with Chain.open(str(img)) as ch:
        for off, n in ((1, 70000), (65530, 12), (200000, 127680)):
            assert ch.read(off, n) == expect[off:off + n]


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: struct.pack_into(">I", d, 128, 1000), "must be a multiple of 512"),
    (lambda d: struct.pack_into(">I", d, 128, 0), "block_size cannot be zero"),
    (lambda d: struct.pack_into(">I", d, 128, 1 << 30), "cloop block_size"),
    (lambda d: struct.pack_into(">I", d, 132, 0xFFFFFFFF), "cloop n_blocks"),
    (lambda d: struct.pack_into(">I", d, 132, 1000000), "extends past the end"),
    (lambda d: struct.pack_into(">Q", d, 136 + 16, 5), "not monotonically increasing"),
    (lambda d: struct.pack_into(">Q", d, 136 + 40, 1 << 40), "invalid compressed block size"),
])
def test_hostile(tmp_path, mutate, needle):
    img = tmp_path / "h.cloop"
    make_cloop(img)
    d = bytearray(img.read_bytes())
    mutate(d)
    img.write_bytes(d)
    r = run_qimg("info", "-f", "cloop", img)
    assert r.rc == 1 and needle in r.err and r.err.count("\n") == 1


def test_damaged_block(tmp_path):
    img = tmp_path / "h.cloop"
    make_cloop(img)
    d = bytearray(img.read_bytes())
    d[200:240] = bytes(40)
    img.write_bytes(d)
    r = run_qimg("convert", "-O", "raw", img, tmp_path / "o.raw")
    assert r.rc == 1 and "cloop block 0" in r.err
