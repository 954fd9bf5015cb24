"""qemu-img measure -O qcow2: sizes equal qemu-img's for --size and for source images."""

from __future__ import annotations

import random
import subprocess

import pytest

from tests.conftest import qemu_img_path, run_qimg

MiB = 1 << 20


@pytest.fixture(scope="module")
def srcdir(tmp_path_factory):
    if qemu_img_path() is None:
        pytest.skip("qemu-img not installed")
    d = tmp_path_factory.mktemp("measure")
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(20 * MiB + 1024)
        rnd = random.Random(1)
        for off, n in ((1000, 5000), (3 * MiB, 2 * MiB), (9 * MiB + 65536, 4096), (20 * MiB, 1024)):
            f.seek(off)
            f.write(rnd.randbytes(n))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-c", raw, d / "comp.qcow2"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,extended_l2=off",
                    d / "small.qcow2", "8M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 1 5000 70000", "-c", "write -z 1M 1M", str(d / "small.qcow2")],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", d / "bm.qcow2", "64M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", d / "bm.qcow2", "b0"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "512k", d / "bm.qcow2", "second-bitmap"], check=True)
    return d


CASES = [
    ["--size", "1G"], ["--size", "0"], ["--size", "1000"], ["-o", "cluster_size=512", "--size", "1G"],
    ["-o", "extended_l2=on", "--size", "100G"], ["-o", "refcount_bits=1", "--size", "1T"],
    ["-o", "refcount_bits=64,cluster_size=2M", "--size", "3T"], ["-o", "compat=0.10", "--size", "1T"],
    ["-o", "preallocation=full", "--size", "5G"], ["-o", "cluster_size=512", "--size", "1T"],
    ["-o", "compat=0.10,refcount_bits=8", "--size", "1G"], ["-o", "cluster_size=3k", "--size", "1G"],
    ["{d}/src.raw"], ["-o", "cluster_size=4k", "{d}/src.raw"], ["-o", "preallocation=metadata", "{d}/src.raw"],
    ["-o", "preallocation=falloc", "{d}/comp.qcow2"], ["{d}/comp.qcow2"], ["-o", "cluster_size=512", "{d}/small.qcow2"],
    ["-o", "cluster_size=2M,extended_l2=on", "{d}/small.qcow2"], ["-o", "backing_file=x.qcow2", "{d}/small.qcow2"],
    ["{d}/bm.qcow2"], ["-o", "compat=0.10", "{d}/bm.qcow2"], ["-o", "cluster_size=4k", "{d}/bm.qcow2"],
    ["--output=json", "{d}/bm.qcow2"], ["--output=json", "--size", "7G"],
]


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a).replace("{d}/", ""))
def test_measure_matches_qemu(srcdir, args):
    args = [a.replace("{d}", str(srcdir)) for a in args]
    q = subprocess.run(["qemu-img", "measure", "-O", "qcow2", *args], capture_output=True, text=True, check=False)
    r = run_qimg("measure", "-O", "qcow2", *args)
    assert r.rc == q.returncode
    assert r.out == q.stdout
    assert r.err.replace("qimg:", "qemu-img:") == q.stderr


def test_measure_direct_api():
    from qimg.formats.qcow2 import Qcow2Driver

    assert Qcow2Driver.measure({}, 1 << 30) == {"required": 393216, "fully-allocated": 1074135040}
