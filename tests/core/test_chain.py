"""Chain: backing names relative to the overlay, loops by device+inode, depth limit, short backing files.

Overlays are a tiny format defined here (so these tests do not depend on any real format driver);
the same rules are checked with qemu-img-made qcow2 overlays when the qcow2 driver is there.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from qimg.core import registry
from qimg.core.chain import Chain
from qimg.core.driver import BackingRef, Driver
from qimg.core.extent import Extent
from qimg.errors import BackingChainError, QimgError
from tests.conftest import guest_sha256

HDR = 4096
MAGIC = b"FAKEOVL\n"


class FakeOverlayDriver(Driver):
    """MAGIC + JSON header {size, backing, backing_fmt, extents}; extent bytes live at HDR + offset."""

    format_name = "fakeovl"

    @classmethod
    def probe(cls, head, filename):
        return 100 if head.startswith(MAGIC) else 0

    def _open(self, options):
        meta = json.loads(self.store.pread(len(MAGIC), HDR - len(MAGIC)).rstrip(b"\0"))
        self.virtual_size = meta["size"]
        self.extents = sorted(meta["extents"])
        if meta.get("backing"):
            self.backing = BackingRef(meta["backing"], meta.get("backing_fmt"))

    def block_status(self, offset, length):
        for s, n in self.extents:
            if s <= offset < s + n:
                return Extent(offset, min(length, s + n - offset), data=True, zero=False, present=True,
                              offset=HDR + offset)
            if s > offset:
                return Extent(offset, min(length, s - offset), data=False, zero=False, present=False)
        return Extent(offset, length, data=False, zero=False, present=False)

    def readinto(self, offset, buf):
        n = self.store.readinto(HDR + offset, buf)
        if n < len(buf):
            memoryview(buf)[n:] = bytes(len(buf) - n)


@pytest.fixture(autouse=True)
def fake_format(monkeypatch):
    monkeypatch.setitem(registry.FORMATS, "fakeovl", f"{__name__}:FakeOverlayDriver")
    yield
    registry._cache.pop("fakeovl", None)


def make_overlay(path, size, backing=None, backing_fmt=None, writes=()):
    meta = {"size": size, "backing": backing, "backing_fmt": backing_fmt, "extents": [[o, len(d)] for o, d in writes]}
    head = MAGIC + json.dumps(meta).encode()
    with open(path, "wb") as f:
        f.write(head + bytes(HDR - len(head)))
        for off, data in writes:
            f.seek(HDR + off)
            f.write(data)
    return str(path)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_relative_backing_resolves_against_overlay_dir(tmp_path, monkeypatch):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "base.raw").write_bytes(b"B" * 8192)
    make_overlay(d / "top.ovl", 8192, "base.raw", "raw", [(4096, b"T" * 4096)])
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with Chain.open(os.path.join("..", "imgs", "top.ovl")) as ch:
        assert len(ch.layers) == 2
        assert ch.filenames[1] == os.path.join("..", "imgs", "base.raw")
        assert ch.read(0, 8192) == b"B" * 4096 + b"T" * 4096
        e = ch.block_status(0, 8192)
        assert (e.length, e.depth, e.data) == (4096, 1, True)
        e = ch.block_status(4096, 4096)
        assert (e.length, e.depth, e.data) == (4096, 0, True)


def test_backing_file_missing_is_an_error(tmp_path):
    top = make_overlay(tmp_path / "top.ovl", 4096, "nothere.raw", "raw")
    with pytest.raises(QimgError, match="Could not open backing file"):
        Chain.open(top)
    with Chain.open(top, backing=False) as ch:
        assert len(ch.layers) == 1


def test_loop_is_detected(tmp_path):
    make_overlay(tmp_path / "a.ovl", 4096, "b.ovl")
    make_overlay(tmp_path / "b.ovl", 4096, "a.ovl")
    with pytest.raises(BackingChainError, match="loops"):
        Chain.open(str(tmp_path / "a.ovl"))
    make_overlay(tmp_path / "self.ovl", 4096, "self.ovl")
    with pytest.raises(BackingChainError):
        Chain.open(str(tmp_path / "self.ovl"))


def test_loop_through_another_name_is_detected_by_inode(tmp_path):
    (tmp_path / "sub").mkdir()
    make_overlay(tmp_path / "a.ovl", 4096, "sub/alias.ovl")
    os.link(tmp_path / "a.ovl", tmp_path / "sub" / "alias.ovl")
    # sub/alias.ovl is a.ovl itself: its backing "sub/alias.ovl" resolves to sub/sub/alias.ovl (missing)
    # unless the loop is caught first, by device and inode
    with pytest.raises(BackingChainError):
        Chain.open(str(tmp_path / "a.ovl"))
    os.symlink(tmp_path / "a.ovl", tmp_path / "link.ovl")
    make_overlay(tmp_path / "b.ovl", 4096, "link.ovl")
    make_overlay(tmp_path / "a.ovl", 4096, "b.ovl")  # rewrites the hard-linked inode too
    with pytest.raises(BackingChainError):
        Chain.open(str(tmp_path / "a.ovl"))


def test_depth_limit(tmp_path):
    (tmp_path / "l0.raw").write_bytes(bytes(4096))
    make_overlay(tmp_path / "l1.ovl", 4096, "l0.raw", "raw")
    for i in range(2, 8):
        make_overlay(tmp_path / f"l{i}.ovl", 4096, f"l{i - 1}.ovl", "fakeovl")
    with Chain.open(str(tmp_path / "l7.ovl")) as ch:
        assert len(ch.layers) == 8
    with pytest.raises(BackingChainError, match="limit of 3"):
        Chain.open(str(tmp_path / "l7.ovl"), max_depth=3)


def test_short_backing_reads_zeros_past_its_end(tmp_path):
    (tmp_path / "base.raw").write_bytes(b"\x11" * 65536)
    top = make_overlay(tmp_path / "top.ovl", 4 * 65536, "base.raw", "raw", [(3 * 65536, b"\x22" * 4096)])
    with Chain.open(top) as ch:
        data = ch.read(0, 4 * 65536)
        assert data[:65536] == b"\x11" * 65536
        assert data[65536:3 * 65536] == bytes(2 * 65536)
        assert data[3 * 65536:3 * 65536 + 4096] == b"\x22" * 4096
        assert data[3 * 65536 + 4096:] == bytes(65536 - 4096)
        e = ch.block_status(65536, 65536)
        assert e.zero and not e.data and not e.present
        # a read straddling the end of the backing file
        assert ch.read(65536 - 10, 20) == b"\x11" * 10 + bytes(10)
        exts = list(ch.extents())
        assert sum(e.length for e in exts) == 4 * 65536
        assert exts[0].start == 0 and all(a.end == b.start for a, b in zip(exts, exts[1:]))


def test_base_depth_hides_lower_layers(tmp_path):
    (tmp_path / "base.raw").write_bytes(b"\x11" * 8192)
    top = make_overlay(tmp_path / "top.ovl", 8192, "base.raw", "raw", [(0, b"\x22" * 4096)])
    with Chain.open(top) as ch:
        exts = list(ch.extents(0, 8192, base_depth=1))
        assert [(e.start, e.length, e.data, e.present) for e in exts] == [(0, 4096, True, True),
                                                                           (4096, 4096, False, False)]


# ---- the same with real qcow2 overlays made by qemu-img, when the qcow2 driver exists ----

def _qcow2_available():
    try:
        registry.get_driver("qcow2")
        return True
    except Exception:
        return False


@pytest.fixture
def qcow2(oracle):
    if not _qcow2_available():
        pytest.skip("qcow2 driver not available")
    return oracle


def test_qcow2_overlay_on_short_raw_base(qcow2, tmp_path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    base = d / "base.raw"
    base.write_bytes(os.urandom(100_000))  # not a multiple of 512: qemu rounds it up
    qcow2("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(d / "top.qcow2"), "1M")
    import subprocess

    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 512k 64k", str(d / "top.qcow2")], check=True,
                   capture_output=True)
    ref = tmp_path / "ref.raw"
    qcow2("convert", "-O", "raw", str(d / "top.qcow2"), str(ref))
    monkeypatch.chdir(tmp_path)
    assert guest_sha256(os.path.join("d", "top.qcow2")) == sha(ref.read_bytes())


def test_qcow2_backing_loop(qcow2, tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qcow2("create", "-q", "-f", "qcow2", str(a), "1M")
    qcow2("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(b))
    qcow2("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a))
    with pytest.raises(QimgError):
        Chain.open(str(b))
