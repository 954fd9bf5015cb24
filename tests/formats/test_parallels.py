"""parallels: corpus images, create/convert/write, check, .hdd bundles, hostile headers."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess

import pytest

from tests.conftest import decompress_to, guest_sha256, run_qimg
from tests.formats.test_qcow1 import make_src, qemu_map, qimg_map

SINGLE = ["parallels-v1.bz2", "parallels-v2.bz2", "fake.parallels.bz2", "parallels-with-bitmap.bz2"]
GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"


def _images(expected):
    return expected.get("images", expected)


def qemu_check(img, *extra):
    p = subprocess.run(["qemu-img", "check", "--output=json", *extra, str(img)], capture_output=True, text=True,
                       check=False)
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None


def bundle(shared_images, tmp_path, name):
    """Copy a .hdd bundle into tmp_path with its parts decompressed."""
    src = shared_images / "parallels" / name
    dst = tmp_path / name
    dst.mkdir()
    for f in src.iterdir():
        if f.name.endswith(".gz"):
            decompress_to(f, dst)
        else:
            shutil.copyfile(f, dst / f.name)
    return dst


@pytest.mark.parametrize("name", SINGLE)
def test_corpus_single_files(shared_images, expected_images, tmp_path, name, oracle):
    exp = _images(expected_images)[f"parallels/{name}"]
    img = decompress_to(shared_images / "parallels" / name, tmp_path)
    r = run_qimg("info", "--output=json", img)
    assert r.rc == 0, r.err
    info = json.loads(r.out)
    assert info["format"] == "parallels" and info["virtual-size"] == exp["virtual_size"]
    if exp["raw_sha256"]:
        assert guest_sha256(img) == exp["raw_sha256"]
    for args in ([], ["--output=json"]):
        assert run_qimg("info", *args, img).out == oracle("info", *args, img).out
        # check counts the BAT's entries (fake.parallels maps only half its virtual size)
        r, q = run_qimg("check", *args, img), oracle("check", *args, img, check=False)
        assert (r.rc, r.out) == (q.rc, q.out)
    assert qimg_map(img) == qemu_map(img)


def test_corpus_bitmap_head_and_check(shared_images, expected_images, tmp_path):
    exp = _images(expected_images)["parallels/parallels-with-bitmap.bz2"]
    img = decompress_to(shared_images / "parallels" / "parallels-with-bitmap.bz2", tmp_path)
    from qimg.core.chain import Chain

    with Chain.open(str(img)) as ch:
        assert hashlib.sha256(ch.read(0, 64 << 20)).hexdigest() == exp["raw_head_64MiB_sha256"]
    from qimg.core import registry

    drv = registry.open_image(str(img), "parallels")
    try:
        res = drv.check(None)
    finally:
        drv.close()
    q = exp["qemu_check"]["result"]
    assert res["leaks"] == q["leaks"] == 2
    assert res["image-end-offset"] == q["image-end-offset"]
    assert res["total-clusters"] == q["total-clusters"]


def test_bundles(shared_images, expected_images, tmp_path):
    exp = _images(expected_images)
    # expanding and plain bundles: the directory or the descriptor opens as the whole disk
    for name in ("expanding.hdd", "plain.hdd"):
        b = bundle(shared_images, tmp_path, name)
        want = exp[f"parallels/{name}/{name}.0.{GUID}.hds.gz"]["raw_sha256"]
        for path in (b, b / "DiskDescriptor.xml"):
            r = run_qimg("info", "--output=json", path)
            assert r.rc == 0, r.err
            assert json.loads(r.out)["virtual-size"] == 104857600
            assert guest_sha256(path) == want
    # split bundle: six parts back to back; each part's allocated data shows through at its range
    b = bundle(shared_images, tmp_path, "split.hdd")
    from qimg.core.chain import Chain

    with Chain.open(str(b)) as ch:
        assert ch.virtual_size == 10 << 30
        pos = 0
        for i in range(6):
            p = exp[f"parallels/split.hdd/split.hdd.{i}.{GUID}.hds.gz"]
            size = p["virtual_size"]
            assert hashlib.sha256(ch.read(pos, min(size, 64 << 20))).hexdigest() == p["raw_head_64MiB_sha256"]
            part = b / f"split.hdd.{i}.{GUID}.hds"
            with Chain.open(str(part), "parallels") as pc:
                want = [(e.start + pos, e.length) for e in pc.extents() if e.data]
                got = [(e.start, e.length) for e in ch.extents(pos, pos + size) if e.data]
                assert want == got
                for off, n in got:
                    assert ch.read(off, n) == pc.read(off - pos, n)
            pos += size
        # the map names the part files
        ext = ch.block_status(0, 1 << 20)
        assert ext.data and ext.filename.endswith(f"split.hdd.0.{GUID}.hds")


def test_bundle_hostile_descriptor(tmp_path):
    b = tmp_path / "bad.hdd"
    b.mkdir()
    (b / "DiskDescriptor.xml").write_text(
        "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'>]><Parallels_disk_image/>")
    r = run_qimg("info", b)
    assert r.rc == 1 and "document type" in r.err
    (b / "DiskDescriptor.xml").write_text(
        "<?xml version='1.0'?><Parallels_disk_image><Disk_Parameters><Disk_size>2048</Disk_size>"
        "</Disk_Parameters><StorageData><Storage><Start>0</Start><End>2048</End><Image><GUID>g</GUID>"
        "<Type>Plain</Type><File>../../etc/passwd</File></Image></Storage></StorageData></Parallels_disk_image>")
    r = run_qimg("info", b)
    assert r.rc == 1 and "leaves the bundle" in r.err and r.err.count("\n") == 1


@pytest.mark.parametrize("args", [["10M"], ["-o", "cluster_size=64k", "1000000"], ["-o", "cluster_size=3000", "5M"]])
def test_create_matches_qemu(tmp_path, oracle, args):
    r = run_qimg("create", "-f", "parallels", tmp_path / "a.hds", *args)
    assert r.rc == 0, r.err
    q = oracle("create", "-f", "parallels", tmp_path / "b.hds", *args)
    assert r.out.replace("a.hds", "b.hds") == q.out
    assert (tmp_path / "a.hds").read_bytes() == (tmp_path / "b.hds").read_bytes()


def test_create_help_and_limits(tmp_path, oracle):
    assert run_qimg("create", "-f", "parallels", "-o", "help").out == \
        oracle("create", "-f", "parallels", "-o", "help").out
    r = run_qimg("create", "-f", "parallels", "-o", "cluster_size=2G", tmp_path / "x.hds", "1M")
    assert r.rc == 1 and "Cluster size is too large" in r.err
    r = run_qimg("create", "-f", "parallels", tmp_path / "x.hds", "8000T")
    assert r.rc == 1 and "Image size is too large for this cluster size" in r.err


def test_convert_and_write(tmp_path, oracle):
    src = make_src(tmp_path)
    ours, theirs = tmp_path / "o.hds", tmp_path / "t.hds"
    assert run_qimg("convert", "-O", "parallels", src, ours).rc == 0
    oracle("convert", "-O", "parallels", src, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    assert qemu_check(ours)[0] == 0
    assert oracle("compare", src, ours).rc == 0
    # partial writes into unallocated and allocated clusters
    from qimg.core import registry

    expect = bytearray(src.read_bytes())
    drv = registry.open_image(str(ours), "parallels", writable=True)
    try:
        with open(ours, "rb") as f:
            assert f.read(48)[44:48] == b"Ynot"
        for off, data in ((100, b"A" * 50), ((2 << 20) - 10, b"B" * 20), (4190000, b"D" * 4304)):
            drv.pwrite(off, data)
            expect[off:off + len(data)] = data
        drv.write_zeroes(3 << 20, 5000)
        expect[3 << 20:(3 << 20) + 5000] = bytes(5000)
    finally:
        drv.close()
    with open(ours, "rb") as f:
        assert f.read(48)[44:48] == bytes(4)
    want = tmp_path / "want.raw"
    want.write_bytes(expect)
    assert oracle("compare", "-F", "raw", ours, want).rc == 0
    assert qemu_check(ours)[0] == 0


def _open_rw(path):
    from qimg.core import registry

    return registry.open_image(str(path), "parallels", writable=True)


def test_check_and_repair(tmp_path, oracle):
    img = tmp_path / "n.hds"
    oracle("create", "-f", "parallels", img, "10M")
    subprocess.run(["qemu-io", "-c", "write -P 1 4k 4k", "-c", "write -P 2 5M 1M", str(img)], check=True,
                   capture_output=True)
    bad = tmp_path / "o.hds"
    d = bytearray(img.read_bytes())
    struct.pack_into("<I", d, 68, 0x50)  # cluster 1 far outside the file
    bad.write_bytes(d)
    leak = tmp_path / "l.hds"
    leak.write_bytes(img.read_bytes() + bytes(1 << 20))
    inuse = tmp_path / "u.hds"
    d = bytearray(img.read_bytes())
    d[44:48] = b"Ynot"
    inuse.write_bytes(d)
    from qimg.core import registry

    for path in (bad, leak, inuse):
        _rc, q = qemu_check(path)
        drv = registry.open_image(str(path), "parallels")
        ours = drv.check(None)
        drv.close()
        for k in ("image-end-offset", "total-clusters", "allocated-clusters"):
            assert ours[k] == q[k], (path.name, k)
        assert ours["corruptions"] == q.get("corruptions", 0)
        assert ours["leaks"] == q.get("leaks", 0)
        assert ours["fragmented-clusters"] == q.get("fragmented-clusters", 0)
    drv = registry.open_image(str(bad), "parallels")
    assert any("cluster 1 is outside image" in m for m in drv.check(None)["messages"])
    drv.close()
    for path in (bad, leak, inuse):
        drv = _open_rw(path)
        res = drv.check("all")
        drv.close()
        assert res["corruptions"] == 0 and res["leaks"] == 0
        assert qemu_check(path)[0] == 0, path.name


@pytest.mark.parametrize("off,patch,needle", [
    (28, b"\0\0\0\0", "Zero sectors per track"),
    (28, b"\0\0\0\x01", "parallels cluster sectors"),
    (32, b"\0\0\0\x40", "parallels BAT entries"),
    (32, b"\0\0\x10\0", "extends past the end of the file"),
    (16, b"\3\0\0\0", "Unsupported Parallels image version"),
])
def test_hostile_headers(tmp_path, off, patch, needle):
    img = tmp_path / "h.hds"
    assert run_qimg("create", "-f", "parallels", img, "10M").rc == 0
    d = bytearray(img.read_bytes())
    d[off:off + len(patch)] = patch
    img.write_bytes(d)
    r = run_qimg("info", "-f", "parallels", img)
    assert r.rc == 1 and needle in r.err and r.err.count("\n") == 1


def test_check_cli_matches_qemu(tmp_path, oracle):
    img = tmp_path / "n.hds"
    oracle("create", "-f", "parallels", img, "10M")
    subprocess.run(["qemu-io", "-c", "write -P 1 4k 4k", "-c", "write -P 2 5M 1M", str(img)], check=True,
                   capture_output=True)
    bad = tmp_path / "o.hds"
    d = bytearray(img.read_bytes())
    struct.pack_into("<I", d, 68, 0x50)
    bad.write_bytes(d)
    leak = tmp_path / "l.hds"
    leak.write_bytes(img.read_bytes() + bytes(1 << 20))
    for path in (img, bad, leak):
        for args in ([], ["--output=json"]):
            ours = run_qimg("check", *args, path)
            theirs = oracle("check", *args, path, check=False)
            assert (ours.rc, ours.out, ours.err) == (theirs.rc, theirs.out, theirs.err), path.name
    r = run_qimg("check", "-r", "all", bad)
    assert r.rc == 0 and "Repairing cluster 1 is outside image" in r.err
    assert "No errors were found on the image." in r.out
    assert oracle("check", bad, check=False).rc == 0


def test_bundle_write_across_storages(shared_images, tmp_path, oracle):
    b = bundle(shared_images, tmp_path, "split.hdd")
    from qimg.core import registry
    from qimg.core.chain import Chain

    boundary = 3989504 * 512
    data = bytes(range(256)) * 64
    drv = registry.open_image(str(b), None, writable=True)
    try:
        drv.pwrite(boundary - 5000, data)
    finally:
        drv.close()
    with Chain.open(str(b)) as ch:
        assert ch.read(boundary - 5000, len(data)) == data
    # each part stays a valid image for qemu-img
    for i in (0, 1):
        assert qemu_check(b / f"split.hdd.{i}.{GUID}.hds")[0] == 0


def test_bundle_snapshot_chain(tmp_path):
    """A storage with a snapshot: the newest image answers, its parent fills the rest."""
    from tests.conftest import write_pattern

    b = tmp_path / "snap.hdd"
    b.mkdir()
    base = write_pattern(b / "snap.hdd.0.{A}.hds", 2 << 20, [(0, 2 << 20)])
    assert run_qimg("create", "-f", "parallels", "-o", "cluster_size=64k", b / "snap.hdd.0.{B}.hds", "2M").rc == 0
    from qimg.core import registry

    drv = registry.open_image(str(b / "snap.hdd.0.{B}.hds"), "parallels", writable=True)
    drv.pwrite(65536, b"\x5a" * 65536)
    drv.close()
    (b / "DiskDescriptor.xml").write_text(
        "<?xml version='1.0' encoding='UTF-8'?><Parallels_disk_image Version=\"1.0\"><Disk_Parameters>"
        "<Disk_size>4096</Disk_size></Disk_Parameters><StorageData><Storage><Start>0</Start><End>4096</End>"
        "<Blocksize>128</Blocksize>"
        "<Image><GUID>{A}</GUID><Type>Plain</Type><File>snap.hdd.0.{A}.hds</File></Image>"
        "<Image><GUID>{B}</GUID><Type>Compressed</Type><File>snap.hdd.0.{B}.hds</File></Image>"
        "</Storage></StorageData><Snapshots><Shot><GUID>{A}</GUID><ParentGUID>{00000000-0000-0000-0000-000000000000}"
        "</ParentGUID></Shot><Shot><GUID>{B}</GUID><ParentGUID>{A}</ParentGUID></Shot></Snapshots>"
        "</Parallels_disk_image>")
    expect = bytearray(base.read_bytes())
    expect[65536:131072] = b"\x5a" * 65536
    assert guest_sha256(b) == hashlib.sha256(expect).hexdigest()
