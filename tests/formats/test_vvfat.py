"""vvfat: a directory as a FAT disk, checked with mtools and against qemu-img's own fat: images."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess

import pytest

from tests.conftest import run_qimg

HD_OFFSET = 63 * 512


def _tree(root):
    rnd = random.Random(5)
    root.mkdir()
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "empty").write_bytes(b"")
    (root / "exact.bin").write_bytes(rnd.randbytes(8192))
    (root / "big.bin").write_bytes(rnd.randbytes(100000))
    (root / "Long File Name With Spaces.text").write_bytes(b"x" * 700)
    (root / "verylongname1.txt").write_bytes(b"1")
    (root / "verylongname2.txt").write_bytes(b"2")
    (root / "x.tar.gz").write_bytes(b"tgz")
    (root / "\u00e9t\u00e9.txt").write_bytes("été".encode())
    sub = root / "sub" / "deeper" / "deepest"
    sub.mkdir(parents=True)
    (sub / "z.txt").write_bytes(rnd.randbytes(20000))
    (root / "sub" / "mid.dat").write_bytes(rnd.randbytes(9000))
    (root / "emptydir").mkdir()
    many = root / "many"
    many.mkdir()
    for i in range(150):  # more entries than one 8 KiB directory cluster holds
        (many / f"file number {i:03d} with a long name.txt").write_bytes(str(i).encode())
    return root


def _small_tree(root):
    root.mkdir()
    (root / "one.txt").write_bytes(b"one\n")
    (root / "data.bin").write_bytes(random.Random(3).randbytes(30000))
    (root / "d").mkdir()
    (root / "d" / "inner name.txt").write_bytes(b"inner")
    return root


def _mtools():
    if shutil.which("mcopy") is None:
        pytest.skip("mtools not installed")


def _extract(image, offset, dest):
    dest.mkdir()
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    subprocess.run(["mcopy", "-s", "-n", "-i", f"{image}@@{offset}", "::*", str(dest)], check=True, env=env,
                   capture_output=True, timeout=60)


def _same_tree(a, b):
    def listing(root):
        out = {}
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for d in dirnames:
                out[os.path.join(rel, d)] = None
            for f in filenames:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    out[os.path.join(rel, f)] = hashlib.sha256(fh.read()).hexdigest()
        return out

    assert listing(a) == listing(b)


def test_short_names():
    from qimg.formats.vvfat import lfn_checksum, short_name

    taken = set()
    got = [short_name(n, taken) for n in ("README.TXT", "a..b", "trail.", ".hidden", "ab+c;d.e",
                                          "verylongname1.txt", "verylongname2.txt", "x.tar.gz", "\u00e9.txt")]
    assert got == [b"README  TXT", b"A~1     B  ", b"TRAIL      ", b"HIDDEN~1   ", b"ABCD~1  E  ",
                   b"VERYLO~1TXT", b"VERYLO~2TXT", b"X~1     GZ ", b"TXT~1      "]
    assert lfn_checksum(b"README  TXT") == 0x73


def test_parse_filename():
    from qimg.formats.vvfat import parse_fat_filename

    assert parse_fat_filename("fat:rw:floppy:12:/x/y") == {"dir": "/x/y", "fat_type": 12, "floppy": True,
                                                          "rw": True}
    assert parse_fat_filename("fat:d") == {"dir": "d", "fat_type": 0, "floppy": False, "rw": False}


@pytest.mark.parametrize("mode", ["", "12:", "32:"])
def test_info_matches_qemu(tmp_path, oracle, mode):
    d = _tree(tmp_path / "d")
    for extra in ([], ["--output=json"]):
        mine = run_qimg("info", *extra, f"fat:{mode}{d}")
        assert mine.rc == 0, mine.err
        theirs = oracle("info", *extra, f"fat:{mode}{d}")
        assert mine.out == theirs.out


@pytest.mark.parametrize("mode", ["floppy:", "floppy:12:", "floppy:16:"])
def test_floppy_info_matches_qemu(tmp_path, oracle, mode):
    d = _small_tree(tmp_path / "d")
    assert run_qimg("info", "--output=json", f"fat:{mode}{d}").out == \
        oracle("info", "--output=json", f"fat:{mode}{d}").out


def test_map_matches_qemu(tmp_path, oracle):
    d = _small_tree(tmp_path / "d")
    mine = run_qimg("map", "--output=json", f"fat:{d}")
    assert mine.rc == 0, mine.err
    assert mine.out == oracle("map", "--output=json", f"fat:{d}").out


@pytest.mark.parametrize("mode,offset", [("", HD_OFFSET), ("12:", HD_OFFSET), ("32:", HD_OFFSET), ("floppy:", 0)])
def test_files_come_back_out(tmp_path, mode, offset):
    _mtools()
    d = _tree(tmp_path / "d") if not mode.startswith("floppy") else _small_tree(tmp_path / "d")
    out = tmp_path / "disk.raw"
    r = run_qimg("convert", "-O", "raw", f"fat:{mode}{d}", out)
    assert r.rc == 0, r.err
    _extract(out, offset, tmp_path / "x")
    _same_tree(d, tmp_path / "x")


@pytest.mark.parametrize("mode", ["", "12:", "floppy:12:"])
def test_same_bytes_as_qemu(tmp_path, oracle, mode):
    """qemu-img's disk and ours are identical, apart from the slack after each file's last byte
    (qemu leaves stale bytes of an earlier read there).  Past the last used cluster both are holes."""
    from qimg.core.registry import open_image

    d = _tree(tmp_path / "d") if mode != "floppy:12:" else _small_tree(tmp_path / "d")
    theirs = tmp_path / "q.raw"
    oracle("convert", "-O", "raw", f"fat:{mode}{d}", theirs)
    mine = tmp_path / "m.raw"
    assert run_qimg("convert", "-O", "raw", f"fat:{mode}{d}", mine).rc == 0
    assert mine.stat().st_size == theirs.stat().st_size
    with open_image(f"fat:{mode}{d}") as drv:
        used_end = drv.data_start + (drv.next_cluster - 2) * drv.cluster_bytes
        with open(theirs, "rb") as f:
            q = bytearray(f.read(used_end))
        for first, count, node in drv.chains:
            if not node.is_dir:
                start = drv.data_start + (first - 2) * drv.cluster_bytes
                q[start + node.size:start + count * drv.cluster_bytes] = bytes(count * drv.cluster_bytes - node.size)
    with open(mine, "rb") as f:
        m = f.read(used_end)
    if m != bytes(q):
        first_diff = next(i for i in range(len(m)) if m[i] != q[i])
        pytest.fail(f"first difference at byte {first_diff}")
    for path in (mine, theirs):
        assert _zero_after(path, used_end), f"{path.name} has data past the used area"


def _zero_after(path, offset):
    """True when the file reads as zeros from ``offset`` on (holes skipped with SEEK_DATA/SEEK_HOLE)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        fd = f.fileno()
        pos = offset
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                return True
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            while data < hole:
                chunk = os.pread(fd, min(1 << 20, hole - data), data)
                if chunk.strip(b"\0"):
                    return False
                data += len(chunk)
            pos = hole
    return True


