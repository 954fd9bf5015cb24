"""first_difference / first_nonzero (the standard-library scans compare uses) against a byte loop."""

import mmap
import random

import pytest

from qimg.engine.compare import first_difference, first_nonzero


def _naive_diff(a: bytes, b: bytes):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@pytest.mark.parametrize("n", [0, 1, 7, 63, 64, 65, 4095, 4096, 4097, 100_000, 2 << 20])
def test_first_difference_at_every_kind_of_position(n):
    rng = random.Random(n)
    a = rng.randbytes(n)
    assert first_difference(a, a) is None
    positions = {0, n - 1, n // 2, 4095, 4096, 8191, 12288, 63, 64} | {rng.randrange(max(n, 1)) for _ in range(5)}
    for pos in sorted(p for p in positions if 0 <= p < n):
        b = bytearray(a)
        b[pos] ^= 0x5A
        m = mmap.mmap(-1, n)  # the engine's buffers are mmaps: compare views of them too
        m[:] = bytes(b)
        assert first_difference(a, memoryview(m)) == pos == _naive_diff(a, bytes(b))
        b[-1] ^= 1  # a later difference changes nothing
        assert first_difference(a, b) == pos or pos == n - 1
        m.close()


def test_first_difference_of_unequal_lengths():
    assert first_difference(b"abc", b"abcd") == 3
    assert first_difference(b"abd", b"abcd") == 2


@pytest.mark.parametrize("n", [0, 1, 64, 4097, 1 << 20])
def test_first_nonzero(n):
    assert first_nonzero(bytes(n)) is None
    for pos in {0, n - 1, n // 3, 4096} - {-1}:
        if 0 <= pos < n:
            b = bytearray(n)
            b[pos] = 1
            b[-1] = 1
            assert first_nonzero(b) == pos
