"""vdi: VirtualBox images read as qemu-img reads them, qemu-made variants, qimg-written images
checked by qemu-img, check, map and info agreement, hostile headers."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import decompress_to, guest_sha256, run_qimg, sha256_file, write_pattern

MiB = 1 << 20
PATTERN = [(0, 70000), (3 * MiB - 100, MiB + 200), (5 * MiB - 1000, 3000), (19 * MiB, MiB)]


# ----- helpers shared with test_vpc.py and test_vhdx.py -----
def qemu_map(img, fmt):
    p = subprocess.run(["qemu-img", "map", "--output=json", "-f", fmt, str(img)], capture_output=True, text=True,
                       check=True)
    return json.loads(p.stdout)


def qimg_map(img, fmt):
    """qemu-img map --output=json's entries, computed from qimg's block status."""
    from qimg.core.chain import Chain
    from qimg.core.extent import coalesce

    out = []
    with Chain.open(str(img), fmt) as ch:
        for e in coalesce(ch.extents()):
            d = {"start": e.start, "length": e.length, "depth": e.depth, "present": e.present, "zero": e.zero,
                 "data": e.data}
            if e.offset is not None:
                d["offset"] = e.offset
            out.append(d)
    return out


def qemu_info(img, fmt, *extra):
    p = subprocess.run(["qemu-img", "info", *extra, "-f", fmt, str(img)], capture_output=True, text=True, check=False)
    return p.stdout


def assert_info_same(img, fmt, *extra):
    """qimg info == qemu-img info (byte for byte); a fresh file's disk usage may settle between the runs."""
    before = qemu_info(img, fmt, *extra)
    mine = run_qimg("info", *extra, "-f", fmt, img).out
    assert mine in (before, qemu_info(img, fmt, *extra))


