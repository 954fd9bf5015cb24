"""Signals: SIGINT/SIGTERM remove the partial target and end qimg by that signal; SIGUSR1 reports progress."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import qimg


def _start(tmp_path, size, *extra):
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(size)  # holes; -S 0 makes the convert write every byte
    cmd = [sys.executable, "-m", "qimg", "convert", *extra, "-S", "0", "-f", "raw", "-O", "raw", str(big),
           str(tmp_path / "out.raw")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_partial(p, tmp_path):
    partial = tmp_path / "out.raw.qimg-partial"
    for _ in range(3000):
        if p.poll() is not None or partial.exists() and partial.stat().st_size > (4 << 20):
            break
        time.sleep(0.01)
    assert p.poll() is None, p.stderr.read()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_removes_partial_and_dies_by_the_signal(tmp_path, sig):
    p = _start(tmp_path, 16 << 30)
    try:
        _wait_for_partial(p, tmp_path)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -sig  # a shell sees 128 + sig: 130, 143
    assert (out, err) == (b"", b"")
    assert sorted(os.listdir(tmp_path)) == ["big.raw"]


def test_shell_loop_sees_143(tmp_path):
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(16 << 30)
    script = (f'"{sys.executable}" -m qimg convert -S 0 -f raw -O raw "{big}" "{tmp_path}/out.raw" & pid=$!\n'
              f'while [ ! -s "{tmp_path}/out.raw.qimg-partial" ]; do sleep 0.05; done\n'
              'kill -TERM $pid; wait $pid; echo "status $?"\n')
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert r.stdout == "status 143\n"
    assert sorted(os.listdir(tmp_path)) == ["big.raw"]


def test_sigusr1_prints_one_line_and_goes_on(tmp_path):
    p = _start(tmp_path, 3 << 30)
    try:
        _wait_for_partial(p, tmp_path)
        p.send_signal(signal.SIGUSR1)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qimg: convert: ") and "/3221225472 bytes" in lines[0]
    assert out == b""
    assert os.path.getsize(tmp_path / "out.raw") == 3 << 30


def test_the_library_installs_no_signal_handler():
    root = pathlib.Path(qimg.__file__).parent
    offenders = [str(f.relative_to(root)) for f in root.rglob("*.py")
                 if "signal.signal(" in f.read_text() and f.parent.name != "cli"]
    assert offenders == []
