"""create -f raw against qemu-img 7.2: the Formatting line, sizes, preallocation, errors."""

from __future__ import annotations

import os

import pytest

from tests.conftest import qemu, run_qimg


def both(tmp_path, *args, name="img.raw"):
    """Run qemu-img and qimg create with the same arguments in two folders; returns (ref, got, a, b)."""
    da, db = tmp_path / "a", tmp_path / "b"
    da.mkdir(exist_ok=True)
    db.mkdir(exist_ok=True)
    a, b = da / name, db / name
    ref = qemu("create", *[str(a) if x == "IMG" else x for x in args], check=False)
    got = run_qimg("create", *[str(b) if x == "IMG" else x for x in args])
    return ref, got, a, b


def same_output(ref, got, a, b):
    assert got.rc == ref.rc
    assert got.out.replace(str(b), str(a)) == ref.out
    assert got.err.replace(str(b), str(a)).replace("qimg:", "qemu-img:") == ref.err


@pytest.mark.parametrize("size", ["1M", "1G", "1000", "1", "0", "513", "1.5k", "0x100000", "1.5M", "10T", "4096b"])
def test_sizes(oracle, tmp_path, size):
    ref, got, a, b = both(tmp_path, "-f", "raw", "IMG", size)
    same_output(ref, got, a, b)
    assert ref.rc == 0
    assert os.path.getsize(b) == os.path.getsize(a)
    # the first block is allocated (alignment probing), the rest stays a hole
    assert os.stat(b).st_blocks * 512 <= 8192
    with open(b, "rb") as f:
        assert not any(f.read(1 << 20))


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_preallocation(oracle, tmp_path, prealloc):
    ref, got, a, b = both(tmp_path, "-f", "raw", "-o", f"preallocation={prealloc}", "IMG", "3M")
    same_output(ref, got, a, b)
    assert os.path.getsize(b) == os.path.getsize(a) == 3 << 20
    alloc_a, alloc_b = os.stat(a).st_blocks * 512, os.stat(b).st_blocks * 512
    if prealloc == "off":
        assert alloc_b <= 8192
    else:
        assert alloc_b >= 3 << 20
        assert abs(alloc_a - alloc_b) <= 65536
    with open(b, "rb") as f:
        assert not any(f.read())


def test_preallocation_as_size_option_and_quiet(oracle, tmp_path):
    ref, got, a, b = both(tmp_path, "-q", "-f", "raw", "-o", "size=2M,preallocation=falloc", "IMG")
    same_output(ref, got, a, b)
    assert got.out == ""
    assert os.path.getsize(b) == 2 << 20


@pytest.mark.parametrize("args", [
    ["-f", "raw", "IMG"],                               # no size
    ["-f", "raw", "IMG", "1kb"],                        # bad suffix
    ["-f", "raw", "IMG", "1.5"],                        # fraction of bytes
    ["-f", "raw", "IMG", "16E"],                        # too large
    ["-f", "raw", "-o", "nosuchopt=1", "IMG", "1M"],    # unknown option
    ["-f", "nosuchfmt", "IMG", "1M"],                   # unknown format
])
def test_errors(oracle, tmp_path, args):
    ref, got, a, b = both(tmp_path, *args)
    assert ref.rc == 1
    assert got.rc == 1
    first = ref.err.splitlines()[0].replace(str(a), str(b)).replace("qemu-img:", "qimg:")
    assert got.err.splitlines()[0] == first
    assert not b.exists()


def test_invalid_preallocation_value(oracle, tmp_path):
    ref, got, a, b = both(tmp_path, "-f", "raw", "-o", "preallocation=foo", "IMG", "1M")
    assert ref.rc == got.rc == 1
    assert got.err.replace(str(b), str(a)).replace("qimg:", "qemu-img:") == ref.err


def test_default_format_is_raw(oracle, tmp_path):
    ref, got, a, b = both(tmp_path, "IMG", "64k")
    same_output(ref, got, a, b)
    assert "fmt=raw" in got.out


def test_overwrites_existing_file(oracle, tmp_path):
    (tmp_path / "b").mkdir()
    p = tmp_path / "b" / "img.raw"
    p.write_bytes(b"\xff" * 100_000)
    r = run_qimg("create", "-f", "raw", p, "64k")
    assert r.rc == 0
    assert p.read_bytes() == bytes(65536)
