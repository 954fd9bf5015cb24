"""convert to a pipe: the bytes a file convert writes, front to back; the rest refused with the reason."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import sys
import threading

import pytest

from tests.conftest import run_qimg, sha256_file, write_pattern

MiB = 1 << 20


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    # several L2 tables' worth of guest space, data at unaligned places, a hole at the end
    return write_pattern(d / "src.raw", 3 << 30, [(0, 70_000), (5 * MiB + 512, 3 * MiB), (700 * MiB, 65536),
                                                   (1100 * MiB + 4096, 2 * MiB + 100), (2 << 30, MiB)])


def _to_pipe(*args, cwd=None):
    """qimg convert ... /dev/stdout with stdout a pipe: (status, sha256 and length of the bytes, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "qimg", "convert", *map(str, args), "/dev/stdout"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    h = hashlib.sha256()
    n = 0
    while True:
        b = p.stdout.read(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
    err = p.stderr.read().decode()
    p.wait()
    return p.returncode, h.hexdigest(), n, err


def _masked_sha(path, fmt):
    """sha256 with the fields a create fills at random (or from the clock) blanked out."""
    data = bytearray(open(path, "rb").read()) if os.path.getsize(path) < 64 * MiB else None
    if fmt == "vpc":
        foot = len(data) - 512
        data[foot + 24:foot + 28] = bytes(4)   # timestamp
        data[foot + 64:foot + 84] = bytes(20)  # checksum, unique id
    elif fmt == "vmdk":
        # the embedded descriptor: its CID (printed unpadded) and long content id are random
        at, size = (struct.unpack_from("<Q", data, o)[0] * 512 for o in (28, 36))
        desc = re.sub(rb"CID=[0-9a-f]{1,8}\n", b"CID=\n", bytes(data[at:at + size]).rstrip(b"\0"))
        desc = re.sub(rb'longContentID = "[0-9a-f]{32}"', b'longContentID = ""', desc)
        data = data[:at] + desc + data[at + size:]
    return hashlib.sha256(data).hexdigest()


def test_raw_to_stdout_equals_the_file(sparse, tmp_path):
    rc, sha, n, err = _to_pipe("-f", "raw", "-O", "raw", sparse)
    assert (rc, err) == (0, "")
    assert n == 3 << 30 and sha == sha256_file(sparse)


@pytest.mark.parametrize("workers", ["1", "8"])
def test_qcow2_to_stdout_equals_the_file(oracle, sparse, tmp_path, workers):
    """A pipe gets the clusters in guest order whatever -m says; a file convert with one worker too (several
    workers may allocate clusters in the order they finish)."""
    rc, sha, n, err = _to_pipe("-m", workers, "-f", "raw", "-O", "qcow2", sparse)
    assert (rc, err) == (0, "")
    f = tmp_path / "f.qcow2"
    assert run_qimg("convert", "-m", "1", "-f", "raw", "-O", "qcow2", sparse, f).rc == 0
    assert (n, sha) == (os.path.getsize(f), sha256_file(f))
    assert oracle("check", f).rc == 0
    assert oracle("compare", "-f", "raw", "-F", "qcow2", sparse, f).rc == 0


@pytest.mark.parametrize("fmt,opts", [("vpc", "subformat=fixed"), ("vmdk", "subformat=streamOptimized")])
def test_fixed_vhd_and_stream_vmdk_through_a_fifo(oracle, tmp_path, fmt, opts):
    src = write_pattern(tmp_path / "src.raw", 40 * MiB, [(0, 4096), (3 * MiB, 2 * MiB), (39 * MiB, 100_000)])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fifo = tmp_path / "a" / "disk.img"
    os.mkfifo(fifo)
    got = tmp_path / "got.img"

    def drain():
        with open(fifo, "rb") as r, open(got, "wb") as w:
            while b := r.read(MiB):
                w.write(b)

    t = threading.Thread(target=drain)
    t.start()
    r = run_qimg("convert", "-f", "raw", "-O", fmt, "-o", opts, src, fifo)
    t.join()
    assert (r.rc, r.err) == (0, "")
    assert os.path.exists(fifo) and not os.path.isfile(fifo)  # the FIFO is still a FIFO
    ref = tmp_path / "b" / "disk.img"
    assert run_qimg("convert", "-f", "raw", "-O", fmt, "-o", opts, src, ref).rc == 0
    assert _masked_sha(got, fmt) == _masked_sha(ref, fmt)
    assert oracle("compare", "-f", "raw", "-F", fmt, src, got).out.endswith("Images are identical.\n")


@pytest.mark.parametrize("args,reason", [
    (["-O", "vdi"], "the vdi format needs to seek while it is written"),
    (["-O", "vpc"], "vpc goes down a pipe only as a fixed image (-o subformat=fixed)"),
    (["-O", "vmdk"], "vmdk goes down a pipe only as a stream (-o subformat=streamOptimized)"),
    (["-O", "qcow2", "-c"], "compression needs to seek in the qcow2 format"),
    (["-O", "raw", "-o", "preallocation=falloc"], "preallocation=falloc needs a file"),
])
def test_refused_with_the_reason(tmp_path, args, reason):
    src = write_pattern(tmp_path / "src.raw", MiB, [(0, 4096)])
    rc, sha, n, err = _to_pipe("-f", "raw", *args, src)
    assert rc == 1 and n == 0
    assert err.startswith(f"qimg: Cannot convert to the pipe '/dev/stdout': {reason}") and err.count("\n") == 1


def test_a_closed_pipe_is_one_line(tmp_path):
    src = write_pattern(tmp_path / "src.raw", 256 * MiB, [(i * 16 * MiB, 16 * MiB) for i in range(16)])
    p = subprocess.Popen([sys.executable, "-m", "qimg", "convert", "-f", "raw", "-O", "raw", str(src), "/dev/stdout"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.read(10)) == 10
    p.stdout.close()  # the reader goes away, as `| head -c 10` does
    err = p.stderr.read().decode()
    assert p.wait() == 1
    assert re.fullmatch(r"qimg: error while writing at byte \d+: Broken pipe\n", err)
