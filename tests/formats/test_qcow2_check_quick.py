"""The numpy-free check of a consistent qcow2 agrees with the full walk, and leaves every problem to it."""

import struct
import subprocess

import pytest

from qimg.core.check import CheckResult
from qimg.formats.qcow2 import lifecycle as lc
from qimg.formats.qcow2.check import _check_once
from qimg.formats.qcow2.check_quick import quick_check
from qimg.io.store import FileStore
from tests.conftest import qemu

FIELDS = ("corruptions", "leaks", "check_errors", "image_end_offset", "total_clusters", "allocated_clusters",
          "fragmented_clusters", "compressed_clusters")


def _io(path, *cmds):
    args = []
    for c in cmds:
        args += ["-c", c]
    subprocess.run(["qemu-io", "-f", "qcow2", *args, str(path)], check=True, capture_output=True)


def _both(path):
    with FileStore(str(path), False) as st:
        meta = lc.Qcow2Meta(st)
        quick = quick_check(meta)
        full, _state = _check_once(lc.Qcow2Meta(st), False, lambda m: None)
    return quick, full


def _same(a: CheckResult, b: CheckResult):
    assert {f: getattr(a, f) for f in FIELDS} == {f: getattr(b, f) for f in FIELDS}


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096", "compat=0.10",
                                  "cluster_size=512", "cluster_size=2M"])
@pytest.mark.parametrize("snapshots", [0, 1, 2])
def test_quick_check_agrees_with_the_full_walk(tmp_path, qemu_img, opts, snapshots):
    img = tmp_path / "a.qcow2"
    qemu("create", "-q", "-f", "qcow2", "-o", opts, str(img), "64M")
    _io(img, "write -P 1 0 1M", "write -P 2 3M 64k", "write -z 5M 1M", "write -P 3 40M 2M")
    for i in range(snapshots):
        qemu("snapshot", "-c", f"s{i}", str(img))
        _io(img, f"write -P {9 + i} {i}M 512k", "write -P 4 50M 64k")
    if snapshots == 2:
        qemu("snapshot", "-d", "s0", str(img))
    quick, full = _both(img)
    assert quick is not None
    _same(quick, full)
    assert full.corruptions == full.leaks == 0


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _first_refblock(path):
    with open(path, "rb") as f:
        hdr = f.read(104)
        (rt_off,) = struct.unpack(">Q", hdr[48:56])
        f.seek(rt_off)
        (blk,) = struct.unpack(">Q", f.read(8))
    return blk


@pytest.mark.parametrize("damage", ["leak", "low refcount", "copied flag", "compressed"])
def test_problems_are_left_to_the_full_walk(tmp_path, qemu_img, damage):
    img = tmp_path / "a.qcow2"
    qemu("create", "-q", "-f", "qcow2", str(img), "16M")
    _io(img, "write -P 1 0 256k")
    blk = _first_refblock(img)
    if damage == "leak":
        _patch(img, blk + 2 * (img.stat().st_size // 65536 - 1), b"\x00\x02")  # the last data cluster, twice
    elif damage == "low refcount":
        _patch(img, blk + 2 * (img.stat().st_size // 65536 - 1), b"\x00\x00")  # the last data cluster
    elif damage == "copied flag":
        qemu("snapshot", "-c", "s", str(img))
        with open(img, "rb") as f:
            hdr = f.read(48)
        (l1_off,) = struct.unpack(">Q", hdr[40:48])
        with open(img, "rb") as f:
            f.seek(l1_off)
            (l1e,) = struct.unpack(">Q", f.read(8))
        _patch(img, l1_off, struct.pack(">Q", l1e | (1 << 63)))  # shared table marked as not shared
    else:
        qemu("convert", "-c", "-O", "qcow2", str(img), str(tmp_path / "c.qcow2"))
        img = tmp_path / "c.qcow2"
    quick, full = _both(img)
    assert quick is None
    if damage != "compressed":
        assert full.corruptions + full.leaks > 0
