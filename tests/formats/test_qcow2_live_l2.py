"""A table the writer holds is read in place (LiveL2) with the same kinds, runs and hosts as the decoders."""

import random
from array import array

import pytest

from qimg.formats.qcow2.tables import (
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    LiveL2,
    decode_l2,
)

CB = 16
CS = 1 << CB


def _table(seed: int, n: int, data_file: bool) -> array:
    rng = random.Random(seed)
    raw = array("Q", bytes(8 * n))
    host = 1 << 30
    i = 0
    while i < n:
        k = rng.randrange(7)
        run = rng.randrange(1, 40)
        for j in range(i, min(n, i + run)):
            if k == 0:
                e = 0
            elif k == 1:
                e = QCOW_OFLAG_ZERO
            elif k == 2:  # contiguous data
                e = host | QCOW_OFLAG_COPIED
                host += CS
            elif k == 3:  # scattered data
                host += CS * rng.randrange(2, 5)
                e = host | (QCOW_OFLAG_COPIED if rng.random() < 0.5 else 0)
            elif k == 4:  # zero with a host cluster kept
                e = host | QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED
                host += CS
            elif k == 5:
                e = QCOW_OFLAG_COMPRESSED | (rng.randrange(1, 1 << 40) << 9)
            else:  # external data file: offset 0 with COPIED is a real host offset
                e = QCOW_OFLAG_COPIED if data_file else 0
            raw[j] = e
        i += run
    return raw


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("data_file", [False, True])
def test_live_view_matches_decoded_table(seed, data_file):
    n = 2048
    raw = _table(seed, n, data_file)
    dec = decode_l2(array("Q", raw), CB, False, data_file)
    live = LiveL2(raw, CS, data_file)
    for i in range(n):
        kind, end = dec.run_at(i)
        assert live.run_at(i) == (kind, end), i
        assert live.host(i) == dec.host(i), i
        # a limit shortens the run but never changes its kind
        lim = min(end, i + 1 + i % 7)
        assert live.run_at(i, lim) == (kind, lim), i


@pytest.mark.parametrize("data_file", [False, True])
def test_live_view_hosts_per_cluster_match(data_file):
    raw = _table(11, 1024, data_file)
    dec = decode_l2(array("Q", raw), CB, False, data_file)
    live = LiveL2(raw, CS, data_file)
    assert [live.chosts[i] for i in range(1024)] == [dec.chosts[i] for i in range(1024)]


def _hostile_table(seed: int, n: int) -> array:
    """Entries a crafted image can hold: reserved bits set, offsets at the top of the offset field
    (where adding a cluster would carry into the reserved bits), flags without offsets."""
    rng = random.Random(seed)
    top = ((1 << 56) - CS)
    raw = array("Q", bytes(8 * n))
    i = 0
    while i < n:
        run = rng.randrange(1, 12)
        k = rng.randrange(5)
        base = rng.choice([top - CS * rng.randrange(0, 4), rng.randrange(1, 1 << 20) * CS])
        for j in range(i, min(n, i + run)):
            if k == 0:
                e = (base + (j - i) * CS) | QCOW_OFLAG_COPIED  # may run past the offset field
            elif k == 1:
                e = rng.choice([QCOW_OFLAG_COPIED, 1 << 57, QCOW_OFLAG_ZERO | (1 << 3), 0])
            elif k == 2:
                e = (base + (j - i) * CS) | rng.choice([0, QCOW_OFLAG_ZERO]) | (rng.randrange(2) << 60)
            elif k == 3:
                e = QCOW_OFLAG_COMPRESSED | rng.randrange(1 << 60)
            else:
                e = rng.randrange(1 << 64)
            raw[j] = e
        i += run
    return raw


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("data_file", [False, True])
@pytest.mark.parametrize("shape", ["ordinary", "hostile"])
def test_plain_decoder_matches_numpy_decoder(seed, data_file, shape):
    """The run-at-a-time plain-Python decoder answers every entry as the numpy decoder does."""
    np = pytest.importorskip("numpy")
    n = 1024
    raw = _table(seed, n, data_file) if shape == "ordinary" else _hostile_table(seed, n)
    plain = decode_l2(array("Q", raw), CB, False, data_file)
    ref = decode_l2(np.frombuffer(raw.tobytes(), dtype=np.uint64).copy(), CB, False, data_file)
    assert list(plain.starts) == [int(x) for x in ref.starts]
    assert [plain.chosts[i] for i in range(n)] == ref.chosts.tolist()
    for i in range(n):
        assert plain.run_at(i) == ref.run_at(i), i
        assert plain.host(i) == ref.host(i), i
