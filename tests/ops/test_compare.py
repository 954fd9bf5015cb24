"""compare: messages, exit codes, strict mode and progress against qemu-img 7.2; the buffer functions."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import qemu, run_qimg, write_pattern
from tests.ops.test_map import needs_qcow2, same

MiB = 1 << 20
RAW = ("-f", "raw", "-F", "raw")


@pytest.fixture
def imgs(tmp_path):
    """A family of raw images that differ in the ways compare cares about."""
    d = {}
    d["a"] = write_pattern(tmp_path / "a.raw", 10 * MiB, [(0, 4096), (65536, 100000), (5 * MiB, MiB)])
    d["b"] = tmp_path / "b.raw"  # same content, different allocation (zeros written)
    shutil.copyfile(d["a"], d["b"])
    d["c"] = tmp_path / "c.raw"  # one byte differs
    shutil.copyfile(d["a"], d["c"])
    with open(d["c"], "r+b") as f:
        f.seek(70000)
        f.write(b"\1")
    d["big"] = tmp_path / "big.raw"  # longer, extra part zero (a hole)
    shutil.copyfile(d["a"], d["big"])
    os.truncate(d["big"], 12 * MiB)
    d["bigd"] = tmp_path / "bigd.raw"  # longer, extra part has data
    shutil.copyfile(d["big"], d["bigd"])
    with open(d["bigd"], "r+b") as f:
        f.seek(11 * MiB)
        f.write(b"x")
    d["z"] = tmp_path / "z.raw"  # zeros: a hole, written zeros, a hole
    with open(d["z"], "wb") as f:
        f.truncate(10 * MiB)
        f.seek(4096)
        f.write(bytes(65536))
    d["n"] = tmp_path / "n.raw"  # one non-zero byte inside a sector
    with open(d["n"], "wb") as f:
        f.truncate(10 * MiB)
        f.seek(1000)
        f.write(b"\7")
    d["s1"] = tmp_path / "s1.raw"  # data then a hole
    with open(d["s1"], "wb") as f:
        f.write(b"\5" * MiB)
        f.truncate(2 * MiB)
    d["s2"] = tmp_path / "s2.raw"  # same content, all data: block status differs (and EOF)
    with open(d["s2"], "wb") as f:
        f.write(b"\5" * MiB + bytes(MiB))
    d["e"] = tmp_path / "e.raw"
    d["e"].write_bytes(b"")
    d["zz"] = tmp_path / "zz.raw"  # a long zero-filled data run with one byte set deep inside
    with open(d["zz"], "wb") as f:
        buf = bytearray(8 * MiB)
        buf[5 * MiB] = 1
        f.write(buf)
        f.truncate(10 * MiB)
    d["zs"] = tmp_path / "zs.raw"
    with open(d["zs"], "wb") as f:
        f.truncate(MiB)
    return d


CASES = [
    ("a", "b", ()), ("a", "c", ()), ("a", "big", ()), ("big", "a", ()), ("a", "bigd", ()), ("bigd", "a", ()),
    ("a", "big", ("-s",)), ("a", "b", ("-s",)), ("a", "c", ("-q",)), ("a", "b", ("-p",)), ("a", "b", ("-p", "-q")),
    ("e", "z", ("-s",)), ("z", "e", ("-s",)), ("s1", "s2", ("-s",)), ("s2", "s1", ("-s",)), ("s2", "s1", ()),
    ("a", "big", ("-p",)), ("bigd", "a", ("-p",)), ("a", "c", ("-p",)), ("e", "z", ("-p",)), ("n", "z", ()),
    ("z", "n", ()), ("zs", "zz", ("-p",)), ("zz", "zs", ("-p",)), ("zz", "zz", ("-p", "-s")), ("e", "e", ()),
    ("a", "a", ("-s", "-p")), ("a", "z", ()), ("z", "a", ("-s",)),
]


@pytest.mark.parametrize("one,two,flags", CASES)
def test_compare_raw_matches_qemu(oracle, imgs, one, two, flags):
    same("compare", *RAW, *flags, imgs[one], imgs[two])


@pytest.mark.parametrize("one,two", [("a", "b"), ("a", "big"), ("bigd", "a"), ("a", "c"), ("zs", "zz")])
def test_compare_progress_bytes_exact(oracle, imgs, one, two):
    """-p prints qemu's "    (xx.xx/100%)\\r" steps with its single-precision sums, byte for byte."""
    import subprocess

    q = subprocess.run(["qemu-img", "compare", "-p", *RAW, imgs[one], imgs[two]], capture_output=True, check=False)
    m = run_qimg("compare", "-p", *RAW, imgs[one], imgs[two])
    assert m.rc == q.returncode
    assert m.out.encode() == q.stdout
    assert b"\r" in q.stdout


def test_compare_probed_and_image_opts(oracle, imgs):
    same("compare", imgs["a"], imgs["b"])
    same("compare", "--image-opts", f"driver=raw,file.filename={imgs['a']}", f"driver=raw,file.filename={imgs['c']}")
    same("compare", "-U", "-T", "none", "--object", "secret,id=s0,data=x", *RAW, imgs["a"], imgs["b"])


