"""Zero detection over buffers with numpy, at qemu-img's ``-S`` granularity.

Blocks are aligned to absolute guest offsets so that consecutive chunks agree.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402


def is_zero(buf) -> bool:
    """True when every byte of ``buf`` is zero."""
    n = len(buf)
    if n == 0:
        return True
    a = np.frombuffer(buf, dtype=np.uint8)
    words = n // 8
    if words:
        w = a[:words * 8].view(np.uint64)
        if w[0] or w[-1] or w.any():
            return False
    return not a[words * 8:].any()


def nonzero_runs(buf, offset: int, granularity: int) -> list[tuple[int, int]]:
    """Runs (start, end), relative to ``buf``, that must be written: every block of
    ``granularity`` bytes (aligned to absolute ``offset``) that is not all zeros.

    Partial blocks at either end count as data unless they are all zeros.
    """
    n = len(buf)
    if n == 0:
        return []
    if granularity <= 0:
        return [(0, n)]
    head = (-offset) % granularity
    head = min(head, n)
    body = (n - head) // granularity * granularity
    runs: list[tuple[int, int]] = []

    def add(s, e):
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], e)
        else:
            runs.append((s, e))

    mv = memoryview(buf)
    if head and not is_zero(mv[:head]):
        add(0, head)
    if body:
        a = np.frombuffer(mv[head:head + body], dtype=np.uint8)
        if granularity % 8 == 0 and ((head + _addr(buf)) % 8 == 0):
            blocks = a.view(np.uint64).reshape(-1, granularity // 8)
        else:
            blocks = a.reshape(-1, granularity)
        # random data exits on the first or last word; only the rest needs a full scan
        mask = (blocks[:, 0] != 0) | (blocks[:, -1] != 0)
        rest = np.flatnonzero(~mask)
        if rest.size:
            mask[rest] = blocks[rest].any(axis=1)
        if mask.all():
            add(head, head + body)
        elif mask.any():
            edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
            for s, e in zip(edges[0::2].tolist(), edges[1::2].tolist()):
                add(head + s * granularity, head + e * granularity)
    tail = n - head - body
    if tail > 0 and not is_zero(mv[head + body:]):
        add(head + body, n)
    return runs


def _addr(buf) -> int:
    try:
        return np.frombuffer(buf, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError):
        return 0
