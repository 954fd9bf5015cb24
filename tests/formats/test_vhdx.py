"""vhdx: qemu-img 7.2's create layouts, images from Hyper-V / Windows 10 / Disk2vhd, log replay,
sector bitmap entries in the BAT, qimg-written images checked by qemu-img, hostile headers."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

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
GiB = 1 << 30
PATTERN = [(0, 70000), (3 * MiB - 100, MiB + 200), (5 * MiB - 1000, 3000), (19 * MiB, MiB)]
REPLAY = ["vhdx-log-replay.vhdx.gz", "iotest-dirtylog-10G-4M.vhdx.bz2"]


@pytest.fixture
def pattern(tmp_path):
    return write_pattern(tmp_path / "pattern.raw", 20 * MiB, PATTERN)


def layout(path):
    """The parts of a VHDX file that do not depend on random GUIDs: region table, metadata, BAT, size."""
    from qimg.formats.vhdx import layout as V

    data = Path(path).read_bytes()
    rt = data[V.VHDX_REGION_TABLE_OFFSET:V.VHDX_REGION_TABLE_OFFSET + V.VHDX_REGION_TABLE_SIZE]
    count = struct.unpack_from("<I", rt, 8)[0]
    regions = {}
    for i in range(count):
        guid, off, length, req = struct.unpack_from("<16sQII", rt, 16 + 32 * i)
        regions[guid] = (off, length, req)
    mo, ml, _ = regions[V.METADATA_GUID]
    meta = bytearray(data[mo:mo + ml])
    # blank the virtual disk id (random)
    for i in range(struct.unpack_from("<H", meta, 10)[0]):
        guid, off, length, _f, _r = struct.unpack_from("<16sIIII", meta, 32 + 32 * i)
        if guid == V.PAGE83_DATA_GUID:
            meta[off:off + length] = bytes(length)
    bo, bl, _ = regions[V.BAT_GUID]
    hdr = data[V.VHDX_HEADER1_OFFSET:V.VHDX_HEADER1_OFFSET + 80]
    # the file type identifier holds only the creator's name (free text)
    assert data[:8] == b"vhdxfile"
    return dict(size=len(data), rt=rt, meta=bytes(meta), bat=data[bo:bo + bl],
                log=struct.unpack_from("<HHIQ", hdr, 64))


def test_crc32c_vectors():
    from qimg.formats.vhdx.crc32c import crc32c

    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43


@pytest.mark.parametrize("extra", [0, 1, 3, 4093, 1 << 20])
def test_crc32c_lanes_agree_with_the_byte_loop(extra):
    """Long inputs (log entries) go through numpy lanes; they must give the byte loop's CRC,
    from any starting value and with zero runs inside."""
    from qimg.formats.vhdx.crc32c import CRC_LANES_FROM, _crc_table, crc32c

    def byte_loop(data, crc=0):
        t = _crc_table()
        c = crc ^ 0xFFFFFFFF
        for b in data:
            c = t[(c ^ b) & 0xFF] ^ (c >> 8)
        return c ^ 0xFFFFFFFF

    rnd = random.Random(extra)
    n = CRC_LANES_FROM + extra
    data = bytearray(rnd.randbytes(n))
    data[n // 3:n // 3 + 5000] = bytes(5000)
    for start in (0, 0xDEADBEEF):
        assert crc32c(data, start) == byte_loop(data, start)
    # the CRC of A+B continues from the CRC of A
    assert crc32c(data[n // 2:], crc32c(data[:n // 2])) == byte_loop(data)


def test_options_help_matches_qemu(oracle):
    assert run_qimg("create", "-f", "vhdx", "-o", "help").out == oracle("create", "-f", "vhdx", "-o", "help").out


CREATE_VARIANTS = [None, "subformat=fixed", "block_state_zero=off", "subformat=fixed,block_state_zero=off",
                   "block_size=1M", "block_size=2M,log_size=3M", "block_size=256M", "block_size=512M",
                   "block_size=512k", "log_size=1536k", "block_state_zero=on,subformat=dynamic,log_size=2M"]


@pytest.mark.parametrize("opts,size", [(o, s) for o in CREATE_VARIANTS for s in ("20M", "3145729")]
                         + [(None, "0"), ("subformat=fixed", "0"), ("block_size=1M", "0")])
def test_create_matches_qemu(oracle, tmp_path, opts, size):
    mine, theirs = tmp_path / "a.vhdx", tmp_path / "b.vhdx"
    extra = ["-o", opts] if opts else []
    r = run_qimg("create", "-f", "vhdx", *extra, mine, size)
    q = oracle("create", "-f", "vhdx", *extra, theirs, size)
    assert r.rc == 0, r.err
    assert r.out.replace(str(mine), "X") == q.out.replace(str(theirs), "X")
    assert layout(mine) == layout(theirs)
    assert oracle("check", mine).out == "No errors were found on the image.\n"
    a, b = (json.loads(qemu_info(x, "vhdx", "--output=json")) for x in (mine, theirs))
    assert (a["virtual-size"], a["cluster-size"]) == (b["virtual-size"], b["cluster-size"])


@pytest.mark.parametrize("size,cluster", [("1G", 8 * MiB), ("2G", 16 * MiB), ("101G", 32 * MiB),
                                          ("33T", 64 * MiB)])
def test_auto_block_size(tmp_path, size, cluster):
    img = tmp_path / "a.vhdx"
    assert run_qimg("create", "-f", "vhdx", img, size).rc == 0
    assert json.loads(run_qimg("info", "--output=json", "-f", "vhdx", img).out)["cluster-size"] == cluster


@pytest.mark.parametrize("opts,size,message", [
    ("block_size=3M", "1G", "Block size must be a power of two"),
    ("log_size=0", "1G", "Log size must be a multiple of 1 MB"),
    ("log_size=5G", "1G", "Log size must be smaller than 4 GB"),
    (None, "65T", "Image size too large; max of 64TB"),
    ("subformat=foo", "1G", "Parameter 'subformat' does not accept value 'foo'"),
])
def test_create_errors(oracle, tmp_path, opts, size, message):
    extra = ["-o", opts] if opts else []
    r = run_qimg("create", "-f", "vhdx", *extra, tmp_path / "a.vhdx", size)
    q = subprocess.run(["qemu-img", "create", "-f", "vhdx", *extra, str(tmp_path / "b.vhdx"), size],
                       capture_output=True, text=True, check=False)
    assert r.rc == q.returncode == 1
    assert message in r.err and message in q.stderr


@pytest.mark.parametrize("opts", [None, "subformat=fixed", "block_state_zero=off",
                                  "subformat=fixed,block_state_zero=off,block_size=1M", "block_size=2M"])
def test_qemu_written_images(oracle, tmp_path, pattern, opts):
    img = tmp_path / "q.vhdx"
    oracle("convert", "-O", "vhdx", *(["-o", opts] if opts else []), pattern, img)
    assert guest_sha256(img, "vhdx") == sha256_file(pattern)
    random_reads(img, "vhdx", pattern, MiB)
    assert qimg_map(img, "vhdx") == qemu_map(img, "vhdx")
    for extra in ([], ["--output=json"]):
        assert_info_same(img, "vhdx", *extra)


def test_sector_bitmap_entries_interleaved(oracle, tmp_path):
    """1 MiB blocks: one sector bitmap entry after every 4096 payload entries (chunk ratio)."""
    raw = write_pattern(tmp_path / "big.raw", 6 * GiB,
                        [(4 * GiB - 5000, 10000), (5 * GiB + 123, 3 * MiB), (6 * GiB - 4096, 4096)])
    img = tmp_path / "big.vhdx"
    oracle("convert", "-O", "vhdx", "-o", "block_size=1M", raw, img)
    from qimg.core.chain import Chain

    with open(raw, "rb") as f, Chain.open(str(img), "vhdx") as ch:
        for off, n in [(4 * GiB - 8192, 16384), (5 * GiB, 4 * MiB), (6 * GiB - 8192, 8192), (0, 4096)]:
            f.seek(off)
            assert ch.read(off, n) == f.read(n)
    drv = open_driver(img, "vhdx")
    assert drv.chunk_ratio == 4096 and drv.bat_entries == 6144 + 1
    drv.close()
    mine = tmp_path / "mine.vhdx"
    assert run_qimg("convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", raw, mine).rc == 0
    assert layout(mine)["bat"] == layout(img)["bat"]
    assert oracle("check", mine).rc == 0


@pytest.mark.parametrize("opts", [None, "subformat=fixed", "block_state_zero=off", "block_size=1M",
                                  "subformat=fixed,block_state_zero=off,block_size=2M", "log_size=2M"])
def test_convert_to_vhdx_checked_by_qemu(oracle, tmp_path, pattern, opts):
    img = tmp_path / "m.vhdx"
    extra = ["-o", opts] if opts else []
    r = run_qimg("convert", "-f", "raw", "-O", "vhdx", *extra, pattern, img)
    assert r.rc == 0, r.err
    assert oracle("check", img).out == "No errors were found on the image.\n"
    assert oracle("compare", "-f", "vhdx", "-F", "raw", img, pattern).rc == 0
    q = tmp_path / "q.vhdx"
    oracle("convert", "-O", "vhdx", *extra, pattern, q)
    # the same BAT (block placement and states) as qemu-img's own convert
    assert layout(img) == layout(q)
    oracle("convert", "-f", "vhdx", "-O", "raw", img, tmp_path / "back.raw")
    assert sha256_file(tmp_path / "back.raw") == sha256_file(pattern)


def test_writes_across_blocks_and_reopen(oracle, tmp_path):
    img = tmp_path / "w.vhdx"
    oracle("create", "-f", "vhdx", "-o", "block_size=1M", img, "9M")
    ref = bytearray(9 * MiB)
    rnd = random.Random(11)
    writes = [(MiB - 10, 20), (4 * MiB + 5, 3 * MiB), (0, 512), (9 * MiB - 4096, 4096), (2 * MiB - 4096, 8192)]
    for round_ in range(2):
        drv = open_driver(img, "vhdx", writable=True)
        for off, n in writes:
            off = (off + round_ * 777) % (9 * MiB - n)
            data = rnd.randbytes(n)
            drv.pwrite(off, data)
            ref[off:off + n] = data
        drv.close()
    (tmp_path / "ref.raw").write_bytes(bytes(ref))
    assert oracle("check", img).out == "No errors were found on the image.\n"
    assert oracle("compare", "-f", "vhdx", "-F", "raw", img, tmp_path / "ref.raw").rc == 0
    assert guest_sha256(img, "vhdx") == hashlib.sha256(bytes(ref)).hexdigest()


CORPUS = ["iotest-dynamic-1G.vhdx.bz2", "test-disk2vhd.vhdx.bz2", "fixed.vhdx.gz", "dynamic.vhdx.gz",
          "btrfs.vhdx.gz", "swap.vhdx.gz", "xfs5.vhdx.gz"]


@pytest.mark.parametrize("name", CORPUS)
def test_corpus(shared_images, expected_images, tmp_path, name, oracle):
    from qimg.core.chain import Chain

    exp = expected_images["images"][f"vhdx/{name}"]
    img = decompress_to(shared_images / "vhdx" / name, tmp_path)
    with Chain.open(str(img), "vhdx") as ch:
        assert ch.virtual_size == exp["virtual_size"]
        head = ch.read(0, min(ch.virtual_size, 64 * MiB))
    assert hashlib.sha256(head).hexdigest() == exp["raw_head_64MiB_sha256"]
    if exp["raw_sha256"] and exp["virtual_size"] <= 256 * MiB:
        assert guest_sha256(img, "vhdx") == exp["raw_sha256"]
    for extra in ([], ["--output=json"]):
        assert_info_same(img, "vhdx", *extra)
    assert qimg_map(img, "vhdx") == qemu_map(img, "vhdx")
    drv = open_driver(img, "vhdx")
    res = drv.check()
    assert (res.check_errors, res.corruptions, res.leaks, res.messages, res.exit_code) == (0, 0, 0, [], 0)
    drv.close()


@pytest.mark.parametrize("name", REPLAY)
def test_log_replay(shared_images, expected_images, tmp_path, name, oracle):
    exp = expected_images["images"][f"vhdx/{name}"]
    img = decompress_to(shared_images / "vhdx" / name, tmp_path)
    before = sha256_file(img)
    r = run_qimg("info", "-f", "vhdx", img)
    assert r.rc == 1
    assert r.err.splitlines()[0].endswith(
        f"VHDX image file '{img}' opened read-only, but contains a log that needs to be replayed")
    assert f"check -r all '{img}'" in r.err
    assert sha256_file(img) == before  # a read-only open never writes
    # a writable open replays the log; qemu-img's own replay gives the same file apart from the headers
    theirs = tmp_path / "theirs.vhdx"
    shutil.copyfile(img, theirs)
    oracle("check", "-r", "all", theirs)
    drv = open_driver(img, "vhdx", writable=True)
    res = drv.check("all")
    drv.close()
    assert res["corruptions-fixed"] == 1 and res["corruptions"] == 0
    a, b = img.read_bytes(), theirs.read_bytes()
    assert len(a) == len(b)
    for lo, hi in [(0, 64 << 10), (68 << 10, 128 << 10), (132 << 10, len(a))]:
        assert a[lo:hi] == b[lo:hi]
    after = exp["after_log_replay"]
    from qimg.core.chain import Chain

    with Chain.open(str(img), "vhdx") as ch:
        assert ch.virtual_size == after["virtual_size"]
        assert hashlib.sha256(ch.read(0, 64 * MiB)).hexdigest() == after["raw_head_64MiB_sha256"]
    assert oracle("check", img).out == "No errors were found on the image.\n"
    assert_info_same(img, "vhdx", "--output=json")


def _edit(raw, edits):
    from qimg.formats.vhdx import layout as V
    from qimg.formats.vhdx.crc32c import crc32c

    for kind, off, fmt, value in edits:
        if kind == "hdr":
            for base in (V.VHDX_HEADER1_OFFSET, V.VHDX_HEADER2_OFFSET):
                struct.pack_into(fmt, raw, base + off, value)
                raw[base + 4:base + 8] = bytes(4)
                struct.pack_into("<I", raw, base + 4, crc32c(bytes(raw[base:base + 4096])))
        elif kind == "rt":
            for base in (V.VHDX_REGION_TABLE_OFFSET, V.VHDX_REGION_TABLE2_OFFSET):
                struct.pack_into(fmt, raw, base + off, value)
                raw[base + 4:base + 8] = bytes(4)
                struct.pack_into("<I", raw, base + 4, crc32c(bytes(raw[base:base + 65536])))
        else:
            struct.pack_into(fmt, raw, off, value)


META = 3 * MiB
HOSTILE = [
    ("signature", [("raw", 0, "8s", b"vhdxfilf")], "no 'vhdxfile' signature"),
    ("headers", [("raw", 65536, "4s", b"xxxx"), ("raw", 131072, "4s", b"xxxx")], "No valid VHDX header found"),
    ("log length", [("hdr", 68, "<I", 12345), ("hdr", 48, "<Q", 1)], "is not a multiple of 1 MiB"),
    ("region count", [("rt", 8, "<I", 100000)], "VHDX region table entry count 100000 exceeds the limit 2047"),
    ("region checksum", [("raw", 196608 + 20, "B", 1), ("raw", 262144 + 20, "B", 1)], "Invalid VHDX region table"),
    ("bat offset", [("rt", 32, "<Q", 1 << 40)], "lies beyond the end of the file"),
    ("bat length", [("rt", 40, "<I", 0)], "is too small for 3 entries"),
    ("block size", [("raw", META + 65536, "<I", 3 * MiB)], "VHDX block size 3145728 is invalid"),
    ("huge block", [("raw", META + 65536, "<I", 1 << 30)], "VHDX block size 1073741824 is invalid"),
    ("disk size", [("raw", META + 65544, "<Q", 1 << 60)], "VHDX virtual disk size 1152921504606846976 exceeds"),
    ("sector size", [("raw", META + 65568, "<I", 1000)], "VHDX logical sector size 1000 is invalid"),
    ("meta count", [("raw", META + 10, "<H", 60000)], "VHDX metadata entry count 60000 exceeds the limit 2047"),
    ("meta offset", [("raw", META + 48, "<I", 1 << 30)], "lies outside the metadata region"),
    ("parent", [("raw", META + 65540, "<I", 2)], "Operation not supported"),
    ("entry start", [("raw", 2 * MiB, "<Q", (24 * MiB) | 6)],
     "VHDX BAT entry 0 start offset 25165824 points after end of file (25165824). Image has probably been truncated."),
    ("entry end", [("raw", 2 * MiB, "<Q", (23 * MiB) | 6)],
     "VHDX BAT entry 0 end offset 32505855 points after end of file (25165824). Image has probably been truncated."),
    ("entry overlap", [("raw", 2 * MiB, "<Q", MiB | 6)],
     "VHDX region 1048576-9437184 overlaps with region 3145728-4194304"),
]


@pytest.mark.parametrize("name,edits,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_headers(oracle, tmp_path, pattern, name, edits, message):
    img = tmp_path / "h.vhdx"
    oracle("convert", "-O", "vhdx", pattern, img)
    raw = bytearray(img.read_bytes())
    _edit(raw, edits)
    img.write_bytes(bytes(raw))
    q = subprocess.run(["qemu-img", "info", "-f", "vhdx", str(img)], capture_output=True, text=True, check=False)
    # qemu-img reads a BAT region beyond the end of the file as empty, and so does qimg; the untrusted
    # mode refuses it
    assert q.returncode == (0 if name == "bat offset" else 1)
    for args in (("info", "-f", "vhdx", img), ("convert", "-f", "vhdx", "-O", "raw", img, tmp_path / "o.raw")):
        if name == "bat offset":
            assert run_qimg(*args).rc == 0
            args = ("--untrusted",) + args
        assert message in one_line_error(run_qimg(*args))
    if name == "bat offset":
        ours, theirs = tmp_path / "o.raw", tmp_path / "q.raw"
        oracle("convert", "-f", "vhdx", "-O", "raw", img, theirs)
        assert run_qimg("convert", "-f", "vhdx", "-O", "raw", img, ours).rc == 0
        assert ours.read_bytes() == theirs.read_bytes()
    if name.startswith("entry "):
        # check opens anyway and reports what qemu-img check reports
        drv = open_driver(img, "vhdx", options={"check": True})
        res = drv.check()
        drv.close()
        qc = subprocess.run(["qemu-img", "check", "--output=json", "-f", "vhdx", str(img)],
                            capture_output=True, check=False, text=True)
        assert qc.returncode == 2
        assert res["corruptions"] == json.loads(qc.stdout)["corruptions"] == 1
        assert [m.replace("qimg: ", "qemu-img: ", 1) for m in res.messages] == qc.stderr.strip().splitlines()
        assert res.exit_code == qc.returncode


def test_truncated_file(tmp_path):
    img = tmp_path / "t.vhdx"
    img.write_bytes(b"vhdxfile" + bytes(100))
    one_line_error(run_qimg("info", "-f", "vhdx", img))


def test_check_command_replays_like_qemu(shared_images, tmp_path, oracle):
    img = decompress_to(shared_images / "vhdx" / "vhdx-log-replay.vhdx.gz", tmp_path)
    theirs = tmp_path / "theirs.vhdx"
    shutil.copyfile(img, theirs)
    r = run_qimg("check", "-r", "all", "-f", "vhdx", img)
    q = oracle("check", "-r", "all", "-f", "vhdx", theirs)
    assert (r.rc, r.out) == (0, q.out)
    assert "1 corruptions" in r.out
    for extra in ([], ["--output=json"]):
        r = run_qimg("check", *extra, "-f", "vhdx", img)
        assert r.rc == 0 and r.out == oracle("check", *extra, "-f", "vhdx", img).out


def _with_log(img, payload_off, payload, zero_off, zero_len, seq=7):
    """Put one log entry (a data and a zero descriptor) into a qemu-made image and point the headers at it."""
    from qimg.formats.vhdx.crc32c import crc32c

    raw = bytearray(img.read_bytes())
    guid = bytes(range(1, 17))
    entry = bytearray(2 * 4096)
    struct.pack_into("<4sIIIQII16sQQ", entry, 0, b"loge", 0, len(entry), 0, seq, 2, 0, guid, len(raw), len(raw))
    struct.pack_into("<4s4s8sQQ", entry, 64, b"desc", payload[4092:], payload[:8], payload_off, seq)
    struct.pack_into("<4sIQQQ", entry, 96, b"zero", 0, zero_len, zero_off, seq)
    struct.pack_into("<4sI", entry, 4096, b"data", seq >> 32)
    entry[4096 + 8:4096 + 4092] = payload[8:4092]
    struct.pack_into("<I", entry, 4096 + 4092, seq & 0xFFFFFFFF)
    struct.pack_into("<I", entry, 4, crc32c(bytes(entry)))
    raw[MiB:MiB + len(entry)] = entry
    _edit(raw, [("hdr", 48, "16s", guid)])
    img.write_bytes(bytes(raw))


def test_synthetic_log_replay_matches_qemu(oracle, tmp_path, pattern):
    img = tmp_path / "l.vhdx"
    oracle("convert", "-O", "vhdx", pattern, img)
    payload = bytes(random.Random(2).randbytes(4096))
    _with_log(img, 8 * MiB + 4096, payload, 8 * MiB + 65536, 8192)
    r = run_qimg("info", "-f", "vhdx", img)
    assert r.rc == 1 and "contains a log that needs to be replayed" in r.err
    theirs = tmp_path / "theirs.vhdx"
    shutil.copyfile(img, theirs)
    oracle("check", "-r", "all", theirs)
    drv = open_driver(img, "vhdx", writable=True)
    assert drv.check("all").corruptions_fixed == 1
    drv.close()
    a, b = img.read_bytes(), theirs.read_bytes()
    assert a[8 * MiB + 4096:8 * MiB + 8192] == payload
    assert a[8 * MiB + 65536:8 * MiB + 65536 + 8192] == bytes(8192)
    for lo, hi in [(0, 64 << 10), (68 << 10, 128 << 10), (132 << 10, len(a))]:
        assert a[lo:hi] == b[lo:hi]
    assert oracle("check", img).out == "No errors were found on the image.\n"


def test_log_with_bad_checksum_is_not_replayed(oracle, tmp_path, pattern):
    img = tmp_path / "l.vhdx"
    oracle("convert", "-O", "vhdx", pattern, img)
    _with_log(img, 8 * MiB, bytes(4096), 8 * MiB, 4096)
    raw = bytearray(img.read_bytes())
    raw[MiB + 4096 + 100] ^= 1  # data sector content no longer matches the entry checksum
    img.write_bytes(bytes(raw))
    before = sha256_file(img)
    assert oracle("info", "-f", "vhdx", img).rc == 0
    r = run_qimg("info", "-f", "vhdx", img)
    assert r.rc == 0, r.err
    assert guest_sha256(img, "vhdx") == sha256_file(pattern)
    assert sha256_file(img) == before


def test_hostile_log_entry_length(oracle, tmp_path, pattern):
    img = tmp_path / "l.vhdx"
    oracle("convert", "-O", "vhdx", "-o", "log_size=512M", pattern, img)
    _with_log(img, 8 * MiB, bytes(4096), 8 * MiB, 4096)
    raw = bytearray(img.read_bytes())
    struct.pack_into("<I", raw, MiB + 8, 300 * MiB)
    img.write_bytes(bytes(raw))
    assert "VHDX log entry length 314572800 exceeds the limit" in one_line_error(run_qimg("info", "-f", "vhdx", img))


def test_probing_through_the_cli(oracle, tmp_path):
    img = tmp_path / "p.vhdx"
    oracle("create", "-f", "vhdx", img, "4M")
    r = run_qimg("info", "--output=json", img)
    assert r.rc == 0 and json.loads(r.out)["format"] == "vhdx"
