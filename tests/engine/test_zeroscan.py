"""zeroscan: qemu-img's -S rules (blocks aligned to guest offsets, partial blocks at the ends)."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys

import pytest

from qimg.engine import zeroscan
from qimg.engine.zeroscan import _numpy_runs, is_zero, nonzero_runs


def reference(buf, offset, g):
    """Block by block, the slow obvious way."""
    n = len(buf)
    bounds = []
    head = min((-offset) % g, n)
    if head:
        bounds.append((0, head))
    pos = head
    while pos < n:
        end = min(pos + g, n)
        bounds.append((pos, end))
        pos = end
    runs = []
    for s, e in bounds:
        if any(buf[s:e]):
            if runs and runs[-1][1] == s:
                runs[-1] = (runs[-1][0], e)
            else:
                runs.append((s, e))
    return runs


def random_buffer(rnd, n):
    b = bytearray(n)
    for _ in range(rnd.randrange(0, 10)):
        s = rnd.randrange(0, n + 1)
        ln = rnd.randrange(0, min(n - s, 30000) + 1)
        if rnd.random() < 0.5:
            b[s:s + ln] = rnd.randbytes(ln)
        elif ln:
            for _ in range(4):
                b[rnd.randrange(s, s + ln)] = rnd.randrange(1, 256)
    return b


def test_matches_reference_on_random_layouts():
    rnd = random.Random(1234)
    for _ in range(1500):
        g = rnd.choice([512, 1024, 4096, 8192, 65536])
        b = random_buffer(rnd, rnd.randrange(0, 200_000))
        off = rnd.randrange(0, 1 << 22)
        assert nonzero_runs(b, off, g) == reference(b, off, g), (g, len(b), off)
        assert is_zero(b) == (not any(b))


def test_block_with_zero_first_and_last_word_is_still_data():
    b = bytearray(3 * 4096)
    b[4096 + 2000] = 1  # middle of block 1; its first and last words are zero
    assert nonzero_runs(b, 0, 4096) == [(4096, 8192)]
    assert not is_zero(b)


def test_blocks_follow_absolute_offsets():
    b = bytearray(8192)
    b[100] = 1
    # at guest offset 1000 the first block ends at 4096 - 1000 = 3096
    assert nonzero_runs(b, 1000, 4096) == [(0, 3096)]
    b = bytearray(8192)
    b[-1] = 1
    # the partial tail block (offset 1000 + 8192 = 9192, block from 8192) is data alone
    assert nonzero_runs(b, 1000, 4096) == [(7192, 8192)]


def test_granularity_zero_means_everything_and_empty():
    assert nonzero_runs(bytes(10), 0, 0) == [(0, 10)]
    assert nonzero_runs(b"", 0, 4096) == []
    assert is_zero(b"") and is_zero(bytes(10 << 20)) and not is_zero(bytes(10 << 20) + b"\1")


def test_all_data_and_all_zero_chunks():
    buf = mmap.mmap(-1, 2 << 20)
    assert nonzero_runs(buf, 0, 4096) == []
    buf[:] = os.urandom(2 << 20)
    assert nonzero_runs(buf, 2 << 20, 4096) == [(0, 2 << 20)]
    buf.close()


def test_many_transitions_use_the_numpy_path(monkeypatch):
    g = 4096
    b = bytearray(512 * g)
    for i in range(0, 512, 2):
        b[i * g + 7] = 1  # every other block is data: far beyond the bisection budget
    calls = []
    real = zeroscan._numpy_runs
    monkeypatch.setattr(zeroscan, "_numpy_runs", lambda mv, gr: calls.append(1) or real(mv, gr))
    assert nonzero_runs(b, 0, g) == reference(b, 0, g)
    assert calls
    assert _numpy_runs(memoryview(b), g) == reference(b, 0, g)


@pytest.mark.parametrize("g", [512, 4096, 65536])
def test_numpy_path_agrees(g):
    rnd = random.Random(g)
    for _ in range(50):
        n = rnd.randrange(1, 40) * g
        b = random_buffer(rnd, n)
        assert _numpy_runs(memoryview(b), g) == reference(b, 0, g)


def test_plain_data_needs_no_numpy():
    code = (
        "import os, sys, mmap\n"
        "from qimg.engine.zeroscan import nonzero_runs\n"
        "b = mmap.mmap(-1, 4 << 20); b[:2 << 20] = os.urandom(2 << 20)\n"
        "assert nonzero_runs(memoryview(b)[:2 << 20], 0, 4096) == [(0, 2 << 20)]\n"
        "assert nonzero_runs(memoryview(b)[2 << 20:], 0, 4096) == []\n"
        "assert nonzero_runs(memoryview(b)[1 << 20:3 << 20], 1 << 20, 4096) == [(0, 1 << 20)]\n"
        "print('numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
