"""Convert targets as qemu-img writes them: in place when they exist, under NAME.qimg-partial when new."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_qimg, sha256_file, write_pattern


@pytest.fixture
def src(tmp_path):
    return write_pattern(tmp_path / "src.raw", 4 << 20, [(0, 65536), (1 << 20, 300_000)])


def _qemu_line(ref_err: str) -> str:
    return ref_err.replace("qemu-img:", "qimg:")


def test_symlink_target_is_written_through(oracle, src, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "t.qcow2").write_bytes(b"old")
    link = tmp_path / "link.qcow2"
    link.symlink_to("real/t.qcow2")
    ino = os.stat(real / "t.qcow2").st_ino
    r = run_qimg("convert", "-O", "qcow2", src, link)
    assert (r.rc, r.err) == (0, "")
    assert os.path.islink(link) and os.readlink(link) == "real/t.qcow2"
    assert os.stat(real / "t.qcow2").st_ino == ino
    assert oracle("compare", "-f", "raw", "-F", "qcow2", src, real / "t.qcow2").rc == 0
    assert sorted(os.listdir(tmp_path)) == ["link.qcow2", "real", "src.raw"]


def test_existing_target_keeps_inode_owner_mode_and_links(src, tmp_path):
    out = tmp_path / "out.raw"
    out.write_bytes(b"x" * 10_000_000)
    os.chmod(out, 0o640)
    os.chown(out, 1234, 4321)
    os.link(out, tmp_path / "hard.raw")
    before = os.stat(out)
    r = run_qimg("convert", "-O", "raw", src, out)
    assert (r.rc, r.err) == (0, "")
    after = os.stat(out)
    assert (after.st_ino, after.st_uid, after.st_gid, after.st_mode, after.st_nlink) == (
        before.st_ino, 1234, 4321, before.st_mode, 2)
    assert sha256_file(out) == sha256_file(src) == sha256_file(tmp_path / "hard.raw")


def test_dangling_symlink_creates_its_target(src, tmp_path):
    link = tmp_path / "link.raw"
    link.symlink_to("made.raw")
    r = run_qimg("convert", "-O", "raw", src, link)
    assert r.rc == 0
    assert os.path.islink(link)
    assert sha256_file(tmp_path / "made.raw") == sha256_file(src)


def test_character_device_is_written_in_place(oracle, tmp_path):
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    ino = os.stat("/dev/null").st_ino
    r = run_qimg("convert", "-f", "raw", "-O", "raw", empty, "/dev/null")
    assert (r.rc, r.err) == (0, "")
    assert os.stat("/dev/null").st_ino == ino
    # and one too small for the image fails as qemu-img fails
    big = write_pattern(tmp_path / "one.raw", 1 << 20, [(0, 4096)])
    ref = oracle("convert", "-f", "raw", "-O", "raw", big, "/dev/null", check=False)
    r = run_qimg("convert", "-f", "raw", "-O", "raw", big, "/dev/null")
    assert (r.rc, r.err) == (ref.rc, _qemu_line(ref.err)) == (1, r.err)
    assert "Cannot grow device files" in r.err


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk"])
def test_missing_folder(oracle, src, tmp_path, fmt):
    target = tmp_path / "no" / "such" / f"x.{fmt}"
    ref = oracle("convert", "-O", fmt, src, target, check=False)
    r = run_qimg("convert", "-O", fmt, src, target)
    assert (r.rc, r.out, r.err) == (ref.rc, "", _qemu_line(ref.err))
    assert r.err.count("\n") == 1 and "Could not create" in r.err
    assert sorted(os.listdir(tmp_path)) == ["src.raw"]


def test_directory_target(oracle, src, tmp_path):
    (tmp_path / "d").mkdir()
    ref = oracle("convert", "-O", "raw", src, tmp_path / "d", check=False)
    r = run_qimg("convert", "-O", "raw", src, tmp_path / "d")
    assert (r.rc, r.err) == (ref.rc, _qemu_line(ref.err))


def _tmpfs(path, *opts):
    path.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(path)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()}")
    return path


@pytest.fixture
def mounts(tmp_path):
    made = []

    def make(name, *opts):
        made.append(_tmpfs(tmp_path / name, *opts))
        return made[-1]

    yield make
    for m in made:
        subprocess.run(["umount", str(m)], capture_output=True)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_read_only_folder(oracle, src, mounts, fmt):
    ro = mounts("ro", "ro", "size=1m")
    ref = oracle("convert", "-O", fmt, src, ro / f"x.{fmt}", check=False)
    r = run_qimg("convert", "-O", fmt, src, ro / f"x.{fmt}")
    assert (r.rc, r.err) == (ref.rc, _qemu_line(ref.err))
    assert "Read-only file system" in r.err


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_full_disk(oracle, tmp_path, mounts, fmt):
    data = write_pattern(tmp_path / "data.raw", 8 << 20, [(0, 8 << 20)])
    full = mounts("full", "size=4m")
    ref = oracle("convert", "-O", fmt, data, full / f"q.{fmt}", check=False)
    os.unlink(full / f"q.{fmt}")
    r = run_qimg("convert", "-O", fmt, data, full / f"x.{fmt}")
    assert r.rc == ref.rc == 1
    # qemu-img names the guest offset of the write that failed; its requests are cut differently
    assert r.err.startswith("qimg: error while writing at byte ") and r.err.count("\n") == 1
    assert r.err.endswith(": No space left on device\n") and ref.err.endswith(": No space left on device\n")
    # qemu-img leaves its half-written file behind; qimg removes the one it created
    assert not [n for n in os.listdir(full) if n.startswith("x.")]


def test_partial_name_is_visible_and_a_stale_one_is_taken_over(tmp_path):
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(16 << 30)
    out = tmp_path / "out.raw"
    partial = tmp_path / "out.raw.qimg-partial"
    p = subprocess.Popen([sys.executable, "-m", "qimg", "convert", "-S", "0", "-f", "raw", "-O", "raw", str(big),
                          str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(3000):
            if partial.exists() and partial.stat().st_size > 0 or p.poll() is not None:
                break
            time.sleep(0.01)
        assert p.poll() is None, p.stderr.read()
        p.kill()  # no cleanup possible: what is left must not look complete
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path)) == ["big.raw", "out.raw.qimg-partial"]
    small = write_pattern(tmp_path / "small.raw", 1 << 20, [(4096, 4096)])
    r = run_qimg("convert", "-O", "raw", small, out)
    assert (r.rc, r.err) == (0, "")
    assert sorted(os.listdir(tmp_path)) == ["big.raw", "out.raw", "small.raw"]
    assert sha256_file(out) == sha256_file(small)
