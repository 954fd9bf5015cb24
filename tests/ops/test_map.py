"""map: human and JSON output against qemu-img 7.2, merging rules, huge sparse images."""

from __future__ import annotations

import importlib.util
import time

import pytest

from tests.conftest import qemu, run_qimg, write_pattern

MiB = 1 << 20

EXTENTS = [(0, 4096), (65536, 100000), (5 * MiB, MiB), (9 * MiB - 512, 512)]


def _qcow2_ready() -> bool:
    try:
        if importlib.util.find_spec("qimg.formats.qcow2") is None:
            return False
        from qimg.formats.qcow2 import Qcow2Driver  # noqa: F401
    except Exception:  # noqa: BLE001 - a driver still being written
        return False
    return True


needs_qcow2 = pytest.mark.skipif(not _qcow2_ready(), reason="qcow2 driver not available")


def same(*args):
    """Run qemu-img and qimg with the same arguments; assert equal stdout, stderr and status."""
    q = qemu(*args, check=False)
    m = run_qimg(*args)
    assert m.rc == q.rc, (args, m.err, q.err)
    # the oracle's output is read as text (universal newlines turn progress's \r into \n)
    assert m.out.replace("\r\n", "\n").replace("\r", "\n") == q.out, args
    assert m.err == q.err.replace("qemu-img", "qimg"), args
    return m


@pytest.fixture
def raw(tmp_path):
    return write_pattern(tmp_path / "a.raw", 10 * MiB, EXTENTS)


@pytest.mark.parametrize("extra", [
    [], ["--output=json"], ["--output", "json"], ["--output=human"],
    ["--start-offset=70000", "--max-length", "1M", "--output=json"],
    ["--start-offset=70001"], ["--start-offset", "1.5k"], ["--max-length", "1"],
    ["--max-length", "1", "--output=json"], ["--start-offset=20M", "--output=json"],
    ["--start-offset=20M"], ["--max-length", "0", "--output=json"], ["-U"],
    ["--object", "secret,id=s0,data=x"],
])
def test_map_raw_matches_qemu(oracle, raw, extra):
    same("map", "-f", "raw", *extra, raw)


def test_map_probed_and_image_opts(oracle, raw):
    same("map", raw)
    same("map", "--output=json", "--image-opts", f"driver=raw,file.filename={raw}")


@pytest.mark.parametrize("args", [
    ["map"], ["map", "A", "A"], ["map", "--start-offset=abc", "A"], ["map", "--max-length=-1", "A"],
    ["map", "--start-offset", "-5", "A"], ["map", "--start-offset", "8E", "A"], ["map", "--output=xml", "A"],
    ["map", "--bogus", "A"], ["map", "-x", "A"], ["map", "-f", "foo", "A"], ["map", "--start-offset"],
    ["map", "-f"], ["map", "-f", "raw", "--image-opts", "driver=raw,file.filename=A"],
    ["map", "--object", "foo", "A"], ["map", "--start-offset=abc", "--output=xml", "A"], ["map", "--output=xml"],
    ["map", "--output=xml", "NOPE"], ["map", "--object", "foo", "NOPE"],
])
def test_map_errors_match_qemu(oracle, raw, args):
    subst = {"A": str(raw), "NOPE": str(raw.parent / "nope")}
    same(*[subst.get(a, a.replace("=A", f"={raw}")) for a in args])


def test_map_missing_and_directory(oracle, tmp_path):
    same("map", tmp_path / "nope")
    same("map", tmp_path)


def test_map_empty_image(oracle, tmp_path):
    p = tmp_path / "e.raw"
    p.write_bytes(b"")
    same("map", "-f", "raw", "--output=json", p)
    same("map", "-f", "raw", p)


def test_map_help_exits_zero():
    r = run_qimg("map", "-h")
    assert r.rc == 0 and "usage: qimg" in r.out


