"""The copy engine: ordered writes from one thread, -S rules, zero handling, compression hooks,
several sources, errors from workers, and the raw-to-raw copy_file_range path."""

from __future__ import annotations

import os
import random
import threading

import pytest

from qimg.core.driver import Driver
from qimg.core.extent import Extent
from qimg.engine.copy import ChainSource, ConcatSource, CopyOptions, Source, copy_range


class BytesSource(Source):
    """Guest bytes in memory; extents: data where ``data_ranges`` say, zero elsewhere."""

    def __init__(self, data: bytes, data_ranges, present=True):
        self.data = bytes(data)
        self.virtual_size = len(data)
        self.ranges = sorted(data_ranges)
        self.present = present

    def extents(self, start, end):
        pos = start
        for s, e in self.ranges + [(self.virtual_size, self.virtual_size)]:
            s, e = max(s, pos), min(e, end)
            if pos < min(s, end):
                yield Extent(pos, min(s, end) - pos, data=False, zero=True, present=self.present)
                pos = min(s, end)
            if s < e:
                yield Extent(s, e - s, data=True, zero=False, present=True)
                pos = e
            if pos >= end:
                return

    def readinto(self, offset, buf):
        mv = memoryview(buf)
        mv[:] = self.data[offset:offset + len(mv)]


class RecordingTarget(Driver):
    """A target that records every call and the thread it came from (the contract's defaults for the rest)."""

    has_zero_init = True

    def __init__(self, size, fill=b"\0"):
        self.buf = bytearray(fill * size)
        self.calls = []
        self.threads = set()

    def pwrite(self, off, data):
        self.threads.add(threading.get_ident())
        self.calls.append(("w", off, len(data)))
        self.buf[off:off + len(data)] = bytes(data)

    def write_zeroes(self, off, n, may_unmap=True):
        self.threads.add(threading.get_ident())
        self.calls.append(("z", off, n))
        self.buf[off:off + n] = bytes(n)


def make_source(seed=1, size=9 << 20):
    rnd = random.Random(seed)
    data = bytearray(size)
    ranges = [(s, min(e, size)) for s, e in [(0, 100_000), (3 << 20, (6 << 20) + 4096), (8 << 20, size)] if s < size]
    for s, e in ranges:
        data[s:e] = rnd.randbytes(e - s)
    if size > 6 << 20:
        data[(4 << 20):(4 << 20) + 65536] = bytes(65536)  # zeros inside a data extent
        data[(5 << 20) + 100] = 0  # a single zero byte: not a zero block
    return BytesSource(data, ranges), data


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_writes_are_ordered_and_from_the_calling_thread(workers):
    src, data = make_source()
    dst = RecordingTarget(len(data))
    copy_range(src, dst, 0, len(data), CopyOptions(workers=workers, target_is_zero=True))
    assert bytes(dst.buf) == bytes(data)
    offs = [c[1] for c in dst.calls]
    assert offs == sorted(offs)
    assert dst.threads == {threading.get_ident()}
    # the zeros inside the data extent were not written; nothing was zero-filled (target is zero)
    assert all(c[0] == "w" for c in dst.calls)
    assert not any(c[1] <= (4 << 20) + 100 < c[1] + c[2] for c in dst.calls)


def test_zero_ranges_written_when_target_is_not_zero():
    src, data = make_source()
    dst = RecordingTarget(len(data), fill=b"\xee")
    copy_range(src, dst, 0, len(data), CopyOptions(target_is_zero=False))
    assert bytes(dst.buf) == bytes(data)
    assert any(c[0] == "z" for c in dst.calls)


def test_min_sparse_zero_writes_everything():
    src, data = make_source()
    dst = RecordingTarget(len(data), fill=b"\xee")
    copy_range(src, dst, 0, len(data), CopyOptions(min_sparse=0, target_is_zero=True))
    assert bytes(dst.buf) == bytes(data)
    assert sum(c[2] for c in dst.calls if c[0] == "w") == len(data)


def test_sub_range_and_dst_offset():
    src, data = make_source()
    dst = RecordingTarget(len(data) + 4096)
    copy_range(src, dst, 1000, 5 << 20, CopyOptions(target_is_zero=True), dst_offset=4096)
    assert bytes(dst.buf[4096 + 1000:4096 + (5 << 20)]) == bytes(data[1000:5 << 20])
    assert not any(dst.buf[:4096 + 1000])


def test_skip_unallocated_leaves_target_alone():
    data = bytes(range(256)) * 4096
    src = BytesSource(data, [(0, 4096)], present=False)
    dst = RecordingTarget(len(data), fill=b"\xee")
    copy_range(src, dst, 0, len(data), CopyOptions(skip_unallocated=True))
    assert bytes(dst.buf[:4096]) == data[:4096]
    assert dst.buf[4096:] == b"\xee" * (len(data) - 4096)


class CompressingTarget(RecordingTarget):
    supports_compression = True

    def prepare_compressed(self, off, data):
        return (off, bytes(data))

    def write_prepared(self, off, prepared):
        assert prepared[0] == off
        self.threads.add(threading.get_ident())
        self.calls.append(("c", off, len(prepared[1])))
        self.buf[off:off + len(prepared[1])] = prepared[1]


