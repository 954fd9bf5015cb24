"""FileStore / MemoryStore: reads, writes, holes, errors, buffer alignment."""

from __future__ import annotations

import ctypes
import os

import pytest

from qimg.errors import OpenError, QimgError
from qimg.io.store import FileStore, MemoryStore, aligned_buffer


def _sparse(path, size, pieces):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)
    return str(path)


def test_pread_short_and_full(tmp_path):
    p = _sparse(tmp_path / "a", 10, [(0, b"0123456789")])
    with FileStore(p) as s:
        assert s.size() == 10
        assert s.pread(2, 3) == b"234"
        assert s.pread(8, 10) == b"89"
        assert s.pread(20, 5) == b""
        assert s.pread(0, 0) == b""
        assert s.pread_full(8, 4) == b"89\0\0"
        assert s.pread_full(50, 3) == b"\0\0\0"


def test_readinto_returns_count(tmp_path):
    p = _sparse(tmp_path / "a", 6, [(0, b"abcdef")])
    with FileStore(p) as s:
        buf = bytearray(b"xxxxxxxx")
        assert s.readinto(2, buf) == 4
        assert bytes(buf) == b"cdefxxxx"
        big = aligned_buffer(1 << 20)
        assert s.readinto(0, memoryview(big)[:3]) == 3
        assert big[:3] == b"abc"


def test_write_truncate_flush(tmp_path):
    p = str(tmp_path / "w")
    with FileStore(p, writable=True, create=True) as s:
        assert s.size() == 0
        s.pwrite(4096, b"hello")
        assert s.size() == 4101
        s.pwrite(0, memoryview(b"ab"))
        s.flush()
        s.truncate(8192)
        assert s.size() == 8192
        s.truncate(3)
        assert s.pread(0, 10) == b"ab\0"
    assert open(p, "rb").read() == b"ab\0"


def test_read_only_store_refuses_writes_and_never_modifies(tmp_path):
    p = _sparse(tmp_path / "ro", 4096, [(0, b"x" * 4096)])
    before = os.stat(p)
    with FileStore(p) as s:
        with pytest.raises(QimgError):
            s.pwrite(0, b"y")
        s.flush()
    after = os.stat(p)
    assert (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size)
    assert open(p, "rb").read() == b"x" * 4096


def test_open_errors(tmp_path):
    with pytest.raises(OpenError, match="No such file or directory"):
        FileStore(str(tmp_path / "missing"))
    with pytest.raises(OpenError):
        FileStore(str(tmp_path))


def test_holes_and_allocation(tmp_path):
    size = 8 << 20
    p = _sparse(tmp_path / "h", size, [(1 << 20, b"\1" * 65536), (5 << 20, b"\2" * 4096)])
    with FileStore(p) as s:
        assert s.allocated_size() <= 256 << 10
        assert s.next_data(0) == 1 << 20
        assert s.next_hole(1 << 20) == (1 << 20) + 65536
        assert s.next_data((1 << 20) + 65536) == 5 << 20
        assert s.next_data((5 << 20) + 4096) is None
        assert s.next_data(size) is None
        assert s.next_hole(size + 10) == size


def test_fallocate_and_punch_hole(tmp_path):
    p = str(tmp_path / "f")
    with FileStore(p, writable=True, create=True) as s:
        s.truncate(1 << 20)
        s.fallocate(0, 1 << 20)
        assert s.allocated_size() >= 1 << 20
        s.pwrite(0, b"\xff" * (1 << 20))
        if not s.punch_hole(0, 512 << 10):
            pytest.skip("filesystem cannot punch holes")
        assert s.size() == 1 << 20
        assert s.pread(0, 512 << 10) == bytes(512 << 10)
        assert s.pread(512 << 10, 4) == b"\xff" * 4
        assert s.allocated_size() <= (512 << 10) + 65536


def test_dev_ino_identifies_the_file(tmp_path):
    p = _sparse(tmp_path / "i", 1, [])
    os.link(p, tmp_path / "j")
    with FileStore(p) as a, FileStore(str(tmp_path / "j")) as b:
        assert a.dev_ino == b.dev_ino


def test_aligned_buffer_is_page_aligned():
    for n in (1, 4096, 65536 + 3, 2 << 20):
        buf = aligned_buffer(n)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert addr % 4096 == 0
        assert len(buf) >= n
        buf.close()


def test_memory_store():
    s = MemoryStore(b"abc")
    assert s.size() == 3
    s.pwrite(5, b"z")
    assert s.pread(0, 10) == b"abc\0\0z"
    assert s.pread_full(4, 4) == b"\0z\0\0"
    buf = bytearray(4)
    assert s.readinto(4, buf) == 2
    s.truncate(2)
    assert s.pread(0, 10) == b"ab"
    assert s.next_data(0) == 0 and s.next_data(2) is None and s.next_hole(0) == 2


def test_hostile_offsets_and_lengths_are_bounded(tmp_path):
    """A length read from an image never allocates past the file; an offset past off_t is a clean error."""
    from qimg.errors import CorruptImage
    from qimg.io.store import FileStore

    p = tmp_path / "small.bin"
    p.write_bytes(b"x" * 1000)
    with FileStore(str(p)) as s:
        assert s.pread(0, 1 << 40) == b"x" * 1000
        assert s.pread(2000, 1 << 40) == b""
        with pytest.raises(CorruptImage):
            s.pread(1 << 63, 8)


def test_map_of_a_huge_virtual_size_is_bounded(tmp_path):
    """A cow header claiming 2^60 bytes maps in one probe, not billions of 1 GiB probes."""
    import struct

    from tests.conftest import run_qimg

    img = tmp_path / "c.cow"
    assert run_qimg("create", "-q", "-f", "cow", img, "1M").rc == 0
    with open(img, "r+b") as f:
        f.seek(12)
        f.write(struct.pack(">Q", 1 << 60))
    r = run_qimg("map", "--output=json", img)
    assert r.rc == 0, r.err
    assert r.out.count("\n") == 1 and '"length": 1152921504606846976' in r.out
