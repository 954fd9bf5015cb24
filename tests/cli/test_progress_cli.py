"""convert's progress as a user and a script see it: a terminal, a pipe, JSON lines."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from tests.conftest import write_pattern

LINE = re.compile(r"    \((\d{1,3}\.\d\d)/100%\)\r")


def _src(tmp_path):
    return write_pattern(tmp_path / "src.raw", 64 << 20, [(i << 20, 1 << 20) for i in range(0, 64, 2)])


def _on_pty(args, columns):
    """Run qimg with stderr on a pseudo-terminal of ``columns``; returns (status, stdout, terminal text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "qimg", *map(str, args)], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            b = os.read(master, 65536)
        except OSError:
            break
        if not b:
            break
        chunks.append(b)
    out = p.stdout.read()
    p.wait()
    os.close(master)
    return p.returncode, out, b"".join(chunks).decode()


def test_bar_on_a_terminal(tmp_path):
    rc, out, term = _on_pty(["convert", "-p", "-O", "qcow2", _src(tmp_path), tmp_path / "o.qcow2"], 100)
    assert (rc, out) == (0, b"")
    last = term.replace("\r\n", "\n").split("\r")[-1]
    assert last.endswith("\n")  # left in place
    assert re.match(r"100%\|[█ ]*\| 64\.0MB/64\.0MB \[\d\d:\d\d<\d\d:\d\d, +[\d.]+[kMG]?B/s\]\n$", last), last
    assert "%|" in term and "<" in term  # percentage and ETA while it runs


def test_bar_on_a_terminal_of_width_0(tmp_path):
    rc, out, term = _on_pty(["convert", "-p", "-O", "raw", _src(tmp_path), tmp_path / "o.raw"], 0)
    assert (rc, out) == (0, b"")
    last = term.replace("\r\n", "\n").split("\r")[-1]
    assert re.match(r"100% 64\.0MB?/64\.0MB? \[\d\d:\d\d<\d\d:\d\d, +[\d.]+[kMG]?B/s\]\n$", last), last


def test_qemu_lines_when_not_a_terminal(oracle, tmp_path):
    src = _src(tmp_path)
    ref = subprocess.run(["qemu-img", "convert", "-p", "-O", "raw", str(src), str(tmp_path / "q.raw")],
                         capture_output=True)
    r = subprocess.run([sys.executable, "-m", "qimg", "convert", "-p", "-O", "raw", str(src), str(tmp_path / "o.raw")],
                       capture_output=True)
    for res in (ref, r):
        res.stdout, res.stderr = res.stdout.decode(), res.stderr.decode()
        assert res.returncode == 0 and res.stderr == ""
        assert res.stdout.endswith("\r\n")
        parts = LINE.findall(res.stdout[:-1])
        assert "".join(f"    ({v}/100%)\r" for v in parts) == res.stdout[:-1]
        vals = [float(v) for v in parts]
        assert vals[0] == 0.0 and vals[-2:] == [100.0, 100.0] and vals == sorted(vals)
        # a line once at least 1% more is done (qemu-img's rule), 100% repeated at the end
        assert all(b - a >= 1.0 for a, b in zip(vals[:-2], vals[1:-1]))


def test_json_progress(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qimg", "convert", "--progress=json", "-O", "qcow2",
                        str(_src(tmp_path)), str(tmp_path / "o.qcow2")], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "")
    recs = [json.loads(line) for line in r.stderr.splitlines()]
    assert recs[-1]["status"] == "completed" and recs[-1]["done"] == recs[-1]["total"] == 64 << 20
    for rec in recs:
        assert set(rec) - {"status"} == {"done", "total", "elapsed", "rate"}


def test_json_progress_of_a_failure(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qimg", "convert", "--progress=json", "-O", "raw",
                        str(tmp_path / "missing.raw"), str(tmp_path / "o.raw")], capture_output=True, text=True)
    lines = r.stderr.splitlines()
    assert r.returncode == 1
    assert json.loads(lines[0])["status"] == "failed"
    assert lines[1].startswith("qimg: Could not open")


def test_bad_progress_value(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qimg", "convert", "--progress=xml", "-O", "raw",
                        str(_src(tmp_path)), str(tmp_path / "o.raw")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.splitlines()[0] == "qimg: --progress must be human or json, not 'xml'"
