"""Persistent dirty bitmaps against qemu-img 7.2: writes keep enabled bitmaps up to date, resize keeps
their tables valid, convert --bitmaps copies them, and images qemu refuses are refused.

The bitmap contents are read back by qemu itself: qemu-nbd exports a bitmap as the
``qemu:dirty-bitmap:NAME`` meta context, and ``qemu-img map`` on that export reports the dirty
ranges as ``"data": false``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time

import pytest

from tests.conftest import qemu, run_qimg

MiB = 1 << 20


def _need_nbd():
    if shutil.which("qemu-nbd") is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-nbd and qemu-io are needed")


def dirty_ranges(img, name) -> list[tuple[int, int]]:
    """The dirty ranges of bitmap ``name`` of ``img``, as qemu reads them."""
    # a unix socket path must stay under ~108 bytes: not inside a deep tmp_path
    sock_dir = tempfile.mkdtemp(prefix="qnbd", dir="/tmp" if os.path.isdir("/tmp") else None)
    sock = os.path.join(sock_dir, "s")
    proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-B", name, "-k", str(sock), str(img)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"qemu-nbd failed: {proc.stderr.read().decode()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
                break
            except OSError:
                assert time.monotonic() < deadline, "qemu-nbd did not start"
                time.sleep(0.02)
        opts = f"driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
        r = qemu("map", "--output=json", "--image-opts", opts)
        return [(e["start"], e["length"]) for e in json.loads(r.out) if not e["data"]]
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(sock_dir, ignore_errors=True)


def bitmap_info(img, *extra):
    info = json.loads(qemu("info", "--output=json", *extra, img).out)
    return info["format-specific"]["data"].get("bitmaps")


def _image(tmp_path, name, size="8M", bitmaps=(("b0", []), ("b1", ["--disable"]), ("b2", ["-g", "1M"])),
           opts=()):
    img = tmp_path / name
    qemu("create", "-q", "-f", "qcow2", *opts, img, size)
    for bm, extra in bitmaps:
        qemu("bitmap", "--add", *extra, img, bm)
    return img


def _qemu_io(img, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(img)], check=True, capture_output=True)


WRITES = [("w", 0, 4096), ("w", 100 * 1024, 200 * 1024), ("z", 2 * MiB, 128 * 1024), ("w", 3 * MiB + 512, 512),
          ("w", 8 * MiB - 4096, 4096)]


def test_writes_set_bits_of_enabled_bitmaps(tmp_path, qemu_img):
    """The same writes through qemu-io and through qimg's driver leave identical bitmaps and flags."""
    _need_nbd()
    from qimg.core import registry

    ref = _image(tmp_path, "ref.qcow2")
    mine = tmp_path / "mine.qcow2"
    shutil.copy(ref, mine)
    _qemu_io(ref, *[f"write {'-z ' if k == 'z' else ''}{o} {n}" for k, o, n in WRITES])
    drv = registry.open_image(str(mine), "qcow2", writable=True)
    try:
        for kind, off, n in WRITES:
            if kind == "z":
                drv.write_zeroes(off, n)
            else:
                drv.pwrite(off, b"\x5a" * n)
    finally:
        drv.close()
    assert bitmap_info(mine) == bitmap_info(ref)
    for bm in ("b0", "b1", "b2"):
        assert dirty_ranges(mine, bm) == dirty_ranges(ref, bm), bm
    assert dirty_ranges(mine, "b0") != [] and dirty_ranges(mine, "b1") == []
    assert qemu("check", mine).rc == 0


def test_interrupted_writer_leaves_bitmaps_in_use(tmp_path, qemu_img):
    """Before the first write the enabled bitmaps are marked in use: a writer that dies leaves them
    marked inconsistent, never silently stale."""
    from qimg.core import registry

    img = _image(tmp_path, "a.qcow2")
    drv = registry.open_image(str(img), "qcow2", writable=True)
    drv.pwrite(0, b"x" * 4096)
    flags = {b["name"]: b["flags"] for b in bitmap_info(img, "-U")}   # as a crash here would leave them
    drv.close()
    assert flags == {"b0": ["in-use", "auto"], "b1": [], "b2": ["in-use", "auto"]}
    assert {b["name"]: b["flags"] for b in bitmap_info(img)} == {"b0": ["auto"], "b1": [], "b2": ["auto"]}


