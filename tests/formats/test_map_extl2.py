"""map: host offsets of unallocated subclusters in allocated extended-L2 clusters, as qemu-img 7.2 prints them."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import run_qimg


@pytest.fixture
def qemu_io(oracle):
    path = shutil.which("qemu-io")
    if path is None:
        pytest.skip("qemu-io not installed")

    def run(image, *cmds, fmt="qcow2"):
        args = [path, "-f", fmt]
        for c in cmds:
            args += ["-c", c]
        subprocess.run(args + [str(image)], check=True, capture_output=True, timeout=60)
    return run


WRITES = ("write -P 1 0 4k", "write -P 2 100k 8k", "write -z 200k 16k", "write -P 3 300k 64k",
          "discard 320k 8k")


def _same_map(oracle, img):
    """Identical human and JSON maps; returns the JSON one."""
    outs = []
    for extra in ((), ("--output=json",)):
        mine = run_qimg("map", *extra, img)
        ref = oracle("map", *extra, img)
        assert mine.rc == 0, mine.err
        assert mine.out == ref.out
        outs.append(ref.out)
    return outs[-1]


@pytest.mark.parametrize("opts", ["preallocation=metadata,extended_l2=on",
                                  "preallocation=metadata,extended_l2=on,cluster_size=128k",
                                  "preallocation=falloc,extended_l2=on,cluster_size=32k",
                                  "extended_l2=on"])
def test_extended_l2_unallocated_subcluster_offsets(tmp_path, oracle, qemu_io, opts):
    img = tmp_path / "x.qcow2"
    oracle("create", "-q", "-f", "qcow2", "-o", opts, img, "1M")
    qemu_io(img, *WRITES)
    out = _same_map(oracle, img)
    if "preallocation" in opts:
        # the case that matters: not present, but with the host offset of the preallocated cluster
        assert '"present": false, "zero": true, "data": false, "offset": ' in out


def test_extended_l2_over_backing(tmp_path, oracle, qemu_io):
    base = tmp_path / "base.qcow2"
    oracle("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io(base, "write -P 9 0 1M")
    img = tmp_path / "top.qcow2"
    oracle("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", "-o", "extended_l2=on", img)
    qemu_io(img, "write -P 1 4k 4k", "write -P 2 130k 2k", "write -z 600k 32k")
    _same_map(oracle, img)


def test_extended_l2_data_file(tmp_path, oracle, qemu_io, monkeypatch):
    monkeypatch.chdir(tmp_path)
    oracle("create", "-q", "-f", "qcow2", "-o", "data_file=x.data,extended_l2=on,preallocation=metadata",
           "x.qcow2", "1M")
    qemu_io("x.qcow2", *WRITES)
    _same_map(oracle, "x.qcow2")