@pytest.mark.parametrize("args", [
    ["A"], ["A", "A", "A"], ["-f", "foo", "A", "A"], ["-F", "foo", "-f", "raw", "A", "A"], ["--bogus", "A", "A"],
    ["-x", "A", "A"], ["-T", "foo", "A", "A"], ["-p", "-T", "foo", "A", "A"], ["--object", "foo", "A", "A"],
    ["-p", "--image-opts", "-f", "raw", "A", "A"], ["-f"], ["-p", "A"], ["A", "NOPE"], ["NOPE", "A"],
    ["-p", "NOPE", "A"], ["-f", "raw", "A", "DIR"],
])
def test_compare_errors_match_qemu(oracle, imgs, tmp_path, args):
    subst = {"A": str(imgs["a"]), "NOPE": str(tmp_path / "nope"), "DIR": str(tmp_path)}
    same("compare", *[subst.get(a, a) for a in args])


def test_compare_exit_codes_for_read_and_status_errors(imgs, monkeypatch):
    from qimg.core.chain import Chain
    from qimg.errors import QimgError

    def bad_read(self, offset, buf, depth=0):
        raise QimgError("Input/output error")

    monkeypatch.setattr(Chain, "readinto", bad_read)
    r = run_qimg("compare", *RAW, imgs["a"], imgs["c"])
    assert r.rc == 4
    assert r.err == f"qimg: Error while reading offset 0 of {imgs['a']}: Input/output error\n"

    def bad_status(self, offset, length, base_depth=None):
        raise QimgError("Input/output error")

    monkeypatch.setattr(Chain, "block_status", bad_status)
    r = run_qimg("compare", *RAW, imgs["a"], imgs["c"])
    assert r.rc == 3
    assert r.err == f"qimg: Sector allocation test failed for {imgs['a']}\n"


def test_compare_large_dense_images_threads(tmp_path):
    """Many 2 MiB steps with the difference late: found by the threaded pipeline, in order."""
    rnd = os.urandom(MiB)
    a = tmp_path / "x.raw"
    b = tmp_path / "y.raw"
    with open(a, "wb") as f:
        f.writelines(rnd for _ in range(24))
    shutil.copyfile(a, b)
    with open(b, "r+b") as f:
        f.seek(20 * MiB + 513)
        f.write(bytes([rnd[513] ^ 0xFF]))
        f.seek(23 * MiB + 7)
        f.write(bytes([rnd[7] ^ 0xFF]))
    r = run_qimg("compare", *RAW, a, b)
    assert (r.rc, r.out) == (1, f"Content mismatch at offset {20 * MiB + 512}!\n")
    from qimg.ops.compare import CompareRequest, compare

    lines = []
    assert compare(CompareRequest(str(a), str(b), "raw", "raw", workers=1), report=lines.append) == 1
    assert lines == [f"Content mismatch at offset {20 * MiB + 512}!"]
    assert run_qimg("compare", *RAW, a, a).rc == 0


# ---- engine functions ----

def test_first_difference_and_nonzero():
    from qimg.engine.compare import first_difference, first_nonzero, sector_of

    a = os.urandom(10000)
    for i in (0, 1, 7, 8, 9, 4095, 4096, 5000, 9999):
        b = bytearray(a)
        b[i] ^= 1
        assert first_difference(a, b) == i
        z = bytearray(10000)
        z[i] = 3
        assert first_nonzero(z) == i
    assert first_difference(a, a) is None
    assert first_difference(a, a[:500]) == 500
    assert first_nonzero(bytes(4099)) is None
    assert sector_of(1000) == 512 and sector_of(511) == 0


def test_diff_runs():
    from qimg.engine.compare import diff_runs

    a = bytes(4096 + 100)
    b = bytearray(a)
    b[0] = 1
    b[600] = 1
    b[2000] = 1
    b[4100] = 1
    assert diff_runs(a, b) == [(0, 1024), (1536, 2048), (4096, 4196)]
    assert diff_runs(a, a) == []
    c = bytearray(a)
    c[4095] = 9
    c[4096] = 9
    assert diff_runs(a, c, 4096) == [(0, 4196)]


def test_ordered_map_keeps_order_and_stops_early():
    from qimg.engine.compare import ordered_map

    seen = []
    for item, res in ordered_map(lambda x: x * x, range(100), workers=2, depth=3):
        seen.append((item, res))
        if item == 10:
            break
    assert seen == [(i, i * i) for i in range(11)]
    assert list(ordered_map(lambda x: -x, range(5), workers=1)) == [(i, -i) for i in range(5)]


# ---- qcow2 (needs the qcow2 driver) ----

@needs_qcow2
def test_compare_qcow2_matches_qemu(oracle, imgs, tmp_path):
    q = tmp_path / "a.qcow2"
    qemu("convert", "-f", "raw", "-O", "qcow2", imgs["a"], q)
    empty = tmp_path / "e.qcow2"
    qemu("create", "-f", "qcow2", empty, "10M")
    ov = tmp_path / "ov.qcow2"
    qemu("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", ov, "12M")
    small = tmp_path / "small.qcow2"
    qemu("create", "-f", "qcow2", small, "3M")
    top = tmp_path / "top.qcow2"
    qemu("create", "-f", "qcow2", "-b", "small.qcow2", "-F", "qcow2", top, "6M")
    a = imgs["a"]
    for args in ([a, q], ["-s", a, q], ["-f", "raw", "-F", "raw", a, q], [q, q], ["-s", q, ov], [ov, q],
                 ["-p", ov, a], [imgs["n"], empty], [empty, imgs["n"]], ["-s", empty, empty], ["-q", "-s", empty, a],
                 [empty, a], ["-s", top, top], ["-s", top, small], [top, imgs["zs"]]):
        same("compare", *args)
