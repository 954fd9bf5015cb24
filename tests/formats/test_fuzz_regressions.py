"""Inputs the fuzz campaign (fuzz/run.py) found, replayed: each must end cleanly (a QimgError or a
correct read), within its CPU and memory limits, in untrusted mode and in qemu-img's mode."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qimg.core.chain import Chain
from qimg.core.policy import Policy
from qimg.ops.map import map_entries
from tests.conftest import ROOT, qemu

REGRESSIONS = ROOT / "fuzz" / "regressions"
sys.path.insert(0, str(ROOT / "fuzz"))
import harness  # noqa: E402


@pytest.mark.parametrize("name", sorted(os.listdir(REGRESSIONS)))
def test_replay(name, tmp_path):
    """Every saved input, replayed as the fuzzer ran it (open, info, map, a full read; untrusted)."""
    fmt = name.split("-")[0]
    target = tmp_path / f"image.{fmt}"
    target.write_bytes((REGRESSIONS / name).read_bytes())
    harness.run_file(str(target), fmt)  # raises on anything but a QimgError


def test_replay_limits():
    """The same inputs, each in a fresh process: no error, and within 2 s of CPU and 256 MiB."""
    for name in sorted(os.listdir(REGRESSIONS)):
        p = subprocess.run([sys.executable, str(ROOT / "fuzz" / "harness.py"), name.split("-")[0],
                            str(REGRESSIONS / name)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert '"crash": false' in p.stdout, (name, p.stdout, p.stderr)


def _huge_l1(path: Path) -> Path:
    """A 64 KiB qcow2 with 512-byte clusters whose header claims an L1 table of 2.6 million entries: only
    the first two map guest offsets."""
    qemu("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "64K")
    with open(path, "r+b") as f:
        f.seek(36)
        f.write(struct.pack(">I", 0x00290002))
    return path


@pytest.mark.parametrize("untrusted", [False, True])
def test_huge_l1_past_guest_range(oracle, tmp_path, untrusted, monkeypatch):
    """Found as a slow input: map walked every L1 entry in Python (1 s for 2.6M entries of a 2 KiB file).
    Now only the entries that map guest offsets are looked at, and they are scanned a slice at a time
    (counted here: the entries the driver steps through one by one)."""
    import qimg.formats.qcow2.driver as qdriver

    stepped = []

    def counting_enumerate(seq, start=0):
        for item in enumerate(seq, start):
            stepped.append(1)
            yield item

    monkeypatch.setattr(qdriver, "enumerate", counting_enumerate, raising=False)
    path = _huge_l1(tmp_path / "x.qcow2")
    try:
        with Chain.open(str(path), "qcow2", policy=Policy(untrusted=untrusted)) as chain:
            entries = [(e.start, e.length, e.data, e.zero) for e in map_entries(chain)]
            drv = chain.top
            assert len(drv.l1) == 0x00290002
            assert drv._l1_nonzero == []
    except Exception as e:  # untrusted mode may refuse the table past the end of the file outright
        from qimg.errors import QimgError

        assert untrusted and isinstance(e, QimgError), e
        return
    assert entries == [(0, 65536, False, True)]
    assert len(stepped) < 4096


@pytest.mark.parametrize("untrusted", [False, True])
def test_zstd_small_clusters(oracle, tmp_path, untrusted):
    """Found from a seed: a zstd-compressed qcow2 with 512-byte clusters, as qemu-img writes it, failed to
    read ("Unknown frame descriptor" / "inflates to more than the cluster size"): the sectors read for a
    compressed cluster also hold the start of the next one, which was taken for a second frame."""
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(64 << 10)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xa5 0 4k", "-c", "write -P 0x5a 12k 1k", str(raw)],
                   check=True, capture_output=True)
    img = tmp_path / "z.qcow2"
    qemu("convert", "-c", "-O", "qcow2", "-o", "cluster_size=512,compression_type=zstd", raw, img)
    with Chain.open(str(img), "qcow2", policy=Policy(untrusted=untrusted)) as chain:
        got = chain.read(0, chain.virtual_size)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(raw.read_bytes()).hexdigest()


def test_dmg_plist_unknown_encoding(tmp_path):
    """Found by the campaign: a DMG whose XML plist declares an encoding Python does not know
    (encoding="UTF-9") escaped the plist parser as LookupError, a traceback instead of one line."""
    from qimg.errors import CorruptImage

    path = tmp_path / "x.dmg"
    path.write_bytes((REGRESSIONS / "dmg-plist-unknown-encoding").read_bytes())
    with pytest.raises(CorruptImage, match=r"dmg plist has no usable blkx table \(LookupError\)"):
        Chain.open(str(path), "dmg", policy=Policy(untrusted=True))
