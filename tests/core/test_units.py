"""units: parse_size / size_to_str against qemu-img 7.2."""

from __future__ import annotations

import re

import pytest

from qimg.errors import QimgError, QimgWarning
from qimg.units import div_round_up, parse_image_size, parse_size, round_up, size_to_str
from tests.conftest import run_qimg

# values observed from `qemu-img create -f raw x SIZE` (qemu-img 7.2)
PARSED = {
    "0": 0, "100": 100, "512b": 512, "1k": 1024, "1K": 1024, "1M": 1 << 20, "1.5k": 1536, "1.50k": 1536,
    "1.25M": 1310720, "1.5G": 1610612736, "0.5T": 549755813888, "1P": 1 << 50, "1e": 1 << 60,
    "7E": 8070450532247928832, "1.5E": 1729382256910270464, "0x1000": 4096, "0X1F": 31, "0x10b": 267,
    "0.1k": 102, "1.0000001k": 1024, "1.k": 1024, "0.k": 0, "0.": 0, "00.5k": 512, " 1k": 1024,
    "1.0": 1, "1.000": 1, "1.0b": 1,
}
INVALID = ["1.5", "1.001", "1.5b", ".5k", "1kb", "1k ", "1_0", "0x", "0xk", "0x1.5k", "1..5k", "1.5kk", "", "k"]


@pytest.mark.parametrize("text,value", sorted(PARSED.items()))
def test_parse_size_values(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", INVALID)
def test_parse_size_invalid(text):
    assert parse_size(text) is None


def test_parse_size_hex_with_suffix_is_deprecated_but_accepted(capsys, tmp_path, oracle):
    # the library warns (a QimgWarning) and prints nothing; the command line prints it as qemu-img does
    with pytest.warns(QimgWarning, match="^Using a multiplier suffix on hex numbers is deprecated: 0x10k$"):
        assert parse_size("0x10k") == 16384
    assert capsys.readouterr().err == ""
    theirs = oracle("create", "-f", "raw", tmp_path / "a.raw", "0x10k")
    for _ in range(2):  # every time, not once per process
        ours = run_qimg("create", "-f", "raw", tmp_path / "a.raw", "0x10k")
        assert (ours.rc, ours.out, ours.err) == (0, theirs.out, theirs.err.replace("qemu-img:", "qimg:"))


def test_parse_size_range():
    assert parse_size("9223372036854775807") == (1 << 63) - 1
    for text in ("9223372036854775808", "8E", "16E", "0x8000000000000000"):
        with pytest.raises(QimgError, match="Must be between 0 and 9223372036854775807"):
            parse_size(text)
    with pytest.raises(QimgError):
        parse_image_size("-1")
    with pytest.raises(QimgError, match="You may use k, M, G, T, P or E suffixes"):
        parse_image_size("1kb")


def test_parse_size_default_suffix():
    assert parse_size("4", default_suffix="k") == 4096
    assert parse_size("4b", default_suffix="k") == 4


def test_round_helpers():
    assert round_up(0, 512) == 0
    assert round_up(1, 512) == 512
    assert round_up(512, 512) == 512
    assert div_round_up(513, 512) == 2


SIZES = [0, 512, 1000 * 512, 1023 * 1024, 1000 * 1024, 1024 * 1024, 999 * 1024 * 1024, 1000 * 1024 * 1024,
         1536 * 1024, 10 * 1024 ** 3, 1000 * 1024 ** 3, 3 * 1024 ** 4 + 512, 15 * 1024 ** 4]


@pytest.mark.parametrize("size", SIZES)
def test_size_to_str_matches_qemu_info(oracle, tmp_path, size):
    img = tmp_path / "s.raw"
    with open(img, "wb") as f:
        f.truncate(size)
    out = oracle("info", "-f", "raw", str(img)).out
    m = re.search(r"^virtual size: (.*) \((\d+) bytes\)$", out, re.M)
    assert m and int(m.group(2)) == size
    assert size_to_str(size) == m.group(1)


def test_size_to_str_known():
    assert size_to_str(0) == "0 B"
    assert size_to_str(1023) == "0.999 KiB"
    assert size_to_str(1024) == "1 KiB"
    assert size_to_str(1536) == "1.5 KiB"
    assert size_to_str(1 << 30) == "1 GiB"


@pytest.mark.parametrize("text", ["1.5k", "0x1000", "1.0", "1.25M", "00.5k", "1.5", ".5k", "1kb", "0x1.5k",
                                  "8E"])
def test_create_size_parsing_matches_qemu(oracle, tmp_path, text):
    """The whole path: what `create` prints (size= or the error) and its status, as qemu-img."""
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    ref = oracle("create", "-f", "raw", str(a), text, check=False)
    got = run_qimg("create", "-f", "raw", str(b), text)
    assert got.rc == ref.rc
    assert got.out.replace(str(b), str(a)) == ref.out
    if ref.rc:
        ref_first = ref.err.splitlines()[0].replace("qemu-img:", "qimg:")
        assert got.err.splitlines()[0] == ref_first
