"""convert raw -> raw against qemu-img 7.2: content, holes, -S, -n, --target-is-zero, several
sources, -p/-q output, cleanup after a failed or killed convert, and read-only sources."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import guest_sha256, qemu, run_qimg, run_qimg_subprocess, sha256_file, write_pattern

MiB = 1 << 20


@pytest.fixture
def src(tmp_path):
    """A 64 MiB sparse raw: random runs, written zeros, unaligned pieces and a tail not on 4 KiB."""
    p = tmp_path / "src.raw"
    write_pattern(p, 64 * MiB + 1536, [(0, 65536), (MiB + 100, 300_000), (8 * MiB, 4 * MiB),
                                       (20 * MiB + 4095, 2), (40 * MiB, 3 * MiB + 512), (64 * MiB, 1536)])
    with open(p, "r+b") as f:
        f.seek(30 * MiB)
        f.write(bytes(2 * MiB))  # allocated zeros: must become a hole
        f.seek(9 * MiB)
        f.write(bytes(8192))  # zeros inside a data run
    return p


def qemu_map(path):
    return qemu("map", "--output=json", "-f", "raw", str(path)).out


def alloc(path):
    return os.stat(path).st_blocks * 512


def test_content_and_holes_match_qemu(oracle, src, tmp_path):
    ref, out = tmp_path / "ref.raw", tmp_path / "out.raw"
    oracle("convert", "-f", "raw", "-O", "raw", str(src), str(ref))
    r = run_qimg("convert", "-f", "raw", "-O", "raw", src, out)
    assert (r.rc, r.out, r.err) == (0, "", "")
    assert sha256_file(out) == sha256_file(ref) == sha256_file(src)
    assert os.path.getsize(out) == os.path.getsize(ref)
    # the same allocation: identical maps, and du within a filesystem block or two
    assert qemu_map(out) == qemu_map(ref)
    assert abs(alloc(out) - alloc(ref)) <= 16384
    assert alloc(out) < alloc(src) - MiB  # the written zeros became holes


def test_probed_source_and_default_output_format(oracle, src, tmp_path):
    out = tmp_path / "out.raw"
    r = run_qimg("convert", src, out)
    assert r.rc == 0, r.err
    assert sha256_file(out) == sha256_file(src)


@pytest.mark.parametrize("sparse", ["0", "512", "64k"])
def test_min_sparse_matches_qemu(oracle, src, tmp_path, sparse):
    ref, out = tmp_path / "ref.raw", tmp_path / "out.raw"
    oracle("convert", "-S", sparse, "-f", "raw", "-O", "raw", str(src), str(ref))
    r = run_qimg("convert", "-S", sparse, "-f", "raw", "-O", "raw", src, out)
    assert r.rc == 0, r.err
    assert sha256_file(out) == sha256_file(src)
    assert qemu_map(out) == qemu_map(ref)
    if sparse == "0":
        assert alloc(out) >= os.path.getsize(src) - 4096  # fully allocated


def test_invalid_min_sparse(oracle, src, tmp_path):
    ref = oracle("convert", "-S", "100", "-O", "raw", str(src), str(tmp_path / "a.raw"), check=False)
    r = run_qimg("convert", "-S", "100", "-O", "raw", src, tmp_path / "b.raw")
    assert r.rc == ref.rc == 1
    assert r.err.splitlines()[0] == ref.err.splitlines()[0].replace("qemu-img:", "qimg:")
    assert not (tmp_path / "b.raw").exists()


def _prefilled(path, size):
    with open(path, "wb") as f:
        chunk = b"\xa5" * MiB
        left = size
        while left > 0:
            f.write(chunk[:min(left, MiB)])
            left -= MiB


def test_no_create_writes_into_existing_target(oracle, src, tmp_path):
    size = os.path.getsize(src)
    out = tmp_path / "out.raw"
    _prefilled(out, size)
    ino = os.stat(out).st_ino
    r = run_qimg("convert", "-n", "-f", "raw", "-O", "raw", src, out)
    assert r.rc == 0, r.err
    assert os.stat(out).st_ino == ino
    assert sha256_file(out) == sha256_file(src)  # zeros were written over the old bytes


def test_target_is_zero_rules(oracle, src, tmp_path):
    size = os.path.getsize(src)
    # refused without -n, as qemu-img does
    ref = oracle("convert", "--target-is-zero", "-O", "raw", str(src), str(tmp_path / "x.raw"), check=False)
    r = run_qimg("convert", "--target-is-zero", "-O", "raw", src, tmp_path / "y.raw")
    assert (r.rc, r.err) == (ref.rc, ref.err.replace("qemu-img:", "qimg:"))
    assert not (tmp_path / "y.raw").exists()
    # with -n the zero ranges are skipped: a target that is not really zero keeps its bytes there
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    _prefilled(a, size)
    _prefilled(b, size)
    oracle("convert", "-n", "--target-is-zero", "-f", "raw", "-O", "raw", str(src), str(a))
    r = run_qimg("convert", "-n", "--target-is-zero", "-f", "raw", "-O", "raw", src, b)
    assert r.rc == 0, r.err
    assert sha256_file(b) == sha256_file(a)
    assert sha256_file(b) != sha256_file(src)


def test_several_sources_concatenate(oracle, tmp_path):
    a = write_pattern(tmp_path / "a.raw", 3 * MiB, [(0, 4096), (2 * MiB, MiB)], seed=1)
    b = write_pattern(tmp_path / "b.raw", 1 * MiB + 512, [(512, 1024)], seed=2)
    c = write_pattern(tmp_path / "c.raw", 2 * MiB, [(MiB - 4096, 8192)], seed=3)
    ref, out = tmp_path / "ref.raw", tmp_path / "out.raw"
    oracle("convert", "-f", "raw", "-O", "raw", str(a), str(b), str(c), str(ref))
    r = run_qimg("convert", "-f", "raw", "-O", "raw", a, b, c, out)
    assert r.rc == 0, r.err
    assert sha256_file(out) == sha256_file(ref)
    assert Path(out).read_bytes() == a.read_bytes() + b.read_bytes() + c.read_bytes()
    assert qemu_map(out) == qemu_map(ref)


PROGRESS = re.compile(r"(    \(\d{1,3}\.\d\d/100%\)\r)+\n")


def test_progress_lines_when_not_a_terminal(oracle, src, tmp_path):
    ref = subprocess.run(["qemu-img", "convert", "-p", "-O", "raw", str(src), str(tmp_path / "a.raw")],
                         capture_output=True)
    r = subprocess.run([sys.executable, "-m", "qimg", "convert", "-p", "-O", "raw", str(src), str(tmp_path / "b.raw")],
                       capture_output=True)
    assert r.returncode == ref.returncode == 0
    for out in (ref.stdout.decode(), r.stdout.decode()):
        assert PROGRESS.fullmatch(out), repr(out[:200])
        assert out.startswith("    (0.00/100%)\r") and out.endswith("    (100.00/100%)\r\n")
    assert r.stderr == b""


def test_quiet_is_silent(oracle, src, tmp_path):
    r = run_qimg_subprocess("convert", "-q", "-p", "-O", "raw", src, tmp_path / "b.raw")
    assert (r.rc, r.out, r.err) == (0, "", "")


def test_missing_source_leaves_no_target(oracle, tmp_path):
    ref = oracle("convert", "-O", "raw", str(tmp_path / "nope.raw"), str(tmp_path / "a.raw"), check=False)
    r = run_qimg("convert", "-O", "raw", tmp_path / "nope.raw", tmp_path / "b.raw")
    assert r.rc == ref.rc == 1
    assert r.err == ref.err.replace("qemu-img:", "qimg:")
    assert sorted(os.listdir(tmp_path)) == []


def test_killed_convert_leaves_no_complete_looking_target(tmp_path):
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(16 << 30)  # 16 GiB of holes; -S 0 makes the convert write all of it
    out = tmp_path / "out.raw"
    p = subprocess.Popen([sys.executable, "-m", "qimg", "convert", "-S", "0", "-f", "raw", "-O", "raw", str(big),
                          str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and p.poll() is None:
            partial = [n for n in os.listdir(tmp_path) if n not in ("big.raw",)]
            if partial and any(os.path.getsize(tmp_path / n) > 0 for n in partial if (tmp_path / n).exists()):
                break
            time.sleep(0.01)
        time.sleep(0.2)
        if p.poll() is not None:
            pytest.skip("convert finished before it could be interrupted")
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGTERM
    assert sorted(os.listdir(tmp_path)) == ["big.raw"]
    assert not out.exists()


def test_failed_convert_keeps_an_existing_target(oracle, tmp_path):
    out = tmp_path / "out.raw"
    out.write_bytes(b"old content")
    r = run_qimg("convert", "-O", "raw", tmp_path / "missing.raw", out)
    assert r.rc == 1
    assert out.read_bytes() == b"old content"


def test_reading_never_writes_the_source(oracle, src, tmp_path):
    before = (os.stat(src).st_mtime_ns, os.stat(src).st_size, sha256_file(src))
    os.chmod(src, 0o444)
    try:
        for args in (["info", src], ["info", "-f", "raw", "--output=json", src],
                     ["convert", "-O", "raw", src, tmp_path / "o1.raw"],
                     ["convert", "-f", "raw", "-S", "0", "-O", "raw", src, tmp_path / "o2.raw"]):
            r = run_qimg(*args)
            assert r.rc == 0, (args, r.err)
    finally:
        os.chmod(src, 0o644)
    assert (os.stat(src).st_mtime_ns, os.stat(src).st_size, sha256_file(src)) == before


def test_copy_offload_matches_qemu_img(src, tmp_path, oracle):
    """-C: the same guest bytes, and (as qemu-img -C) zeros inside data are copied, not skipped."""
    a, b, ref = tmp_path / "a.raw", tmp_path / "b.raw", tmp_path / "ref.raw"
    assert run_qimg("convert", "-f", "raw", "-O", "raw", src, a).rc == 0
    assert run_qimg("convert", "-C", "-f", "raw", "-O", "raw", src, b).rc == 0
    qemu("convert", "-C", "-f", "raw", "-O", "raw", src, ref)
    assert sha256_file(a) == sha256_file(b) == sha256_file(src)
    assert qemu_map(b) == qemu_map(ref)
    c = tmp_path / "c.qcow2"
    assert run_qimg("convert", "-C", "-f", "raw", "-O", "qcow2", src, c).rc == 0
    assert qemu("check", c, check=False).rc == 0
    assert guest_sha256(c) == sha256_file(src)


@pytest.mark.parametrize("args, message", [
    (["-c"], "Cannot enable copy offloading when -c is used"),
    (["-S", "4k"], "Cannot enable copy offloading when -S is used"),
    (["-S", "0"], "Cannot enable copy offloading when -S is used"),
    (["--salvage"], "Cannot use copy offloading in salvaging mode"),
])
def test_copy_offload_refuses_what_qemu_img_refuses(tmp_path, args, message):
    r = run_qimg("convert", "-C", *args, "a", "b")
    assert r.rc == 1
    assert r.err.strip() == f"qimg: {message}"


def test_fixture_samples_match_their_manifest(tmp_path):
    fixtures = Path(__file__).resolve().parents[2] / "fixtures"
    manifest = (fixtures / "MANIFEST.txt").read_text()
    guest = re.search(r"^guest sha256 \(both\): ([0-9a-f]{64})$", manifest, re.M).group(1)
    out = tmp_path / "s.raw"
    r = run_qimg("convert", "-O", "raw", fixtures / "sample.raw", out)
    assert r.rc == 0, r.err
    assert sha256_file(out) == guest
    r = run_qimg("convert", "-f", "qcow2", "-O", "raw", fixtures / "sample.qcow2", tmp_path / "q.raw")
    if r.rc != 0 and "Unknown driver" in r.err:
        pytest.skip("qcow2 driver not available")
    assert r.rc == 0, r.err
    assert sha256_file(tmp_path / "q.raw") == guest


@pytest.mark.parametrize("size", [1000, (3 << 20) + 300])
def test_source_not_a_multiple_of_512(oracle, tmp_path, size):
    """The virtual size rounds up to 512; the bytes past the end of the file read as zeros."""
    p = tmp_path / "odd.raw"
    with open(p, "wb") as f:
        f.truncate(size)
        f.seek(max(0, size - 1000))
        f.write(os.urandom(1000))
    ref, out = tmp_path / "ref.raw", tmp_path / "out.raw"
    oracle("convert", "-f", "raw", "-O", "raw", str(p), str(ref))
    r = run_qimg("convert", "-f", "raw", "-O", "raw", p, out)
    assert r.rc == 0, r.err
    assert out.read_bytes() == ref.read_bytes()
    assert os.path.getsize(out) % 512 == 0


def test_backing_format_without_backing_file_is_refused(tmp_path, oracle):
    """-F without -B: qemu-img's message and status, and no target left behind."""
    src = write_pattern(tmp_path / "s.raw", 1 << 20, [(0, 4096)])
    ours = run_qimg("convert", "-F", "raw", "-O", "qcow2", src, tmp_path / "o.qcow2")
    theirs = oracle("convert", "-F", "raw", "-O", "qcow2", src, tmp_path / "t.qcow2", check=False)
    assert ours.rc == theirs.rc == 1
    assert ours.err == theirs.err.replace("qemu-img:", "qimg:").replace("t.qcow2", "o.qcow2")
    assert not (tmp_path / "o.qcow2").exists()
