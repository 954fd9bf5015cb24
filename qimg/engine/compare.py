"""Chunked buffer comparison for ``compare`` and ``rebase``'s safe mode.

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
``ordered_map(func, items, workers=2, depth=None)``
    Runs ``func(item)`` in worker threads and yields ``(item, result)`` in input order with at
    most ``depth`` calls in flight, so memory stays bounded; closing the generator early
    cancels what has not started.  numpy and os.preadv release the GIL, so two workers
    overlap reading one chunk with comparing the previous one.

``compare`` stays in the standard library (a metadata-sized job must not pay numpy's import):
windows of growing size are compared with one memcmp each (``bytes.startswith``), and the first
differing window is bisected down to its byte.  ``diff_runs`` (rebase) scans whole blocks with numpy.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

SECTOR = 512
#: qemu-img compare reads at most this much per step
IO_BUF_SIZE = 2 << 20
#: the first window looked at; windows double from there (random data differs early)
_WINDOW = 4096
#: below this many bytes the difference is found byte by byte
_NARROW = 64


def _bytes_view(buf) -> memoryview:
    mv = memoryview(buf)
    return mv if mv.ndim == 1 and mv.itemsize == 1 else mv.cast("B")


def _same(a: memoryview, b: memoryview) -> bool:
    """Equal slices, compared by one memcmp (``bytes.startswith`` takes any buffer; comparing
    memoryviews directly goes element by element, about 20x slower)."""
    return bytes(a).startswith(b)


def _first_window(n: int, equal) -> tuple[int, int] | None:
    """The first window [lo, hi) of growing size for which ``equal(lo, hi)`` fails, or None."""
    lo, step = 0, _WINDOW
    while lo < n:
        hi = min(n, lo + step)
        if not equal(lo, hi):
            return lo, hi
        lo, step = hi, step * 2
    return None


def _narrow(lo: int, hi: int, equal) -> int:
    """Bisect a failing window down to its first failing position."""
    while hi - lo > _NARROW:
        mid = (lo + hi) // 2
        if equal(lo, mid):
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if not equal(i, i + 1):
            return i
    return hi  # (unreachable for a failing window)


def first_difference(buf1, buf2) -> int | None:
    """Index of the first differing byte of two buffers, or None (a shorter buffer differs at its end)."""
    a, b = _bytes_view(buf1), _bytes_view(buf2)
    n = min(len(a), len(b))

    def equal(lo, hi):
        return _same(a[lo:hi], b[lo:hi])

    win = _first_window(n, equal)
    if win is not None:
        return _narrow(*win, equal)
    return n if len(a) != len(b) else None


def first_nonzero(buf) -> int | None:
    """Index of the first non-zero byte, or None when ``buf`` is all zeros."""
    from .zeroscan import is_zero

    a = _bytes_view(buf)

    def zero(lo, hi):
        return is_zero(a[lo:hi])

    win = _first_window(len(a), zero)
    return None if win is None else _narrow(*win, zero)


def sector_of(index: int, sector: int = SECTOR) -> int:
    """The start of the sector holding byte ``index``."""
    return index // sector * sector


def diff_runs(buf1, buf2, granularity: int = SECTOR) -> list[tuple[int, int]]:
    """Runs of ``granularity`` blocks that differ between two equally long buffers (numpy: rebase only)."""
    import numpy as np

    a, b = np.frombuffer(buf1, dtype=np.uint8), np.frombuffer(buf2, dtype=np.uint8)
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
