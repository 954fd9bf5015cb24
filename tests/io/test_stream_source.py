"""convert from a pipe, FIFO or socket: raw and streamOptimized VMDK as they stream, the rest spooled."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import zlib

import pytest

from tests.conftest import ROOT, run_qimg, sha256_file, write_pattern

MiB = 1 << 20
QIMG = [sys.executable, "-m", "qimg"]


@pytest.fixture
def src(tmp_path):
    return write_pattern(tmp_path / "src.raw", 24 * MiB, [(0, 70_000), (5 * MiB + 512, 3 * MiB), (20 * MiB, MiB)])


def _from_pipe(data, *args):
    """qimg convert ... with ``data`` (bytes, or a file's bytes) written into its stdin, a pipe."""
    data = data if isinstance(data, bytes) else open(data, "rb").read()
    p = subprocess.run([*QIMG, "convert", *map(str, args)], input=data, capture_output=True)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def test_raw_from_stdin_streams(src, tmp_path):
    rc, out, err = _from_pipe(src, "-f", "raw", "-O", "raw", "/dev/stdin", tmp_path / "o.raw")
    assert (rc, out, err) == (0, "", "")
    assert sha256_file(tmp_path / "o.raw") == sha256_file(src)
    assert sorted(os.listdir(tmp_path)) == ["o.raw", "src.raw"]


def test_raw_from_a_fifo(src, tmp_path):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as w:
            w.write(open(src, "rb").read())

    t = threading.Thread(target=write)
    t.start()
    r = run_qimg("convert", "-f", "raw", "-O", "raw", fifo, tmp_path / "o.raw")
    t.join()
    assert (r.rc, r.err) == (0, "")
    assert sha256_file(tmp_path / "o.raw") == sha256_file(src)


def test_raw_from_a_socket(src, tmp_path):
    a, b = socket.socketpair()
    p = subprocess.Popen([*QIMG, "convert", "-f", "raw", "-O", "raw", "/dev/stdin", str(tmp_path / "o.raw")],
                         stdin=b, stderr=subprocess.PIPE)
    b.close()
    a.sendall(open(src, "rb").read())
    a.shutdown(socket.SHUT_WR)
    err = p.stderr.read().decode()
    assert (p.wait(), err) == (0, "")
    a.close()
    assert sha256_file(tmp_path / "o.raw") == sha256_file(src)


def test_raw_to_qcow2_is_spooled_and_says_so(oracle, src, tmp_path):
    rc, out, err = _from_pipe(src, "-f", "raw", "-O", "qcow2", "/dev/stdin", tmp_path / "o.qcow2")
    assert (rc, out) == (0, "")
    assert err == ("qimg: '/dev/stdin' is a pipe and this convert needs to seek in it (raw): "
                   "spooling it to a temporary file first\n")
    assert oracle("compare", "-f", "raw", "-F", "qcow2", src, tmp_path / "o.qcow2").rc == 0
    rc, out, err = _from_pipe(src, "-q", "-f", "raw", "-O", "qcow2", "/dev/stdin", tmp_path / "q.qcow2")
    assert (rc, out, err) == (0, "", "")


def test_qcow2_from_stdin_is_spooled(oracle, src, tmp_path):
    oracle("convert", "-f", "raw", "-O", "qcow2", src, tmp_path / "s.qcow2")
    rc, out, err = _from_pipe(tmp_path / "s.qcow2", "-O", "raw", "/dev/stdin", tmp_path / "o.raw")
    assert rc == 0 and "spooling it to a temporary file first" in err
    assert sha256_file(tmp_path / "o.raw") == sha256_file(src)


def test_stream_vmdk_from_stdin_streams(oracle, src, tmp_path):
    oracle("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, tmp_path / "s.vmdk")
    rc, out, err = _from_pipe(tmp_path / "s.vmdk", "-O", "qcow2", "/dev/stdin", tmp_path / "o.qcow2")
    assert (rc, out, err) == (0, "", "")
    assert oracle("compare", "-f", "raw", "-F", "qcow2", src, tmp_path / "o.qcow2").rc == 0
    assert oracle("check", tmp_path / "o.qcow2").rc == 0


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_empty_stream_is_refused(tmp_path, fmt):
    rc, out, err = _from_pipe(b"", "-O", fmt, "/dev/stdin", tmp_path / "o.img")
    assert (rc, out) == (1, "")
    assert err == "qimg: Could not open '/dev/stdin': the stream is empty (no image to convert)\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("maker,cut", [("qemu-img", 777), ("qimg", 0), ("qimg", 300)])
def test_truncated_stream_vmdk(oracle, src, tmp_path, maker, cut):
    """Cut inside a grain, or (a stream whose grain directory comes at the end) before its end marker."""
    args = ["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, tmp_path / "s.vmdk"]
    assert (oracle(*args) if maker == "qemu-img" else run_qimg(*args)).rc == 0
    data = open(tmp_path / "s.vmdk", "rb").read()
    rc, out, err = _from_pipe(data[:len(data) // 1024 * 512 + cut], "-O", "qcow2", "/dev/stdin",
                              tmp_path / "o.qcow2")
    assert rc == 1 and err.count("\n") == 1 and "the stream is truncated" in err
    assert sorted(os.listdir(tmp_path)) == ["s.vmdk", "src.raw"]


# ----- bounded memory: a 4 GiB stream, the peak resident set of the qimg process itself (VmHWM: the rusage
# of a child also counts the parent's pages it was forked with)

def _vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _peak_rss_kib(cmd, feed):
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    sink = {"n": 0, "peak": 0}

    def drain():
        while b := p.stdout.read(MiB):
            sink["n"] += len(b)
            sink["peak"] = max(sink["peak"], _vm_hwm_kib(p.pid))
        sink["peak"] = max(sink["peak"], _vm_hwm_kib(p.pid))  # the process is still there: it is not waited for

    threads = [threading.Thread(target=feed, args=(p.stdin,)), threading.Thread(target=drain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    err = p.stderr.read().decode()
    return p.wait(), err, sink["peak"], sink["n"]


def _raw_feed(total):
    block = bytes(range(1, 256)) * (MiB // 255) + b"\x01" * (MiB % 255)

    def feed(stdin):
        try:
            for _ in range(total // MiB):
                stdin.write(block)
        finally:
            stdin.close()
    return feed


def test_raw_stream_of_4_gib_in_bounded_memory(tmp_path):
    rc, err, peak, n = _peak_rss_kib([*QIMG, "convert", "-f", "raw", "-O", "raw", "/dev/stdin", "/dev/stdout"],
                                     _raw_feed(4 << 30))
    assert (rc, err, n) == (0, "", 4 << 30)
    assert peak <= 64 * 1024, f"peak RSS {peak} KiB"


def _vmdk_stream_feed(total, tmp_path):
    """A streamOptimized VMDK of ``total`` bytes, every grain the same non-zero data, made on the fly."""
    small = tmp_path / "small.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", str(small), "1M"],
                   check=True)
    head = bytearray(open(small, "rb").read(65536))
    struct.pack_into("<Q", head, 12, total // 512)  # capacity
    overhead = struct.unpack_from("<Q", head, 64)[0] * 512
    grain = struct.unpack_from("<Q", head, 20)[0] * 512
    comp = zlib.compress(bytes(range(1, 256)) * (grain // 255) + b"\x07" * (grain % 255))
    pad = -(12 + len(comp)) % 512

    def feed(stdin):
        try:
            stdin.write(bytes(head[:overhead]))
            for i in range(total // grain):
                stdin.write(struct.pack("<QI", i * grain // 512, len(comp)) + comp + bytes(pad))
            stdin.write(struct.pack("<QII", 0, 0, 0) + bytes(496))  # end of stream
        finally:
            stdin.close()
    return feed


def test_stream_vmdk_of_4_gib_in_bounded_memory(qemu_img, tmp_path):
    rc, err, peak, n = _peak_rss_kib([*QIMG, "convert", "-O", "raw", "/dev/stdin", "/dev/stdout"],
                                     _vmdk_stream_feed(4 << 30, tmp_path))
    assert (rc, err, n) == (0, "", 4 << 30)
    assert peak <= 64 * 1024, f"peak RSS {peak} KiB"


def test_pipe_to_pipe_qcow2_reads_a_spooled_copy_twice(oracle, src, tmp_path):
    """qcow2 down a pipe needs two passes over its source: a stream source is spooled for them."""
    oracle("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, tmp_path / "s.vmdk")
    p = subprocess.run([*QIMG, "convert", "-O", "qcow2", "/dev/stdin", "/dev/stdout"],
                       input=open(tmp_path / "s.vmdk", "rb").read(), capture_output=True)
    assert p.returncode == 0 and "spooling it to a temporary file first" in p.stderr.decode()
    (tmp_path / "o.qcow2").write_bytes(p.stdout)
    assert oracle("compare", "-f", "raw", "-F", "qcow2", src, tmp_path / "o.qcow2").rc == 0