def test_compressed_writes_are_whole_clusters_in_order():
    src, data = make_source()
    dst = CompressingTarget(len(data))
    copy_range(src, dst, 0, len(data), CopyOptions(compress=True, target_is_zero=True, chunk=3 << 16),
               cluster_size=65536)
    assert bytes(dst.buf) == bytes(data)
    cs = [c for c in dst.calls if c[0] == "c"]
    assert [c[1] for c in cs] == sorted(c[1] for c in cs)
    assert all(c[1] % 65536 == 0 for c in cs)
    assert dst.threads == {threading.get_ident()}
    # the all-zero cluster inside the data extent was not compressed
    assert not any(c[1] == 4 << 20 for c in cs)


def test_concat_sources_shift_extents():
    a, da = make_source(1, 3 << 20)
    b, db = make_source(2, 9 << 20)
    src = ConcatSource([a, b])
    assert src.virtual_size == len(da) + len(db)
    exts = list(src.extents(0, src.virtual_size))
    assert exts[0].start == 0
    assert all(x.end == y.start for x, y in zip(exts, exts[1:]))
    assert exts[-1].end == src.virtual_size
    dst = RecordingTarget(src.virtual_size)
    copy_range(src, dst, 0, src.virtual_size, CopyOptions(target_is_zero=True))
    assert bytes(dst.buf) == bytes(da) + bytes(db)


def test_worker_errors_reach_the_caller():
    class Broken(BytesSource):
        def readinto(self, offset, buf):
            if offset >= 4 << 20:
                raise OSError(5, "Input/output error")
            super().readinto(offset, buf)

    src, data = make_source()
    broken = Broken(data, src.ranges)
    dst = RecordingTarget(len(data))
    before = threading.active_count()  # other tests' servers may be running
    with pytest.raises(OSError, match="Input/output error"):
        copy_range(broken, dst, 0, len(data), CopyOptions())
    assert threading.active_count() <= before  # worker threads were joined


def test_progress_counts_every_byte():
    class P:
        done = 0

        def update(self, n):
            self.done += n

    src, data = make_source()
    p = P()
    copy_range(src, RecordingTarget(len(data)), 0, len(data), CopyOptions(target_is_zero=True), progress=p)
    assert p.done == len(data)


def test_offload_uses_copy_file_range_and_skips_the_scan(tmp_path, monkeypatch):
    """-C copies data extents in the kernel, without a zero scan (as qemu-img -C); without it
    the data is written from the scanned buffer and zeros inside data stay holes."""
    from qimg.core.chain import Chain
    from qimg.core.registry import open_image

    src_path = tmp_path / "s.raw"
    with open(src_path, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(3 << 20))
        f.write(bytes(1 << 20))
        f.write(b"tail")
    size = os.path.getsize(src_path)
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a) or real(*a))
    for offload in (True, False):
        calls.clear()
        out = tmp_path / f"o{offload}.raw"
        with open(out, "wb") as f:
            f.truncate(size + 1000)
        with Chain.open(str(src_path), "raw") as ch:
            dst = open_image(str(out), "raw", writable=True)
            try:
                copy_range(ChainSource(ch), dst, 0, ch.virtual_size,
                           CopyOptions(target_is_zero=True, offload=offload), dst_offset=1000)
            finally:
                dst.close()
        got = out.read_bytes()
        assert got[1000:1000 + size] == src_path.read_bytes()
        assert not any(got[:1000])
        zero_mib = (4 << 20) + 1000 + 8192  # a block inside the written zero MiB, in the target
        fd = os.open(out, os.O_RDONLY)
        try:
            in_data = os.lseek(fd, zero_mib, os.SEEK_DATA) == zero_mib
        finally:
            os.close(fd)
        if offload:
            assert calls and in_data  # copied as it is, zeros included
        else:
            assert not calls and not in_data


def _raw_target(tmp_path, size):
    from qimg.core.registry import open_image

    p = tmp_path / "t.raw"
    with open(p, "wb") as f:
        f.truncate(size)
    return p, open_image(str(p), "raw", writable=True)


def test_raw_target_workers_write_progress_and_errors(tmp_path):
    class P:
        done = 0

        def update(self, n):
            self.done += n

    src, data = make_source()
    p, dst = _raw_target(tmp_path, len(data))
    prog = P()
    try:
        copy_range(src, dst, 0, len(data), CopyOptions(target_is_zero=True), progress=prog)
    finally:
        dst.close()
    assert p.read_bytes() == bytes(data)
    assert prog.done == len(data)
    # zeros inside data stay holes in the raw target
    assert os.stat(p).st_blocks * 512 < len(data)

    class Broken(BytesSource):
        def readinto(self, offset, buf):
            if offset >= 4 << 20:
                raise OSError(5, "Input/output error")
            super().readinto(offset, buf)

    before = threading.active_count()
    p, dst = _raw_target(tmp_path, len(data))
    try:
        with pytest.raises(OSError, match="Input/output error"):
            copy_range(Broken(data, src.ranges), dst, 0, len(data), CopyOptions(workers=3))
    finally:
        dst.close()
    assert threading.active_count() == before


def test_raw_target_extent_walk_errors_reach_the_caller(tmp_path):
    class BadExtents(BytesSource):
        def extents(self, start, end):
            yield Extent(0, 4096, data=True, zero=False, present=True)
            raise ValueError("bad table")

    p, dst = _raw_target(tmp_path, 1 << 20)
    try:
        with pytest.raises(ValueError, match="bad table"):
            copy_range(BadExtents(bytes(1 << 20), []), dst, 0, 1 << 20, CopyOptions())
    finally:
        dst.close()
