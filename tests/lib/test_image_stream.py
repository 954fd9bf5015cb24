"""qimg.open() -> Image: the stream of every format qimg reads equals qemu-img convert -O raw."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import pytest

import qimg
from tests.conftest import decompress_to, oracle_raw, sha256_file

#: one corpus image per format (and the multi-file sets): stored name, format, the files decompressed beside it
CORPUS = [
    ("bochs/empty.bochs.bz2", "bochs", ()),
    ("cloop/simple-pattern.cloop.bz2", "cloop", ()),
    ("dmg/simple-dmg.dmg.bz2", "dmg", ()),
    ("parallels/parallels-v1.bz2", "parallels", ()),
    ("raw/grub_mbr.raw.bz2", "raw", ()),
    ("vhdx/dynamic.vhdx.gz", "vhdx", ()),
    ("vpc/dynamic.vhd.gz", "vpc", ()),
    ("vpc/fixed.vhd.gz", "vpc", ()),
    ("vdi/basic.vdi.gz", "vdi", ()),
    ("vmdk/image.vmdk", "vmdk", ()),
    ("qcow2/basic-zstd.qcow2.gz", "qcow2", ()),
    ("qcow2/backing-chain-1.qcow2.gz", "qcow2", ("qcow2/backing-chain-2.qcow2.gz", "qcow2/backing-chain-3.qcow2.gz")),
]


class _Hasher:
    """A write-only file object that hashes what is written (the other end of shutil.copyfileobj)."""

    def __init__(self):
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, data):
        self.h.update(data)
        self.n += len(data)
        return len(data)


def _stream_sha(img, length=1 << 20) -> tuple[str, int]:
    out = _Hasher()
    shutil.copyfileobj(img, out, length)
    return out.h.hexdigest(), out.n


@pytest.fixture(scope="module")
def corpus_dir(shared_images, tmp_path_factory):
    return tmp_path_factory.mktemp("corpus")


def _image(shared_images, corpus_dir, stored, siblings) -> Path:
    for sib in siblings:
        decompress_to(shared_images / sib, corpus_dir / Path(sib).parent)
    return decompress_to(shared_images / stored, corpus_dir / Path(stored).parent)


@pytest.mark.parametrize("stored,fmt,siblings", CORPUS, ids=[c[0] for c in CORPUS])
def test_stream_equals_qemu_convert(shared_images, expected_images, corpus_dir, stored, fmt, siblings):
    exp = expected_images["images"][stored]
    path = _image(shared_images, corpus_dir, stored, siblings)
    with qimg.open(path, fmt) as img:
        assert img.size == exp["virtual_size"]
        digest, n = _stream_sha(img)
        assert n == exp["virtual_size"]
        assert digest == exp["raw_sha256"]
        assert img.read() == b"" and img.read(10) == b""  # at the end, as files do


def test_luks_stream_with_secret(shared_images, expected_images, corpus_dir):
    exp = expected_images["images"]["luks/compatimage.img.xz"]
    path = _image(shared_images, corpus_dir, "luks/compatimage.img.xz", ())
    with qimg.open(path, "luks", secrets={"s0": "compatkey"}, options={"key-secret": "s0"}) as img:
        assert _stream_sha(img) == (exp["raw_sha256"], exp["virtual_size"])


@pytest.mark.parametrize("fmt", ["qed", "qcow"])
def test_formats_outside_the_corpus(oracle, tmp_path, fmt):
    """qed and qcow, written by qemu-img with data at odd places, read as qemu-img converts them."""
    img_path = tmp_path / f"img.{fmt}"
    oracle("create", "-f", fmt, img_path, "8M")
    qemu_io = ["qemu-io", "-f", fmt, "-c", "write -P 0x5a 100k 300k", "-c", "write -P 0xa5 5M 64k", str(img_path)]
    import subprocess

    subprocess.run(qemu_io, check=True, capture_output=True)
    raw = oracle_raw(img_path, tmp_path, fmt)
    with qimg.open(img_path, fmt) as img:
        assert _stream_sha(img)[0] == sha256_file(raw)


def test_bytesio_and_path_sources(shared_images, expected_images, corpus_dir):
    stored = "vdi/basic.vdi.gz"
    exp = expected_images["images"][stored]
    path = _image(shared_images, corpus_dir, stored, ())
    data = path.read_bytes()
    for source in (path, str(path), io.BytesIO(data)):
        with qimg.open(source) as img:  # probed
            assert img.format == "vdi"
            assert hashlib.file_digest(img, "sha256").hexdigest() == exp["raw_sha256"]
    with open(path, "rb") as f, qimg.open(f) as img:
        assert img.name == str(path)
        assert _stream_sha(img)[0] == exp["raw_sha256"]
        assert not f.closed  # the caller's file stays the caller's
    from_memory = qimg.info(io.BytesIO(data)).to_dict()
    from_file = qimg.info(path).to_dict()
    assert from_memory.pop("filename") == "<BytesIO>"
    assert from_memory.pop("actual-size") == len(data)  # no holes to subtract in memory
    from_file.pop("filename"), from_file.pop("actual-size")
    assert from_memory == from_file


def test_snapshots_equal_qemu_convert_l(shared_images, corpus_dir, tmp_path, oracle):
    path = _image(shared_images, corpus_dir, "qcow2/snapshot.qcow2.gz", ())
    with qimg.open(path) as img:
        snaps = img.snapshots
        assert [s.name for s in snaps] == [s["name"] for s in
                                           __import__("json").loads(oracle("info", "--output=json", path).out)
                                           ["snapshots"]]
        for snap in snaps:
            raw = tmp_path / f"snap-{snap.id}.raw"
            oracle("convert", "-f", "qcow2", "-O", "raw", "-l", f"snapshot.id={snap.id}", path, raw)
            with img.open_snapshot(snap.id) as view:
                assert _stream_sha(view)[0] == sha256_file(raw)
            with qimg.open(path, snapshot=snap.name) as view, open(raw, "rb") as f:
                assert not view.writable()
                for offset in (0, 1 << 20, 3 << 20, 100 << 20):
                    f.seek(offset)
                    assert view.pread(offset, 65536) == f.read(65536)
        with pytest.raises(qimg.QimgError, match="Failed to load snapshot"):
            img.open_snapshot("no such snapshot")


def test_layers_open_as_their_own_images(shared_images, corpus_dir, expected_images):
    path = _image(shared_images, corpus_dir, "qcow2/backing-chain-1.qcow2.gz",
                  ("qcow2/backing-chain-2.qcow2.gz", "qcow2/backing-chain-3.qcow2.gz"))
    with qimg.open(path) as img:
        layers = img.layers
        assert [Path(la.filename).name for la in layers] == [
            "backing-chain-1.qcow2", "backing-chain-2.qcow2", "backing-chain-3.qcow2"]
        assert [la.depth for la in layers] == [0, 1, 2]
        for layer, stored in zip(layers, ("qcow2/backing-chain-1.qcow2.gz", "qcow2/backing-chain-2.qcow2.gz",
                                          "qcow2/backing-chain-3.qcow2.gz")):
            with layer.open() as view:
                assert view.format == "qcow2"
                assert _stream_sha(view)[0] == expected_images["images"][stored]["raw_sha256"]
        with qimg.open(path, backing=False) as top, layers[0].open(backing=False) as alone:
            assert len(top.layers) == 1
            assert top.pread(0, 1 << 20) == alone.pread(0, 1 << 20)


def test_extents_match_qemu_map(shared_images, corpus_dir, oracle):
    import json

    path = _image(shared_images, corpus_dir, "qcow2/backing-chain-1.qcow2.gz",
                  ("qcow2/backing-chain-2.qcow2.gz", "qcow2/backing-chain-3.qcow2.gz"))
    expected = json.loads(oracle("map", "--output=json", path).out)
    with qimg.open(path) as img:
        got = [e.to_dict() for e in img.extents()]
    assert got == expected
    assert [e.to_dict() for e in qimg.map(path)] == expected
    part = json.loads(oracle("map", "--output=json", "--start-offset=1M", "--max-length=5M", path).out)
    assert [e.to_dict() for e in qimg.map(path, start_offset="1M", max_length=5 << 20)] == part
