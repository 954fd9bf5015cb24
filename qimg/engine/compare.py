"""Chunked buffer comparison with numpy, for ``compare`` and ``rebase``'s safe mode.

API (all offsets are bytes; buffers are any objects numpy can view: bytes, bytearray,
mmap, memoryview of those):

``first_difference(buf1, buf2) -> int | None``
    Index of the first byte where two equally long buffers differ, or None when equal.
``first_nonzero(buf) -> int | None``
    Index of the first non-zero byte, or None when the buffer is all zeros.
``sector_of(index, sector=512) -> int``
    ``index`` rounded down to its sector: qemu-img reports mismatches per 512-byte sector.
``diff_runs(buf1, buf2, granularity=512) -> [(start, end), ...]``
    Runs (relative to the buffers) of ``granularity``-sized blocks that differ, merged when
    adjacent; the last block may be short.  rebase writes exactly these runs.
``BufferPool(size, count)``
    Page-aligned reusable buffers (``get()``/``put(buf)``/``close()``).
``ordered_map(func, items, workers=2, depth=None)``
    Runs ``func(item)`` in worker threads and yields ``(item, result)`` in input order with at
    most ``depth`` calls in flight, so memory stays bounded; closing the generator early
    cancels what has not started.  numpy and os.preadv release the GIL, so two workers
    overlap reading one chunk with comparing the previous one.

Buffers are compared as 64-bit words where the length allows (about 10 GB/s in memory),
then the differing word is narrowed down to its byte.
"""

from __future__ import annotations

import collections
import mmap
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SECTOR = 512
#: qemu-img compare reads at most this much per step
IO_BUF_SIZE = 2 << 20


def _u8(buf) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8)


def first_difference(buf1, buf2) -> int | None:
    """Index of the first differing byte of two buffers, or None (a shorter buffer differs at its end)."""
    a, b = _u8(buf1), _u8(buf2)
    n = min(a.size, b.size)
    a, b = a[:n], b[:n]
    words = n // 8
    if words:
        wa, wb = a[:words * 8].view(np.uint64), b[:words * 8].view(np.uint64)
        # random data differs early: look at a short prefix before the full pass
        head = min(words, 512)
        idx = np.flatnonzero(wa[:head] != wb[:head])
        if idx.size == 0 and head < words and not np.array_equal(wa[head:], wb[head:]):
            idx = np.flatnonzero(wa[head:] != wb[head:])[:1] + head
        if idx.size:
            w = int(idx[0]) * 8
            return w + int(np.flatnonzero(a[w:w + 8] != b[w:w + 8])[0])
    rest = np.flatnonzero(a[words * 8:] != b[words * 8:])
    if rest.size:
        return words * 8 + int(rest[0])
    if _u8(buf1).size != _u8(buf2).size:
        return n
    return None


def first_nonzero(buf) -> int | None:
    """Index of the first non-zero byte, or None when ``buf`` is all zeros."""
    from .zeroscan import is_zero

    if is_zero(buf):
        return None
    a = _u8(buf)
    words = a.size // 8
    if words:
        w = a[:words * 8].view(np.uint64)
        idx = np.flatnonzero(w)
        if idx.size:
            base = int(idx[0]) * 8
            return base + int(np.flatnonzero(a[base:base + 8])[0])
    return words * 8 + int(np.flatnonzero(a[words * 8:])[0])


def sector_of(index: int, sector: int = SECTOR) -> int:
    """The start of the sector holding byte ``index``."""
    return index // sector * sector


def diff_runs(buf1, buf2, granularity: int = SECTOR) -> list[tuple[int, int]]:
    """Runs of ``granularity`` blocks that differ between two equally long buffers."""
    a, b = _u8(buf1), _u8(buf2)
    n = min(a.size, b.size)
    if n == 0:
        return []
    full = n // granularity * granularity
    runs: list[tuple[int, int]] = []
    if full:
        if granularity % 8 == 0:
            ba = a[:full].view(np.uint64).reshape(-1, granularity // 8)
            bb = b[:full].view(np.uint64).reshape(-1, granularity // 8)
        else:
            ba, bb = a[:full].reshape(-1, granularity), b[:full].reshape(-1, granularity)
        mask = (ba != bb).any(axis=1)
        if mask.any():
            edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
            runs = [(s * granularity, e * granularity)
                    for s, e in zip(edges[0::2].tolist(), edges[1::2].tolist())]
    if full < n and not np.array_equal(a[full:n], b[full:n]):
        if runs and runs[-1][1] == full:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((full, n))
    return runs


class BufferPool:
    """Reusable page-aligned buffers (unaligned copies from the page cache are several times slower)."""

    def __init__(self, size: int, count: int):
        self.size = size
        self.free = [mmap.mmap(-1, max(size, 1)) for _ in range(count)]

    def get(self):
        return self.free.pop()

    def put(self, buf) -> None:
        self.free.append(buf)

    def close(self) -> None:
        for b in self.free:
            try:
                b.close()
            except BufferError:
                pass
        self.free = []


def ordered_map(func, items, workers: int = 2, depth: int | None = None):
    """``(item, func(item))`` in input order, computed by ``workers`` threads, ``depth`` in flight."""
    workers = max(1, workers)
    depth = depth or workers * 2
    if workers == 1:
        for item in items:
            yield item, func(item)
        return
    pending: collections.deque = collections.deque()
    executor = ThreadPoolExecutor(max_workers=workers)
    try:
        for item in items:
            while len(pending) >= depth:
                it, fut = pending.popleft()
                yield it, fut.result()
            pending.append((item, executor.submit(func, item)))
        while pending:
            it, fut = pending.popleft()
            yield it, fut.result()
    finally:
        for _it, fut in pending:
            fut.cancel()
        executor.shutdown(wait=True)