def test_commit_into_base_with_bitmaps(tmp_path, qemu_img):
    """commit writes the overlay's data into a base with bitmaps: the same bits as qemu-img commit."""
    _need_nbd()
    results = []
    for tool in ("qemu", "qimg"):
        d = tmp_path / tool
        d.mkdir()
        base = _image(d, "base.qcow2")
        top = d / "top.qcow2"
        qemu("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
        _qemu_io(top, "write 64k 64k", "write 5M 1M", "write -z 7M 4k")
        r = qemu("commit", top) if tool == "qemu" else run_qimg("commit", top)
        assert r.rc == 0, r.err
        results.append((bitmap_info(base), [dirty_ranges(base, bm) for bm in ("b0", "b1", "b2")]))
    assert results[1] == results[0]


@pytest.mark.parametrize("grow_to", ["64G", "9M"])
def test_resize_keeps_bitmaps_valid(tmp_path, qemu_img, grow_to):
    """Growing past what one bitmap table cluster covers (32 GiB at 64 KiB granularity) grows the
    tables; before, qemu refused the resized image ("doesn't satisfy the constraints")."""
    _need_nbd()
    out = []
    for tool in ("qemu", "qimg"):
        img = _image(tmp_path, f"{tool}.qcow2")
        _qemu_io(img, "write 0 64k", "write 7M 64k")
        r = qemu("resize", img, grow_to) if tool == "qemu" else run_qimg("resize", img, grow_to)
        assert r.rc == 0, r.err
        _qemu_io(img, "write 8M 64k")
        assert qemu("check", img).rc == 0
        out.append((bitmap_info(img), [dirty_ranges(img, bm) for bm in ("b0", "b1", "b2")]))
    assert out[1] == out[0]


def _bitmap_source(tmp_path):
    src = _image(tmp_path, "src.qcow2")
    _qemu_io(src, "write 0 64k", "write 1M 300k", "write 6M 2M")
    qemu("bitmap", "--add", "-g", "512", src, "fine")
    _qemu_io(src, "write 4M 1536")
    return src


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4096"], ["-o", "cluster_size=2M"], ["-c"]],
                         ids=["default", "4k-clusters", "2M-clusters", "compressed"])
def test_convert_bitmaps_matches_qemu(tmp_path, qemu_img, opts):
    _need_nbd()
    src = _bitmap_source(tmp_path)
    out = []
    for tool in ("qemu", "qimg"):
        dst = tmp_path / f"{tool}.qcow2"
        args = ["convert", "--bitmaps", "-O", "qcow2", *opts, src, dst]
        r = qemu(*args) if tool == "qemu" else run_qimg(*args)
        assert r.rc == 0, r.err
        assert qemu("check", dst).rc == 0
        assert qemu("compare", src, dst).rc == 0
        out.append((bitmap_info(dst), [dirty_ranges(dst, bm) for bm in ("b0", "b1", "b2", "fine")]))
    assert out[1] == out[0]
    assert out[1][1][0] and out[1][1][3]   # the copies hold dirty bits


def test_convert_bitmaps_into_existing_image(tmp_path, qemu_img):
    """-n: the new bitmaps join the target's own, whose enabled ones record the copy's writes."""
    _need_nbd()
    src = _bitmap_source(tmp_path)
    out = []
    for tool in ("qemu", "qimg"):
        dst = _image(tmp_path, f"{tool}.qcow2", bitmaps=(("own", []),))
        args = ["convert", "-n", "--bitmaps", "-O", "qcow2", src, dst]
        r = qemu(*args) if tool == "qemu" else run_qimg(*args)
        assert r.rc == 0, r.err
        assert qemu("check", dst).rc == 0
        out.append((bitmap_info(dst), [dirty_ranges(dst, bm) for bm in ("own", "b0", "b2", "fine")]))
    assert out[1] == out[0]


def _directory_offset(data) -> int:
    """Where the bitmap directory of a qcow2 v3 image (as bytes) lies."""
    pos = struct.unpack_from(">I", data, 100)[0]   # header length: the extensions follow
    while True:
        etype, elen = struct.unpack_from(">II", data, pos)
        assert etype, "no bitmaps extension"
        if etype == 0x23852875:
            return struct.unpack_from(">Q", data, pos + 24)[0]
        pos += 8 + (elen + 7) // 8 * 8


def _set_flag_in_use(img, index=0):
    data = bytearray(img.read_bytes())
    p = _directory_offset(data)
    for _ in range(index):
        _t, _s, _f, _ty, _g, nsize, xsize = struct.unpack_from(">QIIBBHI", data, p)
        p = (p + 24 + xsize + nsize + 7) // 8 * 8
    struct.pack_into(">I", data, p + 12, struct.unpack_from(">I", data, p + 12)[0] | 1)
    img.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["raw-target", "vmdk-target", "raw-source", "v2-target", "two-sources",
                                  "skip-alone", "in-use", "in-use-skipped", "name-exists"])
