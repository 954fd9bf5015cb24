"""convert -l: copying the guest view of an internal qcow2 snapshot, and qemu-img 7.2's errors around it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import qemu, run_qimg, sha256_file, write_pattern


@pytest.fixture
def snap_image(tmp_path, oracle):
    """A qcow2 image with snapshots 'one' (id 1) and 'two' (id 2, grown to 2 MiB) and newer data on top."""
    qemu_io = shutil.which("qemu-io")
    if qemu_io is None:
        pytest.skip("qemu-io not installed")
    img = tmp_path / "s.qcow2"
    oracle("create", "-q", "-f", "qcow2", img, "1M")

    def io(*cmds):
        args = [qemu_io, "-f", "qcow2"]
        for c in cmds:
            args += ["-c", c]
        subprocess.run(args + [str(img)], check=True, capture_output=True, timeout=60)

    io("write -P 0x11 0 64k", "write -P 0x12 300k 5k")
    oracle("snapshot", "-c", "one", img)
    oracle("resize", "-q", img, "2M")
    io("write -P 0x21 32k 64k", "write -P 0x22 1500k 4k")
    oracle("snapshot", "-c", "two", img)
    io("write -P 0x31 0 1M", "write -z 1536k 64k")
    return img


def _both(tmp_path, *args):
    r = run_qimg("convert", *args, tmp_path / "mine.out")
    q = qemu("convert", *args, tmp_path / "ref.out", check=False)
    return r, q


@pytest.mark.parametrize("spec", ["one", "1", "two", "2", "snapshot.name=one", "snapshot.id=2",
                                  "snapshot.id=1,snapshot.name=one"])
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_snapshot_view_matches_qemu(tmp_path, snap_image, spec, out_fmt):
    r, q = _both(tmp_path, "-l", spec, "-O", out_fmt, snap_image)
    assert r.rc == q.rc == 0, r.err
    mine = tmp_path / "mine.out"
    ref = tmp_path / "ref.out"
    if out_fmt == "raw":
        assert sha256_file(mine) == sha256_file(ref)
    else:
        a, b = tmp_path / "a.raw", tmp_path / "b.raw"
        qemu("convert", "-O", "raw", mine, a)
        qemu("convert", "-O", "raw", ref, b)
        assert sha256_file(a) == sha256_file(b)
        import json

        mi = json.loads(run_qimg("info", "--output=json", mine).out)
        qi = json.loads(qemu("info", "--output=json", ref).out)
        assert mi["virtual-size"] == qi["virtual-size"] and "snapshots" not in mi


def test_snapshot_view_differs_from_current(tmp_path, snap_image):
    r = run_qimg("convert", "-l", "one", "-O", "raw", snap_image, tmp_path / "one.raw")
    assert r.rc == 0
    # like qemu-img, the image keeps its current size (2 MiB): past the snapshot's 1 MiB it reads as zeros
    data = (tmp_path / "one.raw").read_bytes()
    assert len(data) == 2 << 20 and data[:65536] == b"\x11" * 65536 and not data[1 << 20:].strip(b"\0")
    cur = run_qimg("convert", "-O", "raw", snap_image, tmp_path / "cur.raw")
    assert cur.rc == 0 and sha256_file(tmp_path / "cur.raw") != sha256_file(tmp_path / "one.raw")


@pytest.mark.parametrize("args", [
    ("-l", "nope"), ("-l", "snapshot.name=nope"), ("-l", "snapshot.id=9"), ("-l", "snapshot.id=1,snapshot.name=two"),
    ("-l", "snapshot.foo=1"), ("-s", "one"),
])
def test_snapshot_errors_match_qemu(tmp_path, snap_image, args):
    r, q = _both(tmp_path, *args, "-O", "raw", snap_image)
    assert q.rc == r.rc == 1
    assert r.err.replace("qimg", "qemu-img") == q.err
    assert r.out == q.out
    assert not (tmp_path / "mine.out").exists() and not (tmp_path / "ref.out").exists()


def test_missing_snapshot_message(tmp_path, snap_image):
    r = run_qimg("convert", "-l", "snapshot.name=x", "-O", "raw", snap_image, tmp_path / "o.raw")
    assert (r.rc, r.err) == (1, "qimg: Failed to load snapshot: Can't find snapshot\n")


def test_measure_snapshot_keeps_current_size(snap_image):
    args = ("measure", "-O", "qcow2", "-l", "one", snap_image)
    assert run_qimg(*args).out == qemu(*args).out


def test_snapshot_on_raw_and_multiple_sources(tmp_path, snap_image):
    raw = write_pattern(tmp_path / "src.raw", 1 << 20, [(0, 4096)])
    for args in (("-l", "one", "-O", "raw", raw), ("-l", "one", "-O", "raw", snap_image, snap_image)):
        r, q = _both(tmp_path, *args)
        assert q.rc == r.rc == 1
        assert r.err.replace("qimg:", "qemu-img:") == q.err
