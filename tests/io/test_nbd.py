"""nbd: a real qemu-nbd on a unix socket as source and target; a fake server for hostile replies."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

from tests.conftest import qemu, run_qimg, sha256_file, write_pattern

MiB = 1 << 20


def _accepts(sock) -> bool:
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def _start_nbd(tmp_path, image, fmt="raw", export="exp", name="nbd.sock"):
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd not installed")
    sock = tmp_path / name
    args = ["qemu-nbd", "-k", str(sock), "-f", fmt, "-t", "--cache=unsafe"]
    if export is not None:
        args += ["-x", export]
    proc = subprocess.Popen(args + [str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not _accepts(sock):  # the socket file appears at bind(), before qemu-nbd listens
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            pytest.fail(f"qemu-nbd did not start: {proc.stderr.read().decode()}")
        time.sleep(0.02)
    return proc, sock


@pytest.fixture
def nbd_server(tmp_path, qemu_img):
    procs = []

    def start(image, fmt="raw", export="exp", name="nbd.sock"):
        proc, sock = _start_nbd(tmp_path, image, fmt, export, name)
        procs.append(proc)
        path = export if export is not None else ""
        return f"nbd+unix:///{path}?socket={sock}"

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


@pytest.fixture
def sparse_qcow2(tmp_path, qemu_img):
    img = tmp_path / "src.qcow2"
    qemu("create", "-q", "-f", "qcow2", img, "8M")
    subprocess.run(["qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 2 3M 192k", "-c", "write -z 5M 64k",
                    "-c", "write -P 3 8064k 128k", str(img)], check=True, capture_output=True, timeout=60)
    return img


def test_uri_parsing():
    from qimg.io.nbd import parse_uri

    assert parse_uri("nbd+unix:///exp?socket=/tmp/s")[1:] == ("/tmp/s", "exp")
    assert parse_uri("nbd://example.org/disk")[1:] == ("example.org:10809", "disk")
    assert parse_uri("nbd+tcp://10.0.0.1:1234")[1:] == ("10.0.0.1:1234", "")
    assert parse_uri("nbd:unix:/tmp/s:exportname=a")[1:] == ("/tmp/s", "a")
    assert parse_uri("nbd:localhost:10810")[1:] == ("localhost:10810", "")
    from qimg.errors import QimgError

    for bad in ("nbd+unix:///exp", "nbd+unix://host/exp?socket=/s", "nbd:///x"):
        with pytest.raises(QimgError, match="No valid URL specified"):
            parse_uri(bad)


def test_info_and_map_match_qemu(nbd_server, sparse_qcow2):
    url = nbd_server(sparse_qcow2, "qcow2")
    for extra in ([], ["--output=json"]):
        mine = run_qimg("info", *extra, url)
        assert mine.rc == 0, mine.err
        assert mine.out == qemu("info", *extra, url).out
        mine = run_qimg("map", *extra, url)
        assert mine.rc == 0, mine.err
        assert mine.out == qemu("map", *extra, url).out


def test_convert_from_nbd(nbd_server, sparse_qcow2, tmp_path):
    ref = tmp_path / "ref.raw"
    qemu("convert", "-O", "raw", sparse_qcow2, ref)
    url = nbd_server(sparse_qcow2, "qcow2")
    out = tmp_path / "out.raw"
    r = run_qimg("convert", "-O", "raw", url, out)
    assert r.rc == 0, r.err
    assert sha256_file(out) == sha256_file(ref)
    # holes reported by base:allocation stay holes
    assert os.stat(out).st_blocks * 512 < 2 * MiB


def test_convert_to_nbd(nbd_server, tmp_path):
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xff" * (6 * MiB))
    url = nbd_server(target, "raw")
    src = write_pattern(tmp_path / "src.raw", 4 * MiB, [(0, 5000), (MiB, 3 * MiB // 2), (4 * MiB - 512, 512)])
    r = run_qimg("convert", "-f", "raw", "-O", "raw", src, url)
    assert r.rc == 0, r.err
    # the zero ranges of the source must have been written as zeros over the 0xff bytes
    with open(target, "rb") as f:
        assert f.read(4 * MiB) == src.read_bytes()
        assert f.read() == b"\xff" * (2 * MiB)
    # -n into the export, then a source larger than the export
    r = run_qimg("convert", "-n", "-f", "raw", "-O", "raw", src, url)
    assert r.rc == 0, r.err
    big = write_pattern(tmp_path / "big.raw", 8 * MiB, [(0, 4096)])
    r = run_qimg("create", "-f", "raw", url, "8M")
    assert r.rc == 1 and r.err.endswith("Cannot grow NBD nodes\n")
    r = run_qimg("convert", "-f", "raw", "-O", "raw", big, url)
    assert r.rc == 1 and "Traceback" not in r.err


def test_format_on_an_export(nbd_server, sparse_qcow2, tmp_path):
    """qemu-nbd -f raw over a qcow2 file: the qcow2 format is read through the export."""
    from qimg.core import registry
    from qimg.errors import OpenError

    try:
        registry.get_driver("qcow2").probe(b"", "")
    except (OpenError, AttributeError):
        pytest.skip("qcow2 driver not available")
    ref = tmp_path / "ref.raw"
    qemu("convert", "-O", "raw", sparse_qcow2, ref)
    url = nbd_server(sparse_qcow2, "raw")
    r = run_qimg("info", "-f", "qcow2", "--output=json", url)
    assert r.rc == 0, r.err
    assert r.out == qemu("info", "-f", "qcow2", "--output=json", url).out
    out = tmp_path / "o.raw"
    assert run_qimg("convert", "-f", "qcow2", "-O", "raw", url, out).rc == 0
    assert sha256_file(out) == sha256_file(ref)


def test_default_export_and_errors(nbd_server, tmp_path):
    img = write_pattern(tmp_path / "a.raw", MiB, [(0, 4096)])
    url = nbd_server(img, "raw", export=None)
    assert url.startswith("nbd+unix:///?socket=")
    r = run_qimg("info", "--output=json", url)
    assert r.rc == 0 and '"virtual-size": 1048576' in r.out
    bad = url.replace(":///?", ":///nope?")
    r = run_qimg("info", bad)
    assert r.rc == 1
    assert r.err.startswith(f"qimg: Could not open '{bad}': Requested export not available")
    r = run_qimg("info", f"nbd+unix:///x?socket={tmp_path}/missing.sock")
    assert r.rc == 1
    assert r.err == (f"qimg: Could not open 'nbd+unix:///x?socket={tmp_path}/missing.sock': Failed to connect to "
                     f"'{tmp_path}/missing.sock': No such file or directory\n")


# ----- hostile servers -----

def _fake_server(path, script):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        try:
            script(conn)
            time.sleep(3)
        except OSError:
            pass
        finally:
            conn.close()
            srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _recv_exact(conn, n):
    buf = b""
    while len(buf) < n:
        b = conn.recv(n - len(buf))
        if not b:
            raise OSError("closed")
        buf += b
    return buf


def _handshake_go(conn, size=1 << 20, structured=True, tflags=0x1 | 0x4):
    conn.sendall(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
    _recv_exact(conn, 4)
    while True:
        _magic, opt, length = struct.unpack(">QII", _recv_exact(conn, 16))
        _recv_exact(conn, length)
        rep = lambda t, d=b"": conn.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, t, len(d)) + d)  # noqa
        if opt == 8:
            rep(1 if structured else (1 << 31) | 1)
        elif opt == 10:
            rep(4, struct.pack(">I", 1) + b"base:allocation")
            rep(1)
        elif opt == 7:
            rep(3, struct.pack(">HQH", 0, size, tflags))
            rep(1)
            return


HOSTILE = {
    "bad magic": lambda c: c.sendall(b"NOTNBD!!" + bytes(10)),
    "huge option reply": lambda c: (
        c.sendall(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3)), _recv_exact(c, 4 + 16),
        c.sendall(struct.pack(">QIII", 0x3E889045565A9, 8, 1, 0xFFFFFFF0))),
    "silent": lambda c: None,
    "data outside request": lambda c: (
        _handshake_go(c), _recv_exact(c, 28),
        c.sendall(struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 1, 8 + 512, 1 << 30) + bytes(512))),
    "wrong handle": lambda c: (
        _handshake_go(c, structured=False), _recv_exact(c, 28),
        c.sendall(struct.pack(">IIQ", 0x67446698, 0, 77) + bytes(512))),
    "huge block status": lambda c: (
        _handshake_go(c), _recv_exact(c, 28),
        c.sendall(struct.pack(">IHHQII", 0x668E33EF, 1, 5, 1, 0x7FFFFFF0, 1))),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_server(tmp_path, monkeypatch, case):
    from qimg.io import nbd

    monkeypatch.setattr(nbd, "IO_TIMEOUT", 0.5)
    sock = tmp_path / "fake.sock"
    _fake_server(sock, HOSTILE[case])
    url = f"nbd+unix:///exp?socket={sock}"
    t0 = time.monotonic()
    if case in ("huge block status",):
        r = run_qimg("map", "-f", "raw", url)
    else:
        r = run_qimg("convert", "-f", "raw", "-O", "raw", url, tmp_path / "o.raw")
    assert time.monotonic() - t0 < 10
    assert r.rc == 1, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err
    assert r.err.startswith("qimg: ")


def test_tcp_export(tmp_path, qemu_img):
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd not installed")
    img = write_pattern(tmp_path / "a.raw", 2 * MiB, [(4096, 10000), (MiB, 65536)])
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen(["qemu-nbd", "-b", "127.0.0.1", "-p", str(port), "-f", "raw", "-t", "-x", "disk",
                             str(img)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("qemu-nbd did not start")
                time.sleep(0.05)
        for url in (f"nbd://127.0.0.1:{port}/disk", f"nbd:127.0.0.1:{port}:exportname=disk"):
            out = tmp_path / "o.raw"
            r = run_qimg("convert", "-O", "raw", url, out)
            assert r.rc == 0, r.err
            assert sha256_file(out) == sha256_file(img)
        r = run_qimg("map", "--output=json", f"nbd://127.0.0.1:{port}/disk")
        assert r.rc == 0 and r.out == qemu("map", "--output=json", f"nbd://127.0.0.1:{port}/disk").out
    finally:
        proc.terminate()
        proc.wait(5)