def test_convert_bitmaps_refusals_match_qemu(tmp_path, qemu_img, case):
    src = _image(tmp_path, "src.qcow2")
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(MiB))
    if case.startswith("in-use"):
        _set_flag_in_use(src, 0)
        _set_flag_in_use(src, 2)
    args = {
        "raw-target": ["--bitmaps", "-O", "raw", src],
        "vmdk-target": ["--bitmaps", "-O", "vmdk", src],
        "raw-source": ["--bitmaps", "-f", "raw", "-O", "qcow2", raw],
        "v2-target": ["--bitmaps", "-O", "qcow2", "-o", "compat=0.10", src],
        "two-sources": ["--bitmaps", "-O", "qcow2", src, src],
        "skip-alone": ["--skip-broken-bitmaps", "-O", "qcow2", src],
        "in-use": ["--bitmaps", "-O", "qcow2", src],
        "in-use-skipped": ["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", src],
        "name-exists": ["--bitmaps", "-n", "-O", "qcow2", src],
    }[case]
    got = []
    for tool in ("qemu", "qimg"):
        dst = tmp_path / f"{tool}.out"
        if case == "name-exists":
            _image(tmp_path, dst.name, bitmaps=(("b0", []), ("b2", [])))
        r = qemu("convert", *args, dst, check=False) if tool == "qemu" else run_qimg("convert", *args, dst)
        err = r.err.replace("qemu-img: ", "X: ").replace("qimg: ", "X: ")
        got.append((r.rc, err, bitmap_info(dst) if r.rc == 0 else None))
    assert got[1] == got[0]


def test_bitmap_table_too_small_is_refused_as_qemu(tmp_path, qemu_img):
    img = _image(tmp_path, "a.qcow2", size="64G", bitmaps=(("b0", []),))
    data = bytearray(img.read_bytes())
    # the directory entry's table size (2 clusters for 64 GiB at 64 KiB granularity) set to 1
    doff = _directory_offset(data)
    assert struct.unpack_from(">I", data, doff + 8)[0] == 2
    struct.pack_into(">I", data, doff + 8, 1)
    img.write_bytes(bytes(data))
    for cmd in (["info"], ["check"], ["map"]):
        q = qemu(*cmd, img, check=False)
        r = run_qimg(*cmd, img)
        assert (r.rc, r.err.replace("qimg: ", "")) == (q.rc, q.err.replace("qemu-img: ", "")), cmd
    assert r.err.endswith("Bitmap 'b0' doesn't satisfy the constraints\n")


def test_hostile_bitmap_table_entry(tmp_path, qemu_img):
    """A bitmap table entry pointing past the end of the file: convert --bitmaps fails with one line."""
    img = _image(tmp_path, "a.qcow2", bitmaps=(("b0", []),))
    _qemu_io(img, "write 0 64k")
    data = bytearray(img.read_bytes())
    doff = _directory_offset(data)
    table = struct.unpack_from(">Q", data, doff)[0]
    assert struct.unpack_from(">Q", data, table)[0] != 0
    struct.pack_into(">Q", data, table, 0x40000000000)
    img.write_bytes(bytes(data))
    r = run_qimg("convert", "--bitmaps", "-O", "qcow2", img, tmp_path / "o.qcow2")
    assert r.rc == 1 and r.err.count("\n") == 1 and "invalid bitmap table entry" in r.err, r.err
    assert not (tmp_path / "o.qcow2").exists()


BITMAP_SCRIPT = [
    ["--add", "IMG", "a"],
    ["--add", "-g", "512", "--disable", "IMG", "b"],
    ["--merge", "bm0", "-b", "SRC", "IMG", "a"],        # a 4 KiB-granularity source into 64 KiB
    ["--add", "--merge", "a", "IMG", "c"],
    ["--enable", "--clear", "IMG", "b"],
    ["--add", "--remove", "--add", "-g", "1M", "IMG", "d"],   # in command-line order, repeats included
    ["--merge", "bm0", "-b", "SRC", "-F", "qcow2", "IMG", "b"],   # and into 512 bytes
    ["--disable", "IMG", "c"],
    ["--remove", "IMG", "a"],
]


