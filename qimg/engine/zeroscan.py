"""Zero detection over buffers, at qemu-img's ``-S`` granularity.

Blocks are aligned to absolute guest offsets so that consecutive chunks agree.

The common cases stay in the standard library (numpy costs ~50 ms to import, a third of a
small convert): the first and last 64-bit word of every block come out of one strided
memoryview, so random data is recognised without touching the rest of the block, and
``ZEROS.startswith(view)`` is a copy-free ``memcmp`` (~60 GB/s) that settles all-zero runs.
Chunks that mix data and zero blocks are split by bisection over those two checks; only a
chunk with many transitions falls back to a numpy scan (imported then, once).
"""

from __future__ import annotations

#: a zero buffer that all-zero checks compare against (calloc'd: costs no memory until read)
_ZERO_LEN = 4 << 20
ZEROS = bytes(_ZERO_LEN)
#: bisection steps per chunk before a numpy scan is cheaper
_MAX_SPLITS = 48


def is_zero(buf) -> bool:
    """True when every byte of ``buf`` is zero."""
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    n = len(mv)
    if n == 0:
        return True
    # random data differs in the first or last byte almost always
    if mv[0] or mv[n - 1]:
        return False
    pos = 0
    while pos < n:
        step = min(_ZERO_LEN, n - pos)
        if not ZEROS.startswith(mv[pos:pos + step]):
            return False
        pos += step
    return True


def nonzero_runs(buf, offset: int, granularity: int) -> list[tuple[int, int]]:
    """Runs (start, end), relative to ``buf``, that must be written: every block of
    ``granularity`` bytes (aligned to absolute ``offset``) that is not all zeros.

    Partial blocks at either end count as data unless they are all zeros.
    """
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    n = len(mv)
    if n == 0:
        return []
    if granularity <= 0:
        return [(0, n)]
    head = min((-offset) % granularity, n)
    body = (n - head) // granularity * granularity
    runs: list[tuple[int, int]] = []

    def add(s, e):
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], e)
        else:
            runs.append((s, e))

    if head and not is_zero(mv[:head]):
        add(0, head)
    if body:
        for s, e in _body_runs(mv[head:head + body], granularity):
            add(head + s, head + e)
    tail = n - head - body
    if tail > 0 and not is_zero(mv[head + body:]):
        add(head + body, n)
    return runs


def _body_runs(mv: memoryview, g: int) -> list[tuple[int, int]]:
    """Non-zero runs of a buffer made of whole blocks of ``g`` bytes."""
    n = len(mv)
    nblocks = n // g
    if g % 8:
        return _numpy_runs(mv, g)
    words = g // 8
    q = mv.cast("Q")
    first = q[0::words].tolist()
    last = first if words == 1 else q[words - 1::words].tolist()
    # every block has a non-zero first (or last) word: all data, nothing else to look at
    if 0 not in first or 0 not in last:
        return [(0, n)]
    runs: list[tuple[int, int]] = []
    budget = _MAX_SPLITS
    todo = [(0, nblocks)]  # block ranges still to settle, leftmost last (an explicit stack, no closures)
    while todo:
        b0, b1 = todo.pop()
        f = first[b0:b1]
        if 0 not in f or 0 not in last[b0:b1] or (b1 - b0 == 1 and not is_zero(mv[b0 * g:b1 * g])):
            s, e = b0 * g, b1 * g  # all data
        elif not any(f) and is_zero(mv[b0 * g:b1 * g]):
            continue  # all zero
        else:
            budget -= 1
            if budget < 0:
                return _numpy_runs(mv, g)
            mid = (b0 + b1) // 2
            todo.append((mid, b1))
            todo.append((b0, mid))
            continue
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], e)
        else:
            runs.append((s, e))
    return runs


def _numpy_runs(mv: memoryview, g: int) -> list[tuple[int, int]]:
    """The same answer through numpy: for chunks with many data/zero transitions."""
    import numpy as np

    n = len(mv)
    a = np.frombuffer(mv, dtype=np.uint8)
    if g % 8 == 0:
        blocks = a.view(np.uint64).reshape(-1, g // 8)
    else:
        blocks = a.reshape(-1, g)
    # random data exits on the first or last word; only the rest needs a full scan
    mask = (blocks[:, 0] != 0) | (blocks[:, -1] != 0)
    rest = np.flatnonzero(~mask)
    if rest.size:
        mask[rest] = blocks[rest].any(axis=1)
    if mask.all():
        return [(0, n)]
    if not mask.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return [(s * g, e * g) for s, e in zip(edges[0::2].tolist(), edges[1::2].tolist())]