def test_map_huge_sparse_raw_streams(tmp_path):
    """A 1 TiB sparse raw maps in a few extents, quickly, without reading data."""
    p = tmp_path / "huge.raw"
    with open(p, "wb") as f:
        f.truncate(1 << 40)
        f.seek(500 << 30)
        f.write(b"x" * 4096)
    t = time.monotonic()
    r = run_qimg("map", "-f", "raw", "--output=json", p)
    assert r.rc == 0
    assert time.monotonic() - t < 5
    lines = r.out.splitlines()
    assert len(lines) == 3
    assert lines[1] == ('{ "start": 536870912000, "length": 4096, "depth": 0, "present": true, "zero": false, '
                        '"data": true, "offset": 536870912000},')
    assert lines[-1].endswith("]")


def test_map_entries_merge_across_probes():
    """Probes are cut at 1 GiB; contiguous runs of one kind still come out as one entry."""
    from qimg.core.extent import Extent
    from qimg.ops.map import map_entries

    class FakeChain:
        virtual_size = 5 << 30

        def block_status(self, offset, length):
            n = min(length, 256 << 20)  # the layer answers in small pieces
            return Extent(offset, n, data=True, zero=False, present=True, offset=offset, filename="f")

    entries = list(map_entries(FakeChain()))
    assert [(e.start, e.length, e.offset) for e in entries] == [(0, 5 << 30, 0)]
    entries = list(map_entries(FakeChain(), start=7 << 30))
    assert [(e.start, e.length, e.present) for e in entries] == [(7 << 30, 0, False)]


def test_map_entries_do_not_merge_discontiguous_offsets():
    from qimg.core.extent import Extent
    from qimg.ops.map import map_entries

    class FakeChain:
        virtual_size = 4 * MiB

        def block_status(self, offset, length):
            n = min(length, MiB)
            return Extent(offset, n, data=True, zero=False, present=True, offset=offset * 2, filename="f")

    entries = list(map_entries(FakeChain()))
    assert len(entries) == 4


def test_map_human_refuses_data_without_offset():
    from qimg.core.extent import Extent
    from qimg.errors import QimgError
    from qimg.ops.map import check_human, map_entries

    class FakeChain:
        virtual_size = MiB

        def block_status(self, offset, length):
            return Extent(offset, length, data=True, zero=False, present=True, compressed=True)

    (entry,) = list(map_entries(FakeChain()))
    with pytest.raises(QimgError, match="external, encrypted or compressed"):
        check_human(entry)


# ---- qcow2 (needs the qcow2 driver) ----

@needs_qcow2
def test_map_qcow2_chain_matches_qemu(oracle, tmp_path, raw):
    base = tmp_path / "base.qcow2"
    qemu("convert", "-f", "raw", "-O", "qcow2", raw, base)
    top = tmp_path / "top.qcow2"
    qemu("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "12M")
    qemu("bench", "-w", "-c", "1", "-o", str(MiB), "-s", "128k", "-f", "qcow2", top, check=False)
    for fmt_args in (["--output=json"], [], ["--output=json", "--start-offset", "5M", "--max-length", "6M"]):
        same("map", *fmt_args, top)
        same("map", *fmt_args, base)


@needs_qcow2
def test_map_qcow2_short_backing_depth(oracle, tmp_path):
    """Past the end of a short backing file the overlay answers (depth 0), as qemu-img says."""
    small = tmp_path / "small.qcow2"
    qemu("create", "-f", "qcow2", small, "3M")
    mid = tmp_path / "mid.qcow2"
    qemu("create", "-f", "qcow2", "-b", "small.qcow2", "-F", "qcow2", mid, "6M")
    top = tmp_path / "top.qcow2"
    qemu("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "9M")
    sraw = tmp_path / "s.raw"
    write_pattern(sraw, 2 * MiB, [(0, MiB)])
    over = tmp_path / "over.qcow2"
    qemu("create", "-f", "qcow2", "-b", "s.raw", "-F", "raw", over, "5M")
    for img in (top, mid, over):
        same("map", "--output=json", img)
        same("map", img)


@needs_qcow2
def test_map_qcow2_compressed(oracle, tmp_path, raw):
    comp = tmp_path / "c.qcow2"
    qemu("convert", "-c", "-f", "raw", "-O", "qcow2", raw, comp)
    same("map", "--output=json", comp)
    q = qemu("map", comp, check=False)
    m = run_qimg("map", comp)
    assert m.rc == q.rc == 1
    assert m.err == q.err.replace("qemu-img", "qimg")