def test_bitmap_command_matches_qemu(tmp_path, qemu_img):
    _need_nbd()
    src = tmp_path / "src.qcow2"
    qemu("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", src, "8M")
    qemu("bitmap", "--add", "-g", "4k", src, "bm0")
    _qemu_io(src, "write 100k 10k", "write 5M 1M")
    out = []
    for tool in ("qemu", "qimg"):
        img = tmp_path / f"{tool}.qcow2"
        qemu("create", "-q", "-f", "qcow2", img, "8M")
        _qemu_io(img, "write 0 64k")
        for step in BITMAP_SCRIPT:
            args = [str(img) if a == "IMG" else str(src) if a == "SRC" else a for a in step]
            r = qemu("bitmap", *args) if tool == "qemu" else run_qimg("bitmap", *args)
            assert r.rc == 0, (step, r.err)
        assert qemu("check", img).rc == 0
        names = [b["name"] for b in bitmap_info(img)]
        out.append((bitmap_info(img), [dirty_ranges(img, n) for n in names]))
    assert out[1] == out[0]
    assert [b["name"] for b in out[1][0]] == ["b", "c", "d"] and out[1][1][0] and out[1][1][1]


@pytest.mark.parametrize("args", [
    ["--add", "IMG", "b0"],                        # exists
    ["--remove", "IMG", "nope"],
    ["--clear", "IMG", "nope"],
    ["--add", "-g", "1000", "IMG", "g"],
    ["--add", "-g", "256", "IMG", "g"],
    ["--add", "-g", "4G", "IMG", "g"],
    ["--add", "-g", "abc", "IMG", "g"],
    ["IMG", "b0"],
    ["-g", "64k", "--remove", "IMG", "b0"],
    ["--add", "-b", "IMG", "IMG", "q"],
    ["--merge", "b0", "-F", "qcow2", "IMG", "q"],
    ["--add", "IMG"],
    ["--add", "IMG", "q", "extra"],
    ["--merge", "nosuch", "IMG", "b0"],
    ["--merge", "b0", "-b", "SMALL", "IMG", "b0"],   # sizes differ
    ["--add", "--merge", "b0", "-b", "MISSING", "IMG", "q"],
    ["--add", "IMG", "N" * 1024],
    ["--add", "-f", "raw", "RAW", "q"],
    ["--clear", "-f", "raw", "RAW", "q"],
    ["--add", "V2", "q"],
    ["--clear", "INUSE", "b0"],
    ["--merge", "b0", "INUSE", "b2"],
    ["--add", "--clear", "IMG", "fresh", "--remove"],  # the last option is an action too
])
def test_bitmap_command_errors_match_qemu(tmp_path, qemu_img, args):
    import re

    small = _image(tmp_path, "small.qcow2", size="4M", bitmaps=(("b0", []),))
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(MiB))
    v2 = tmp_path / "v2.qcow2"
    qemu("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M")
    got = []
    for tool in ("qemu", "qimg"):
        img = _image(tmp_path, f"{tool}.qcow2")
        inuse = _image(tmp_path, f"{tool}-inuse.qcow2")
        _set_flag_in_use(inuse, 0)
        subst = {"IMG": img, "SMALL": small, "MISSING": tmp_path / "missing.qcow2", "RAW": raw, "V2": v2,
                 "INUSE": inuse}
        argv = [str(subst.get(a, a)) for a in args]
        r = qemu("bitmap", *argv, check=False) if tool == "qemu" else run_qimg("bitmap", *argv)
        err = r.err.replace(f"'{img}'", "NODE").replace(f"'{raw}'", "NODE").replace(f"'{v2}'", "NODE")
        err = err.replace(str(img), "IMG").replace(str(inuse), "INUSE")
        err = re.sub(r"'?#block\d+'?", "NODE", err.replace("qemu-img: ", "X: ").replace("qimg: ", "X: "))
        got.append((r.rc, err, bitmap_info(img)))
    assert got[1] == got[0]


@pytest.mark.parametrize("extra,snap", [([], "s1"), (["--disable"], "s1"), ([], "nosuch")])
def test_snapshot_apply_refused_with_bitmaps(tmp_path, qemu_img, extra, snap):
    got = []
    for tool in ("qemu", "qimg"):
        img = tmp_path / f"{tool}.qcow2"
        qemu("create", "-q", "-f", "qcow2", img, "4M")
        qemu("snapshot", "-c", "s1", img)
        qemu("bitmap", "--add", *extra, img, "bm")
        r = qemu("snapshot", "-a", snap, img, check=False) if tool == "qemu" else run_qimg("snapshot", "-a", snap, img)
        got.append((r.rc, r.err.replace("qemu-img: ", "").replace("qimg: ", ""), bitmap_info(img),
                    qemu("check", img).rc))
    assert got[1] == got[0]
    assert got[1][1] == f"Could not apply snapshot '{snap}': Device has active dirty bitmaps\n"
