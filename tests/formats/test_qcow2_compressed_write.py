"""The qcow2 compressed-write pipeline: per-thread compressor contexts, runs of clusters that do not
shrink written from the caller's buffer, zero clusters found without numpy; qemu-img checks the result."""

from __future__ import annotations

import json
import random
import threading
import zlib

import pytest

from qimg.formats.qcow2 import compress as qc
from qimg.formats.qcow2.header import COMPRESSION_TYPE_ZSTD
from tests.conftest import qemu, run_fresh

KiB, MiB = 1 << 10, 1 << 20
CS = 64 * KiB


def _run(*args):
    r = run_fresh(*args, watch=("numpy",))
    return {"rc": r["rc"], "numpy": bool(r["loaded"])}


def _clusters(seed=7):
    """Cluster contents of every kind: random, compressible text, zeros, mostly zeros, random with a zero tail."""
    rnd = random.Random(seed)
    text = b"the quick brown fox jumps over the lazy dog " * (CS // 44 + 1)
    return {
        "random": rnd.randbytes(CS),
        "text": text[:CS],
        "zero": bytes(CS),
        "almost": bytes(CS - 1) + b"\x01",
        "head": b"\x01" + bytes(CS - 1),
        "tail": rnd.randbytes(CS // 2) + bytes(CS // 2),
    }


@pytest.mark.parametrize("ctype", [0, COMPRESSION_TYPE_ZSTD])
def test_compress_is_the_fresh_compressors_output_in_every_thread(ctype):
    """Reused per-thread contexts give what a fresh compressor gives (qemu-img's levels, its rule)."""
    import zstandard

    def fresh(data):
        if ctype == COMPRESSION_TYPE_ZSTD:
            out = zstandard.ZstdCompressor(level=3, write_content_size=False, write_checksum=False).compress(data)
        else:
            c = zlib.compressobj(6, zlib.DEFLATED, -12)
            out = c.compress(data) + c.flush()
        return out if len(out) < CS else None

    blocks = list(_clusters().values())
    want = [fresh(b) for b in blocks]
    assert want[0] is None and want[1] is not None  # random data does not shrink, text does
    got: list = []
    errors: list = []

    def worker():
        try:
            for _ in range(3):
                got.append([qc.compress(b, CS, ctype) for b in blocks])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got == [want] * 9
    # each result is a frame the reader inflates back
    for b, w in zip(blocks, want):
        if w is not None:
            assert qc.decompress(w, CS, ctype) == b


def test_is_zero():
    for name, b in _clusters().items():
        assert qc.is_zero(memoryview(b)) == (name == "zero")
        assert qc.is_zero(b) == (name == "zero")
    assert qc.is_zero(b"")
    assert not qc.is_zero(memoryview(bytes(3 * MiB) + b"\x01"))
    assert qc.is_zero(memoryview(bytes(3 * MiB)))


class _Writer:
    """The pieces of a qcow2 writer that ``prepare_compressed`` reads."""

    from qimg.formats.qcow2.compressed import Qcow2CompressedWriter as _W

    prepare_compressed = _W.prepare_compressed
    _compress_cluster = _W._compress_cluster

    def __init__(self, virtual_size, ctype=0):
        self.cs = CS
        self.virtual_size = virtual_size

        class H:
            compression_type = ctype

        self.h = H


def test_prepare_compressed_merges_plain_runs_without_copying():
    c = _clusters()
    layout = ["random", "random", "text", "zero", "random", "random", "random", "almost"]
    buf = bytearray(b"".join(c[k] for k in layout))
    w = _Writer(virtual_size=100 * CS)
    out = w.prepare_compressed(10 * CS, memoryview(buf))
    kinds = [(k, g // CS, None if p is None else len(p)) for k, g, p in out]
    assert kinds == [("p", 10, 2 * CS), ("c", 12, len(out[1][2])), ("z", 13, None), ("p", 14, 3 * CS),
                     ("c", 17, len(out[4][2]))]
    # the plain runs are views of the caller's buffer (no copy), holding its bytes
    assert isinstance(out[0][2], memoryview) and out[0][2].obj is buf
    assert bytes(out[0][2]) == c["random"] * 2
    assert bytes(out[3][2]) == c["random"] * 3


def test_prepare_compressed_pieces_and_the_last_short_cluster():
    c = _clusters()
    w = _Writer(virtual_size=4 * CS - 10)
    data = c["random"][:100] + c["random"] + c["random"] + c["random"][:CS - 10]
    out = w.prepare_compressed(CS - 100, data)
    assert [(k, g) for k, g, _p in out] == [("part", CS - 100), ("p", CS)]
    assert out[0][2] == c["random"][:100]
    # the last cluster of the image is short: it joins the plain run with its real length
    assert bytes(out[1][2]) == c["random"] * 2 + c["random"][:CS - 10]
    # a short last cluster that shrinks (padded with zeros, as qemu-img pads it) is compressed
    w = _Writer(virtual_size=CS + 1000)
    out = w.prepare_compressed(CS, c["random"][:1000])
    assert [(k, g) for k, g, _p in out] == [("c", CS)]
    assert qc.decompress(out[0][2], CS, 0) == c["random"][:1000] + bytes(CS - 1000)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_convert_is_valid_and_numpy_free(tmp_path, ctype):
    """Random, compressible, zero and partial clusters; an unaligned end: qemu-img check is clean, the
    image reads back equal to the source, and the convert never imported numpy."""
    c = _clusters(3)
    rnd = random.Random(5)
    size = 40 * MiB + 12345
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < 36 * MiB:
            kind = rnd.choice(list(c))
            n = rnd.choice([CS, 3 * CS, 100000, 7 * CS + 512, 2 * MiB + 4096])
            f.seek(pos)
            f.write((c[kind] * (n // CS + 1))[:n])
            pos += n + rnd.choice([0, 0, 4096, CS, MiB])
        f.seek(size - 5000)
        f.write(c["random"][:5000])
    out = tmp_path / "out.qcow2"
    r = _run("convert", "-f", "raw", "-O", "qcow2", "-c", "-o", f"compression_type={ctype}", src, out)
    assert r == {"rc": 0, "numpy": False}
    qemu("check", "-q", out)
    assert qemu("compare", "-q", "-f", "raw", "-F", "qcow2", src, out, check=False).rc == 0
    m = json.loads(qemu("map", "--output=json", out).out)
    assert any(e["data"] and "offset" not in e for e in m)  # compressed clusters
    assert any(e["data"] and "offset" in e for e in m)  # clusters stored as they are
