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