def test_errors(tmp_path, oracle):
    d = _small_tree(tmp_path / "d")
    for name in (f"fat:rw:{d}", f"fat:{tmp_path}/missing"):
        mine = run_qimg("info", name)
        theirs = oracle("info", name, check=False)
        assert mine.rc == theirs.rc == 1
        assert mine.err.replace("qimg:", "qemu-img:") == theirs.err
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "f", "wb") as f:
        f.truncate(3 << 20)
    mine = run_qimg("info", f"fat:floppy:{big}")
    assert mine.rc == 1
    assert mine.err == f"qimg: Could not open 'fat:floppy:{big}': Directory does not fit in FAT12 (capacity 2.88 MB)\n"
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    for i in range(300):
        (crowded / f"f{i}").write_bytes(b"")
    mine = run_qimg("info", f"fat:{crowded}")
    assert mine.rc == 1 and mine.err.endswith(f"Could not read directory {crowded}\n")


def test_special_files_do_not_hang(tmp_path):
    _mtools()
    d = _small_tree(tmp_path / "d")
    os.mkfifo(d / "fifo")
    os.symlink("..", d / "d" / "up")  # a loop back to the top
    os.symlink("nowhere", d / "dangling")
    out = tmp_path / "disk.raw"
    r = run_qimg("convert", "-O", "raw", f"fat:{d}", out)
    assert r.rc == 0, r.err
    _extract(out, HD_OFFSET, tmp_path / "x")
    assert (tmp_path / "x" / "fifo").stat().st_size == 0
    assert (tmp_path / "x" / "data.bin").read_bytes() == (d / "data.bin").read_bytes()


def test_huge_sparse_file_is_refused_quickly(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    with open(d / "huge", "wb") as f:
        f.truncate(5 << 30)
    r = run_qimg("info", f"fat:{d}")
    assert r.rc == 1
    assert r.err == f"qimg: Could not open 'fat:{d}': Directory does not fit in FAT16 (capacity 516.06 MB)\n"
