"""vpc (VHD): CHS sizing and creator rules as qemu-img 7.2, dynamic and fixed images both ways,
the corpus (Hyper-V, Virtual PC, Disk2vhd, Windows, qemu), hostile headers."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess

import pytest

from tests.conftest import decompress_to, guest_sha256, run_qimg, sha256_file, write_pattern
from tests.formats.test_vdi import (
    assert_info_same,
    one_line_error,
    open_driver,
    qemu_info,
    qemu_map,
    qimg_map,
    random_reads,
)

MiB = 1 << 20
PATTERN = [(0, 70000), (3 * MiB - 100, MiB + 200), (5 * MiB - 1000, 3000), (19 * MiB, MiB)]
VARIANTS = [None, "subformat=fixed", "force_size=on", "subformat=fixed,force_size=on"]


def vsize(img, fmt="vpc"):
    return json.loads(qemu_info(img, fmt, "--output=json"))["virtual-size"]


def qimg_vsize(img, fmt="vpc"):
    r = run_qimg("info", "--output=json", "-f", fmt, img)
    assert r.rc == 0, r.err
    return json.loads(r.out)["virtual-size"]


def refooter(raw: bytearray, edits):
    """Apply (offset, struct format, value) edits to both footer copies and fix their checksums."""
    from qimg.formats.vpc import vpc_checksum

    for base in {0, len(raw) - 512}:
        if raw[base:base + 8] != b"conectix":
            continue
        for off, fmt, value in edits:
            struct.pack_into(fmt, raw, base + off, value)
        raw[base + 64:base + 68] = bytes(4)
        struct.pack_into(">I", raw, base + 64, vpc_checksum(bytes(raw[base:base + 512])))
    return raw


@pytest.fixture
def pattern(tmp_path):
    return write_pattern(tmp_path / "pattern.raw", 20 * MiB, PATTERN)


def test_options_help_matches_qemu(oracle):
    assert run_qimg("create", "-f", "vpc", "-o", "help").out == oracle("create", "-f", "vpc", "-o", "help").out


@pytest.mark.parametrize("opts", [None, "subformat=fixed", "force_size", "force_size=off,subformat=dynamic",
                                  "subformat=fixed,force_size=on,preallocation=falloc"])
def test_formatting_line(oracle, tmp_path, opts):
    mine, theirs = tmp_path / "a.vhd", tmp_path / "b.vhd"
    extra = ["-o", opts] if opts else []
    r = run_qimg("create", "-f", "vpc", *extra, mine, "10M")
    q = oracle("create", "-f", "vpc", *extra, theirs, "10M")
    assert r.rc == 0, r.err
    assert r.out.replace(str(mine), "X") == q.out.replace(str(theirs), "X")
    assert mine.stat().st_size == theirs.stat().st_size
    assert vsize(mine) == vsize(theirs) == qimg_vsize(mine)


@pytest.mark.parametrize("size", ["0", "1", "511", "34817", "100M", "1G", "5000000000", "127G", "128G", "2040G"])
@pytest.mark.parametrize("opts", ["subformat=dynamic", "force_size=on"])
def test_create_geometry_matches_qemu(oracle, tmp_path, size, opts):
    mine, theirs = tmp_path / "a.vhd", tmp_path / "b.vhd"
    assert run_qimg("create", "-f", "vpc", "-o", opts, mine, size).rc == 0
    oracle("create", "-f", "vpc", "-o", opts, theirs, size)
    a, b = mine.read_bytes()[:512], theirs.read_bytes()[:512]
    # cookie..data offset, creator, sizes, geometry and type are the same; time, checksum and uuid differ
    assert a[:24] == b[:24] and a[28:64] == b[28:64]
    assert vsize(mine) == vsize(theirs) == qimg_vsize(mine)
    assert mine.stat().st_size == theirs.stat().st_size


def test_create_too_large(tmp_path):
    r = run_qimg("create", "-f", "vpc", tmp_path / "x.vhd", "2041G")
    assert r.rc == 1 and "The image size is too large for file format 'vpc'" in r.err
    r = run_qimg("create", "-f", "vpc", "-o", "subformat=foo", tmp_path / "x.vhd", "1M")
    assert r.rc == 1 and "Parameter 'subformat' does not accept value 'foo'" in r.err


@pytest.mark.parametrize("opts", VARIANTS)
def test_qemu_written_images(oracle, tmp_path, pattern, opts):
    img = tmp_path / "q.vhd"
    oracle("convert", "-O", "vpc", *(["-o", opts] if opts else []), pattern, img)
    size = vsize(img)
    assert qimg_vsize(img) == size
    assert guest_sha256(img, "vpc") == hashlib.sha256(pattern.read_bytes().ljust(size, b"\0")).hexdigest()
    random_reads(img, "vpc", pattern, 2 * MiB)
    assert qimg_map(img, "vpc") == qemu_map(img, "vpc")
    for extra in ([], ["--output=json"]):
        assert_info_same(img, "vpc", *extra)


def test_fixed_probes_as_raw(oracle, tmp_path):
    from qimg.formats.vpc import VpcDriver

    dyn, fixed = tmp_path / "d.vhd", tmp_path / "f.vhd"
    oracle("create", "-f", "vpc", dyn, "4M")
    oracle("create", "-f", "vpc", "-o", "subformat=fixed", fixed, "4M")
    assert VpcDriver.probe(dyn.read_bytes()[:2048], str(dyn)) == 100
    assert VpcDriver.probe(fixed.read_bytes()[:2048], str(fixed)) == 0
    assert json.loads(oracle("info", "--output=json", fixed).out)["format"] == "raw"
    # the explicit opt-in reads it as a VHD
    assert qimg_vsize(fixed) == vsize(fixed) >= 4 * MiB


@pytest.mark.parametrize("creator,use_size", [(b"win ", True), (b"d2v ", True), (b"qem2", True), (b"CTXS", True),
                                              (b"tap\0", True), (b"vpc ", False), (b"qemu", False),
                                              (b"vs  ", False)])
def test_creator_size_rule(oracle, tmp_path, creator, use_size):
    img = tmp_path / "c.vhd"
    oracle("create", "-f", "vpc", img, "10M")
    raw = refooter(bytearray(img.read_bytes()), [(28, "4s", creator), (48, ">Q", 10 * MiB)])
    img.write_bytes(bytes(raw))
    q = vsize(img)
    assert qimg_vsize(img) == q
    assert (q == 10 * MiB) == use_size


@pytest.mark.parametrize("opts", VARIANTS)
def test_convert_to_vpc_checked_by_qemu(oracle, tmp_path, pattern, opts):
    img = tmp_path / "m.vhd"
    extra = ["-o", opts] if opts else []
    r = run_qimg("convert", "-f", "raw", "-O", "vpc", *extra, pattern, img)
    assert r.rc == 0, r.err
    assert oracle("compare", "-f", "vpc", "-F", "raw", img, pattern).rc == 0
    q = tmp_path / "q.vhd"
    oracle("convert", "-O", "vpc", *extra, pattern, q)
    assert vsize(img) == vsize(q)
    assert qemu_map(img, "vpc") == qemu_map(q, "vpc") or "fixed" in (opts or "")
    oracle("convert", "-f", "vpc", "-O", "raw", img, tmp_path / "back.raw")
    assert file_head_sha(tmp_path / "back.raw", 20 * MiB) == sha256_file(pattern)


def file_head_sha(path, n):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def test_writes_across_blocks_and_reopen(oracle, tmp_path):
    img = tmp_path / "w.vhd"
    oracle("create", "-f", "vpc", img, "9M")
    size = vsize(img)
    ref = bytearray(size)
    rnd = random.Random(5)
    writes = [(2 * MiB - 10, 20), (4 * MiB + 5, 3 * MiB), (0, 512), (size - 4096, 4096), (2 * MiB - 4096, 8192)]
    for round_ in range(2):  # the second round reopens and writes into allocated and new blocks
        drv = open_driver(img, "vpc", writable=True)
        for off, n in writes:
            off = (off + round_ * 777) % (size - n)
            data = rnd.randbytes(n)
            drv.pwrite(off, data)
            ref[off:off + n] = data
        drv.close()
    (tmp_path / "ref.raw").write_bytes(bytes(ref))
    assert oracle("compare", "-f", "vpc", "-F", "raw", img, tmp_path / "ref.raw").rc == 0
    assert guest_sha256(img, "vpc") == hashlib.sha256(bytes(ref)).hexdigest()


def test_no_check(tmp_path, oracle):
    from qimg.errors import CheckUnsupported

    img = tmp_path / "n.vhd"
    oracle("create", "-f", "vpc", img, "1M")
    drv = open_driver(img, "vpc")
    with pytest.raises(CheckUnsupported):
        drv.check()
    drv.close()


CORPUS = ["hyperv2012r2-dynamic.vhd.bz2", "virtualpc-dynamic.vhd.bz2", "d2v-zerofilled.vhd.bz2", "fixed.vhd.gz",
          "dynamic.vhd.gz", "image.vhd", "fat-differential.vhd"]


@pytest.mark.parametrize("name", CORPUS)
def test_corpus(shared_images, expected_images, tmp_path, name, oracle):
    from qimg.core.chain import Chain

    exp = expected_images["images"][f"vpc/{name}"]
    img = decompress_to(shared_images / "vpc" / name, tmp_path)
    assert qimg_vsize(img) == exp["virtual_size"]
    with Chain.open(str(img), "vpc") as ch:
        head = ch.read(0, min(ch.virtual_size, 64 * MiB))
    assert hashlib.sha256(head).hexdigest() == exp["raw_head_64MiB_sha256"]
    if exp["raw_sha256"]:
        assert guest_sha256(img, "vpc") == exp["raw_sha256"]
    for extra in ([], ["--output=json"]):
        assert_info_same(img, "vpc", *extra)
    if exp["virtual_size"] < (1 << 30):
        assert qimg_map(img, "vpc") == qemu_map(img, "vpc")


def test_afl5_refused_like_qemu(shared_images, tmp_path):
    img = decompress_to(shared_images / "vpc" / "afl5.img.bz2", tmp_path)
    line = one_line_error(run_qimg("info", "-f", "vpc", img))
    q = subprocess.run(["qemu-img", "info", str(img)], capture_output=True, text=True, check=False)
    assert q.returncode == 1
    assert line.split(": ", 2)[2] == q.stderr.strip().split(": ", 2)[2] == "Max Table Entries too large (1073741825)"


HOSTILE = [
    ("checksum", [(64, ">I", 1)], False, "Incorrect header checksum"),
    ("block size", [(512 + 32, ">I", 3000)], None, "Invalid block size 3000"),
    ("small block", [(512 + 32, ">I", 256)], None, "Invalid block size 256"),
    ("page table", [(512 + 28, ">I", 2)], None, "Page table too small"),
    ("table entries", [(512 + 28, ">I", 0x40000001)], None, "Max Table Entries too large (1073741825)"),
    ("bat offset", [(512 + 16, ">Q", 1 << 40)], None, "free_data_block_offset points after the end of file"),
    ("bat entry", [(1536, ">I", 0x7FFFFFF0)], None, "free_data_block_offset points after the end of file"),
    ("dyn offset", [(16, ">Q", 1 << 40)], True, "Invalid header magic"),
    ("dyn magic", [(512, "8s", b"xxsparse")], None, "Invalid header magic"),
    ("too large", [(28, "4s", b"win "), (48, ">Q", 1 << 50)], True, "File too large"),
]


@pytest.mark.parametrize("name,edits,footer,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_headers(oracle, tmp_path, pattern, name, edits, footer, message):
    img = tmp_path / "h.vhd"
    oracle("convert", "-O", "vpc", pattern, img)
    raw = bytearray(img.read_bytes())
    if footer:
        refooter(raw, edits)
    else:
        for off, fmt, value in edits:
            struct.pack_into(fmt, raw, off, value)
            if footer is False:
                struct.pack_into(fmt, raw, len(raw) - 512 + off, value)
    img.write_bytes(bytes(raw))
    q = subprocess.run(["qemu-img", "info", "-f", "vpc", str(img)], capture_output=True, text=True, check=False)
    assert q.returncode == 1 and message in q.stderr
    for args in (("info", "-f", "vpc", img), ("convert", "-f", "vpc", "-O", "raw", img, tmp_path / "o.raw")):
        assert message in one_line_error(run_qimg(*args))


def test_truncated_files(tmp_path):
    img = tmp_path / "t.vhd"
    img.write_bytes(b"conectix" + bytes(100))
    one_line_error(run_qimg("info", "-f", "vpc", img))
    img.write_bytes(b"")
    one_line_error(run_qimg("info", "-f", "vpc", img))


def test_check_command_unsupported(oracle, tmp_path):
    img = tmp_path / "n.vhd"
    oracle("create", "-f", "vpc", img, "1M")
    r = run_qimg("check", "-f", "vpc", img)
    assert r.rc == 63 and r.err == "qimg: This image format does not support checks\n"


def test_new_block_over_trailing_bytes_reads_zeros(oracle, tmp_path):
    """Bytes after the footer (where the next block goes) must not leak into a new block."""
    img = tmp_path / "t.vhd"
    oracle("create", "-f", "vpc", img, "8M")
    with open(img, "ab") as f:
        f.write(b"\xaa" * (3 * MiB))
    drv = open_driver(img, "vpc", writable=True)
    drv.pwrite(MiB, b"\x55" * 4096)
    drv.close()
    ref = bytearray(vsize(img))
    ref[MiB:MiB + 4096] = b"\x55" * 4096
    assert guest_sha256(img, "vpc") == hashlib.sha256(bytes(ref)).hexdigest()
    (tmp_path / "ref.raw").write_bytes(bytes(ref))
    assert oracle("compare", "-f", "vpc", "-F", "raw", img, tmp_path / "ref.raw").rc == 0


def test_probing_through_the_cli(oracle, tmp_path):
    dyn, fixed = tmp_path / "d.vhd", tmp_path / "f.vhd"
    oracle("create", "-f", "vpc", dyn, "4M")
    oracle("create", "-f", "vpc", "-o", "subformat=fixed", fixed, "4M")
    for img, fmt in ((dyn, "vpc"), (fixed, "raw")):
        r = run_qimg("info", "--output=json", img)
        assert r.rc == 0, r.err
        assert json.loads(r.out)["format"] == fmt == json.loads(oracle("info", "--output=json", img).out)["format"]


def test_short_fixed_image_reads_like_qemu(oracle, tmp_path, pattern):
    img = tmp_path / "f.vhd"
    oracle("convert", "-O", "vpc", "-o", "subformat=fixed", pattern, img)
    data = img.read_bytes()
    img.write_bytes(data[:len(data) - 512 - MiB] + data[-512:])
    oracle("convert", "-f", "vpc", "-O", "raw", img, tmp_path / "q.raw")
    assert guest_sha256(img, "vpc") == sha256_file(tmp_path / "q.raw")
    size = vsize(img)  # before qimg holds the image read-write: qemu-img info honours its lock
    drv = open_driver(img, "vpc", writable=True)
    with pytest.raises(Exception, match="beyond the data area"):
        drv.pwrite(size - 4096, bytes(4096))
    drv.close()
