"""The streamOptimized writer: runs of grains compressed per job in reused buffers, written in guest
order whatever the callers' write sizes; the convert does not import numpy; qemu-img reads every result."""

from __future__ import annotations

import random
import zlib

import pytest

from qimg.formats.vmdk.stream import SAMPLE, StreamWriter
from tests.conftest import qemu
from tests.formats.test_qcow2_compressed_write import _run

KiB, MiB = 1 << 10, 1 << 20
GRAIN = 64 * KiB


def _source(path, size, seed, zero_grains=True):
    """Random grains, text, zeros, runs longer than a job, a short tail (without ``zero_grains``, no
    grain is all zeros: a writer given one in a larger write stores it, as the copy engine never does)."""
    rnd = random.Random(seed)
    text = (b"streamOptimized grains, deflated in order " * (GRAIN // 16))
    parts = []
    total = 0
    kind = ""
    while total < size:
        kind = rnd.choice(["random", "text", "long"] + (["zero"] if zero_grains or kind != "zero" else []))
        n = rnd.choice([GRAIN, 3 * GRAIN, 5000, GRAIN + 777])
        if kind == "zero" and not zero_grains:
            n = 5000
        if kind == "long":
            n, blob = 5 * MiB + 4096, rnd.randbytes(5 * MiB + 4096)
        elif kind == "random":
            blob = rnd.randbytes(n)
        elif kind == "text":
            blob = (text * (n // len(text) + 1))[:n]
        else:
            blob = bytes(n)
        parts.append(blob)
        total += n
    data = b"".join(parts)[:size]
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("sizes", [[4096, 12345, GRAIN, 3 * MiB + 512], [64 * MiB]])
def test_any_write_sizes_give_the_same_stream(tmp_path, sizes):
    """Writes of odd sizes (partial grains, many runs) and one huge write produce the same file bytes
    as grain-sized writes, and qemu-img reads it back as the source."""
    size = 20 * MiB + 3000
    src = tmp_path / "src.raw"
    data = _source(src, size, 11, zero_grains=False)
    outs = []
    for name, pattern in (("grain", [GRAIN]), ("odd", sizes)):
        out = tmp_path / f"{name}.vmdk"
        assert _run("create", "-f", "vmdk", "-o", "subformat=streamOptimized", out, size)["rc"] == 0
        from tests.conftest import open_rw

        img = open_rw(out, "vmdk")
        try:
            pos, i = 0, 0
            while pos < size:
                n = min(pattern[i % len(pattern)], size - pos)
                chunk = data[pos:pos + n]
                img.pwrite(pos, chunk)
                pos += n
                i += 1
        finally:
            img.close()
        qemu("check", "-q", "-f", "vmdk", out)
        assert qemu("compare", "-q", "-f", "raw", "-F", "vmdk", src, out, check=False).rc == 0
        outs.append(out.read_bytes())
    # the descriptors differ (CID, file name); everything from the first grain on is the same
    assert outs[0][GRAIN:] == outs[1][GRAIN:]


def test_stream_convert_is_valid_and_numpy_free(tmp_path):
    src = tmp_path / "src.raw"
    _source(src, 24 * MiB + 1000, 4)
    out = tmp_path / "s.vmdk"
    r = _run("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, out)
    assert r == {"rc": 0, "numpy": False}
    qemu("check", "-q", "-f", "vmdk", out)
    assert qemu("compare", "-q", "-f", "raw", "-F", "vmdk", src, out, check=False).rc == 0


def test_incompressible_probe_agrees_with_the_default_window():
    """The probes use a 4 KiB window: a sample's deflated length (so the stored/deflated choice) is
    what the default 32 KiB window gives."""
    rnd = random.Random(2)
    samples = [rnd.randbytes(SAMPLE), bytes(SAMPLE), (b"abcdefgh" * 300)[:SAMPLE],
               bytes(rnd.randrange(4) for _ in range(SAMPLE)),
               bytes(rnd.choice(b"ACGT") for _ in range(SAMPLE))]
    for s in samples:
        assert len(zlib.compress(s, 1, 12)) == len(zlib.compress(s, 1))
    # random grains are stored (a valid zlib stream holding the grain), text is deflated
    g = rnd.randbytes(GRAIN)
    stored = b"".join(bytes(b) for b in StreamWriter._compress(memoryview(g)))
    assert zlib.decompress(stored) == g and len(stored) > GRAIN
    text = (b"abc" * GRAIN)[:GRAIN]
    deflated = b"".join(StreamWriter._compress(memoryview(text)))
    assert zlib.decompress(deflated) == text and len(deflated) < GRAIN // 10