def random_reads(img, fmt, raw_path, block, count=40, seed=7):
    """Random reads (many crossing a block boundary) compared with the raw file."""
    from qimg.core.chain import Chain

    rnd = random.Random(seed)
    data = Path(raw_path).read_bytes()
    with Chain.open(str(img), fmt) as ch:
        size = ch.virtual_size
        for _ in range(count):
            b = rnd.randrange(1, max(2, size // block))
            off = max(0, b * block - rnd.randrange(1, 70000))
            n = min(rnd.randrange(1, 3 * block // 2), size - off)
            want = data[off:off + n].ljust(n, b"\0")
            assert ch.read(off, n) == want, (off, n)


def file_sha(path, size=None):
    data = Path(path).read_bytes()
    if size is not None:
        data = data[:size].ljust(size, b"\0")
    return hashlib.sha256(data).hexdigest()


def open_driver(img, fmt, writable=False, options=None):
    from qimg.core import registry

    return registry.open_image(str(img), fmt, writable, options)


def one_line_error(r):
    assert r.rc == 1, (r.rc, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qimg: "), r.err
    assert "Traceback" not in r.err
    return lines[0]


@pytest.fixture
def pattern(tmp_path):
    return write_pattern(tmp_path / "pattern.raw", 20 * MiB, PATTERN)


# ----- create: options, -o help, "Formatting" lines -----
def test_options_help_matches_qemu(oracle):
    assert run_qimg("create", "-f", "vdi", "-o", "help").out == oracle("create", "-f", "vdi", "-o", "help").out


@pytest.mark.parametrize("opts", [None, "static=on", "static=off,preallocation=off", "preallocation=full",
                                  "static=on,preallocation=falloc"])
def test_formatting_line_and_layout(oracle, tmp_path, opts):
    mine, theirs = tmp_path / "a.vdi", tmp_path / "b.vdi"
    extra = ["-o", opts] if opts else []
    r = run_qimg("create", "-f", "vdi", *extra, mine, "10M")
    q = oracle("create", "-f", "vdi", *extra, theirs, "10M")
    assert r.rc == 0, r.err
    assert r.out.replace(str(mine), "X") == q.out.replace(str(theirs), "X")
    a, b = open(mine, "rb").read(), open(theirs, "rb").read()
    assert len(a) == len(b)
    # identical apart from the two random UUIDs
    assert a[:392] == b[:392] and a[424:] == b[424:]
    assert oracle("check", mine).rc == 0


def test_create_sizes_and_errors(oracle, tmp_path):
    for size in ("1", "511", "513", "1G", "3T"):
        img = tmp_path / f"s{size}.vdi"
        assert run_qimg("create", "-f", "vdi", img, size).rc == 0
        assert json.loads(qemu_info(img, "vdi", "--output=json"))["virtual-size"] == \
            json.loads(run_qimg("info", "--output=json", "-f", "vdi", img).out)["virtual-size"]
    r = run_qimg("create", "-f", "vdi", tmp_path / "big.vdi", "1P")
    q = subprocess.run(["qemu-img", "create", "-f", "vdi", str(tmp_path / "big.vdi"), "1P"],
                       capture_output=True, check=False, text=True)
    assert r.rc == 1 and q.returncode == 1
    assert r.err.split(": ", 2)[2] == q.stderr.split(": ", 2)[2]
    r = run_qimg("create", "-f", "vdi", "-o", "preallocation=metadata", tmp_path / "m.vdi", "1M")
    assert r.rc == 1 and "Unsupported preallocation mode: metadata" in r.err
    r = run_qimg("create", "-f", "vdi", "-o", "cluster_size=4k", tmp_path / "m.vdi", "1M")
    assert r.rc == 1 and "Invalid parameter 'cluster_size'" in r.err


# ----- reading what qemu-img writes -----
@pytest.mark.parametrize("opts", [None, "static=on"])
def test_qemu_written_images(oracle, tmp_path, pattern, opts):
    img = tmp_path / "q.vdi"
    oracle("convert", "-O", "vdi", *(["-o", opts] if opts else []), pattern, img)
    assert guest_sha256(img, "vdi") == sha256_file(pattern)
    random_reads(img, "vdi", pattern, MiB)
    assert qimg_map(img, "vdi") == qemu_map(img, "vdi")
    for extra in ([], ["--output=json"]):
        assert_info_same(img, "vdi", *extra)


def test_probe():
    from qimg.formats.vdi import VdiDriver

    head = bytearray(512)
    struct.pack_into("<I", head, 64, 0xBEDA107F)
    assert VdiDriver.probe(bytes(head), "x") == 100
    assert VdiDriver.probe(bytes(512), "x") == 0


# ----- qimg-written images -----
@pytest.mark.parametrize("opts", [None, "static=on"])
def test_convert_to_vdi_checked_by_qemu(oracle, tmp_path, pattern, opts):
    img = tmp_path / "m.vdi"
    r = run_qimg("convert", "-f", "raw", "-O", "vdi", *(["-o", opts] if opts else []), pattern, img)
    assert r.rc == 0, r.err
    assert oracle("check", img).out == "No errors were found on the image.\n"
    assert oracle("compare", "-f", "vdi", "-F", "raw", img, pattern).rc == 0
    assert oracle("convert", "-f", "vdi", "-O", "raw", img, tmp_path / "back.raw").rc == 0
    assert sha256_file(tmp_path / "back.raw") == sha256_file(pattern)
    # same block layout as qemu-img's own convert
    q = tmp_path / "q.vdi"
    oracle("convert", "-O", "vdi", *(["-o", opts] if opts else []), pattern, q)
    assert qemu_map(img, "vdi") == qemu_map(q, "vdi")


def test_writes_across_blocks(oracle, tmp_path):
    img = tmp_path / "w.vdi"
    ref = tmp_path / "ref.raw"
    oracle("create", "-f", "vdi", img, "8M")
    ref.write_bytes(bytes(8 * MiB))
    rnd = random.Random(3)
    writes = [(MiB - 10, 20), (3 * MiB + 5, 2 * MiB), (0, 512), (7 * MiB, MiB), (MiB - 4096, 8192)]
    drv = open_driver(img, "vdi", writable=True)
    with open(ref, "r+b") as f:
        for off, n in writes:
            data = rnd.randbytes(n)
            drv.pwrite(off, data)
            f.seek(off)
            f.write(data)
    drv.close()
    assert oracle("check", img).rc == 0
    assert oracle("compare", "-f", "vdi", "-F", "raw", img, ref).rc == 0
    assert guest_sha256(img, "vdi") == sha256_file(ref)


# ----- check -----
def test_check_clean_corrupt_and_repair(oracle, tmp_path, pattern):
    from qimg.errors import CheckUnsupported

    img = tmp_path / "c.vdi"
    oracle("convert", "-O", "vdi", pattern, img)
    drv = open_driver(img, "vdi")
    assert drv.check()["corruptions"] == 0
    with pytest.raises(CheckUnsupported) as ei:
        drv.check("all")
    assert ei.value.exit_code == 63 and str(ei.value) == "This image format does not support checks"
    drv.close()
    q = subprocess.run(["qemu-img", "check", "-r", "all", str(img)], capture_output=True, text=True, check=False)
    assert q.returncode == 63
    # one entry out of range, one entry sharing a block
    raw = bytearray(img.read_bytes())
    struct.pack_into("<I", raw, 512, 5000)
    struct.pack_into("<I", raw, 512 + 4 * 4, 1)
    img.write_bytes(bytes(raw))
    drv = open_driver(img, "vdi")
    res = drv.check()
    drv.close()
    q = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True, text=True, check=False)
    assert q.returncode == 2
    assert res["corruptions"] == json.loads(q.stdout)["corruptions"]
    assert res["messages"] == q.stderr.strip().splitlines()


# ----- the corpus -----
@pytest.mark.parametrize("name", ["basic.vdi.gz", "wheatos-disk.vdi", "lumiere-disk.vdi"])
def test_corpus(shared_images, expected_images, tmp_path, name, oracle):
    exp = expected_images["images"][f"vdi/{name}"]
    img = decompress_to(shared_images / "vdi" / name, tmp_path)
    info = json.loads(run_qimg("info", "--output=json", "-f", "vdi", img).out)
    assert info["virtual-size"] == exp["virtual_size"]
    assert info["cluster-size"] == exp["qemu_info"]["cluster-size"]
    assert guest_sha256(img, "vdi") == exp["raw_sha256"]
    assert qimg_map(img, "vdi") == qemu_map(img, "vdi")
    for extra in ([], ["--output=json"]):
        assert_info_same(img, "vdi", *extra)
    drv = open_driver(img, "vdi")
    assert drv.check()["corruptions"] == 0
    drv.close()


# ----- hostile headers -----
HOSTILE = [
    ("version", 68, "<I", 0x20001, "unsupported VDI image (version 2.1)"),
    ("block size", 376, "<I", 4096, "unsupported VDI image (block size 4096 is not 1048576)"),
    ("blocks", 384, "<I", 0x40000000, "unsupported VDI image (too many blocks 1073741824, max is 536870784)"),
    ("disk size", 368, "<Q", 1 << 50,
     "Unsupported VDI image size (size is 0x4000000000000, max supported is 0x1fffff8000000)"),
    ("bitmap room", 368, "<Q", 20 * MiB + 5, "unsupported VDI image (disk size 20972032, image bitmap has room"),
    ("bmap offset", 340, "<I", 0x201, "unsupported VDI image (unaligned block map offset 0x201)"),
    ("data offset", 344, "<I", 0x10, "unsupported VDI image (unaligned data offset 0x10)"),
    ("sector size", 360, "<I", 4096, "unsupported VDI image (sector size 4096 is not 512)"),
    ("link uuid", 424, "<Q", 1, "unsupported VDI image (non-NULL link UUID)"),
    ("parent uuid", 440, "<Q", 1, "unsupported VDI image (non-NULL parent UUID)"),
    ("bmap far", 340, "<I", 0x7FFFFE00, "overlaps"),
]


@pytest.mark.parametrize("name,off,fmt,value,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_headers(oracle, tmp_path, pattern, name, off, fmt, value, message):
    img = tmp_path / "h.vdi"
    oracle("convert", "-O", "vdi", pattern, img)
    raw = bytearray(img.read_bytes())
    struct.pack_into(fmt, raw, off, value)
    img.write_bytes(bytes(raw))
    for args in (("info", "-f", "vdi", img), ("convert", "-f", "vdi", "-O", "raw", img, tmp_path / "o.raw")):
        line = one_line_error(run_qimg(*args))
        assert message in line


def test_hostile_block_map_entry(oracle, tmp_path, pattern):
    img = tmp_path / "h.vdi"
    oracle("convert", "-O", "vdi", pattern, img)
    raw = bytearray(img.read_bytes())
    struct.pack_into("<I", raw, 512, 0x7FFFFFF)
    img.write_bytes(bytes(raw))
    line = one_line_error(run_qimg("convert", "-f", "vdi", "-O", "raw", img, tmp_path / "o.raw"))
    assert "beyond the 20 blocks" in line


def test_truncated_header(tmp_path):
    img = tmp_path / "t.vdi"
    head = bytearray(100)
    struct.pack_into("<I", head, 64, 0xBEDA107F)
    img.write_bytes(bytes(head))
    one_line_error(run_qimg("info", "-f", "vdi", img))


def test_check_command_like_qemu(oracle, tmp_path, pattern):
    img = tmp_path / "c.vdi"
    oracle("convert", "-O", "vdi", pattern, img)
    raw = bytearray(img.read_bytes())
    struct.pack_into("<I", raw, 512 + 4 * 19, 0)  # a second user of data block 0
    img.write_bytes(bytes(raw))
    for extra in ([], ["--output=json"]):
        r = run_qimg("check", *extra, "-f", "vdi", img)
        q = subprocess.run(["qemu-img", "check", *extra, "-f", "vdi", str(img)], capture_output=True, text=True,
                           check=False)
        assert (r.rc, r.out, r.err) == (q.returncode, q.stdout, q.stderr) == (2, q.stdout, q.stderr)
    r = run_qimg("check", "-r", "all", "-f", "vdi", img)
    assert r.rc == 63 and r.err == "qimg: This image format does not support checks\n"


def test_new_block_over_trailing_bytes_reads_zeros(oracle, tmp_path):
    img = tmp_path / "t.vdi"
    oracle("create", "-f", "vdi", img, "8M")
    with open(img, "ab") as f:
        f.write(b"\xaa" * (3 * MiB))
    drv = open_driver(img, "vdi", writable=True)
    drv.pwrite(MiB + 100, b"\x55" * 4096)
    drv.close()
    ref = bytearray(8 * MiB)
    ref[MiB + 100:MiB + 4196] = b"\x55" * 4096
    assert guest_sha256(img, "vdi") == hashlib.sha256(bytes(ref)).hexdigest()
    (tmp_path / "ref.raw").write_bytes(bytes(ref))
    assert oracle("compare", "-f", "vdi", "-F", "raw", img, tmp_path / "ref.raw").rc == 0
    assert oracle("check", img).rc == 0


def test_probing_through_the_cli(oracle, tmp_path):
    img = tmp_path / "p.vdi"
    oracle("create", "-f", "vdi", img, "4M")
    r = run_qimg("info", "--output=json", img)
    assert r.rc == 0 and json.loads(r.out)["format"] == "vdi"
