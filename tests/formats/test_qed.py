"""QED: create, read, write, zero clusters, backing files, resize, rebase, check, hostile headers."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess

import pytest

from tests.conftest import guest_sha256, qemu, run_qimg, sha256_file, write_pattern
from tests.formats.test_qcow1 import make_src, qemu_map, qimg_map


def qemu_io(img, *cmds):
    args = ["qemu-io"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(img)], check=True, capture_output=True)


def qemu_check(img):
    p = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True, text=True, check=False)
    return p.returncode, json.loads(p.stdout)


def open_rw(path):
    from tests.conftest import open_rw as open_chain_rw

    return open_chain_rw(path, "qed")


def test_probe():
    from qimg.formats.qed import QedDriver

    assert QedDriver.probe(b"QED\0" + bytes(60), "x") == 100
    assert QedDriver.probe(b"QEF\0" + bytes(60), "x") == 0


@pytest.mark.parametrize("args", [
    ["10M"],
    ["-o", "cluster_size=4k,table_size=2", "100M"],
    ["-o", "cluster_size=8k,table_size=1", "100M"],
    ["-b", "base.raw", "-F", "raw"],
    ["-b", "base.raw", "-F", "raw", "5M"],
    ["1000"],
])
def test_create_matches_qemu(tmp_path, oracle, args):
    write_pattern(tmp_path / "base.raw", 4 << 20, [(0, 4096)])
    r = run_qimg("create", "-f", "qed", tmp_path / "a.qed", *args)
    assert r.rc == 0, r.err
    q = oracle("create", "-f", "qed", tmp_path / "b.qed", *args)
    assert r.out.replace("a.qed", "b.qed") == q.out
    assert (tmp_path / "a.qed").read_bytes() == (tmp_path / "b.qed").read_bytes()
    # qemu-img 7.2 refuses to open its own single-cluster-table images, and so does qimg
    i = run_qimg("info", tmp_path / "a.qed")
    q = oracle("info", tmp_path / "b.qed", check=False)
    assert (i.rc, i.out.replace("a.qed", "b.qed"), i.err.replace("a.qed", "b.qed").replace("qimg:", "qemu-img:")) \
        == (q.rc, q.out, q.err)


def test_create_help_and_errors(tmp_path, oracle):
    assert run_qimg("create", "-f", "qed", "-o", "help").out == oracle("create", "-f", "qed", "-o", "help").out
    for opt, msg in (("cluster_size=3000", "QED cluster size must be within range [4096, 67108864] and power of 2"),
                     ("table_size=17", "QED table size must be within range [1, 16] and power of 2")):
        r = run_qimg("create", "-f", "qed", "-o", opt, tmp_path / "x.qed", "3M")
        assert r.rc == 1 and msg in r.err


def test_read_qemu_written(tmp_path, oracle):
    base = tmp_path / "base.qed"
    oracle("create", "-f", "qed", base, "10M")
    qemu_io(base, "write -P 0x11 4k 8k", "write -P 0x22 5M 100k", "write -z 8M 64k", "write -P 0x33 10230k 10k")
    top = tmp_path / "top.qed"
    oracle("create", "-f", "qed", "-b", "base.qed", "-F", "qed", top)
    qemu_io(top, "write -P 0x44 6k 1k", "write -z 5M 128k", "write -P 0x55 9M 3k")
    for img in (base, top):
        raw = tmp_path / (img.name + ".raw")
        oracle("convert", "-O", "raw", img, raw)
        assert guest_sha256(img) == sha256_file(raw)
        assert qimg_map(img) == qemu_map(img)
        for args in ([], ["--output=json"]):
            assert run_qimg("info", *args, img).out == oracle("info", *args, img).out


def test_convert_to_qed(tmp_path, oracle):
    src = make_src(tmp_path)
    ours, theirs = tmp_path / "o.qed", tmp_path / "t.qed"
    assert run_qimg("convert", "-O", "qed", src, ours).rc == 0
    oracle("convert", "-O", "qed", src, theirs)
    assert qemu_check(ours)[0] == 0
    assert oracle("compare", src, ours).rc == 0
    assert qemu_map(ours) == qemu_map(theirs)
    back = tmp_path / "back.raw"
    assert run_qimg("convert", "-O", "raw", ours, back).rc == 0
    assert sha256_file(back) == sha256_file(src)


def test_overlay_writes_zero_clusters_and_need_check(tmp_path, oracle):
    src = make_src(tmp_path)
    base = tmp_path / "base.qed"
    oracle("convert", "-O", "qed", src, base)
    top = tmp_path / "top.qed"
    assert run_qimg("create", "-f", "qed", "-b", "base.qed", "-F", "qed", top).rc == 0
    expect = bytearray(src.read_bytes())
    drv = open_rw(top)
    try:
        for off, data in ((100, b"A" * 50), ((1 << 20) - 10, b"B" * 70000), (4190000, b"D" * 4304)):
            drv.pwrite(off, data)
            expect[off:off + len(data)] = data
        with open(top, "rb") as f:
            assert struct.unpack("<Q", f.read(24)[16:24])[0] & 2  # need-check while allocating
        for off, n in ((3 << 20, 65536), (1 << 20, 65536), (2 << 20, 1000)):
            drv.write_zeroes(off, n)
            expect[off:off + n] = bytes(n)
    finally:
        drv.close()
    with open(top, "rb") as f:
        assert struct.unpack("<Q", f.read(24)[16:24])[0] & 2 == 0
    want = tmp_path / "want.raw"
    want.write_bytes(expect)
    assert oracle("compare", "-F", "raw", top, want).rc == 0
    assert guest_sha256(top) == hashlib.sha256(expect).hexdigest()
    rc, res = qemu_check(top)
    assert rc == 0 and res["check-errors"] == 0 and "corruptions" not in res and "leaks" not in res
    zero = [e for e in qemu_map(top) if e["depth"] == 0 and e["zero"] and e["present"]]
    assert zero and zero[0]["start"] == 3 << 20


def test_resize_and_rebase(tmp_path, oracle):
    img = tmp_path / "r.qed"
    oracle("create", "-f", "qed", img, "10M")
    drv = open_rw(img)
    drv.truncate(20 << 20)
    with pytest.raises(Exception, match="Shrinking"):
        drv.truncate(1 << 20)
    drv.set_backing("other.raw", "raw")
    drv.close()
    info = json.loads(oracle("info", "--output=json", img).out)
    assert info["virtual-size"] == 20 << 20
    assert info["backing-filename"] == "other.raw" and info["backing-filename-format"] == "raw"
    from qimg.core import registry

    drv = registry.open_image(str(img), "qed", writable=True)  # as rebase -u: other.raw does not exist
    drv.set_backing(None, None)
    drv.close()
    assert "backing-filename" not in json.loads(oracle("info", "--output=json", img).out)


def _leaky_and_corrupt(tmp_path):
    img = tmp_path / "l.qed"
    qemu("create", "-f", "qed", img, "10M")
    qemu_io(img, "write -P 0x11 4k 8k", "write -P 0x22 5M 100k")
    with open(img, "ab") as f:
        f.truncate(f.seek(0, 2) + 131072)
    bad = tmp_path / "c.qed"
    d = bytearray(img.read_bytes())
    l2 = struct.unpack_from("<Q", d, 65536)[0]
    struct.pack_into("<Q", d, l2 + 8, 1 << 40)
    struct.pack_into("<Q", d, l2 + 16, 4096)
    bad.write_bytes(d)
    return img, bad


def test_check_matches_qemu_counts(tmp_path, oracle):
    img, bad = _leaky_and_corrupt(tmp_path)
    keys = ("total-clusters", "allocated-clusters", "fragmented-clusters")
    for path, leaks, corrupt in ((img, 2, 0), (bad, 2, 2)):
        _rc, q = qemu_check(path)
        from qimg.core import registry

        drv = registry.open_image(str(path), "qed")
        try:
            ours = drv.check(None)
        finally:
            drv.close()
        assert ours["leaks"] == q.get("leaks", 0) == leaks
        assert ours["corruptions"] == q.get("corruptions", 0) == corrupt
        for k in keys:
            assert ours[k] == q[k]


def test_check_repair(tmp_path, oracle):
    img, bad = _leaky_and_corrupt(tmp_path)
    drv = open_rw(bad)
    res = drv.check("all")
    drv.close()
    assert res["corruptions-fixed"] == 2 and res["leaks-fixed"] == 2
    rc, q = qemu_check(bad)
    assert rc == 0 and "leaks" not in q and "corruptions" not in q
    drv = open_rw(img)
    res = drv.check("leaks")
    drv.close()
    assert res["leaks-fixed"] == 2 and res["leaks"] == 0
    assert qemu_check(img)[0] == 0


@pytest.mark.parametrize("off,patch,needle", [
    (4, b"\x00\x30\x00\x00", "QED cluster size is invalid"),
    (8, b"\x11\x00\x00\x00", "QED table size is invalid"),
    (16, b"\x08", "Unsupported QED features: 8"),
    (40, b"\x00\x00\x00\x00\x00\x00\x01\x00", "QED table offset is invalid"),
    (48, b"\xe8\x03\x00\x00\x00\x00", "QED image size is invalid"),
    (48, b"\x00\x00\x00\x00\x00\x00\x00\x01", "QED image size is invalid"),
    (12, b"\x00\x10\x00\x00", "QED header bytes"),
])
def test_hostile_headers(tmp_path, off, patch, needle):
    img = tmp_path / "h.qed"
    assert run_qimg("create", "-f", "qed", img, "10M").rc == 0
    d = bytearray(img.read_bytes())
    d[off:off + len(patch)] = patch
    img.write_bytes(d)
    r = run_qimg("info", img)
    assert r.rc == 1 and needle in r.err and r.err.count("\n") == 1


def test_hostile_backing_name(tmp_path):
    img = tmp_path / "h.qed"
    assert run_qimg("create", "-f", "qed", img, "10M").rc == 0
    d = bytearray(img.read_bytes())
    d[16] = 1
    d[56:64] = struct.pack("<II", 0x10000, 0x100000)
    img.write_bytes(d)
    r = run_qimg("info", img)
    assert r.rc == 1 and "QED backing filename offset is invalid" in r.err


def test_check_cli_matches_qemu(tmp_path, oracle):
    img, bad = _leaky_and_corrupt(tmp_path)
    clean = tmp_path / "clean.qed"
    oracle("convert", "-O", "qed", img, clean)
    for path in (img, bad, clean):
        for args in ([], ["--output=json"]):
            ours = run_qimg("check", *args, path)
            theirs = oracle("check", *args, path, check=False)
            assert (ours.rc, ours.out) == (theirs.rc, theirs.out), path.name
    r = run_qimg("check", "-r", "all", bad)
    assert r.rc == 0 and "    2 leaked clusters\n    2 corruptions\n" in r.out
    assert oracle("check", bad, check=False).rc == 0
