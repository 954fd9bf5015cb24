"""Hostile images crafted by fuzz/hostile.py: every command fails cleanly or succeeds, within the
address-space limit, without a hang, and in untrusted mode without a byte of a file outside the
allowed folder in any output.  The full run (every command, both modes, times and peak RSS) is
``python fuzz/hostile.py``; this test runs a fast subset and has no timing assertions."""

from __future__ import annotations

import pytest

from fuzz import hostile
from tests.conftest import ROOT, qemu

FORMATS = ("qcow2", "qcow", "qed", "vdi", "vpc", "vhdx", "vmdk", "parallels", "dmg", "cloop", "bochs")


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, qemu_img):
    base = tmp_path_factory.mktemp("hostile")
    img = base / "images"
    img.mkdir()
    secret = hostile.secret_file(str(base))
    return str(img), hostile.craft(str(img), secret)


@pytest.mark.parametrize("fmt", FORMATS + ("polyglot",))
def test_hostile_images_fail_cleanly(crafted, fmt):
    out_dir, cases = crafted
    mine = [c for c in cases if c.name.split("/")[0] == fmt]
    assert mine
    bad = []
    for case in mine:
        for untrusted, cmd in ((False, "map"), (True, "info"), (True, "convert")):
            o = hostile.run_one(case, cmd, untrusted, out_dir, str(ROOT))
            bad += [f"{o.mode} {cmd} {case.name}: {p}" for p in hostile.problems(o)]
    assert not bad, "\n".join(bad)


def test_references_refused_and_secret_kept(crafted):
    """Every reference escape is refused in untrusted mode, with the rule in one line."""
    out_dir, cases = crafted
    for case in (c for c in cases if c.refs):
        o = hostile.run_one(case, "convert", True, out_dir, str(ROOT))
        assert o.rc == 1 and o.err.count("\n") == 1 and "refused" in o.err, (case.name, o.err)
        assert hostile.SECRET[:25] not in o.out


@pytest.mark.parametrize("name, what", [
    ("vdi/entry-past-eof", "block map entry at host offset"),
    ("parallels/entry-past-eof", "BAT entry"),
    ("vmdk/grain-past-eof", "grain at host offset"),
    ("bochs/entry-past-eof", "catalog entry at host offset"),
])
def test_table_entry_past_eof_strict(crafted, name, what):
    """Untrusted: a table entry past EOF names the image and the offset; trusted: as qemu-img 7.2.
    (A dynamic VHD's BAT entry past EOF is refused at open in both modes, as qemu-img refuses it.)"""
    out_dir, cases = crafted
    case = next(c for c in cases if c.name == name)
    o = hostile.run_one(case, "convert", True, out_dir, str(ROOT))
    assert o.rc == 1 and o.err.count("\n") == 1, o.err
    assert o.err.startswith(f"qimg: '{case.path}': {what} ") and "lies past the end of the file" in o.err
    trusted = hostile.run_one(case, "convert", False, out_dir, str(ROOT))
    theirs = qemu("convert", "-O", "raw", case.path, f"{out_dir}/q.raw", check=False)
    assert trusted.rc == theirs.rc, (trusted.err, theirs.err)


@pytest.mark.parametrize("name", ["dmg/zlib-inflates-past-size", "cloop/inflates-past-size", "vmdk/stream-grain-bomb"])
def test_stream_inflating_past_its_size_fails_as_qemu(crafted, name):
    """A compressed chunk whose stream goes on past the chunk's size fails the read in both modes, as
    qemu-img fails it; the bomb is cut at the format's own size."""
    out_dir, cases = crafted
    case = next(c for c in cases if c.name == name)
    theirs = qemu("convert", "-O", "raw", case.path, f"{out_dir}/q.raw", check=False)
    for untrusted in (False, True):
        o = hostile.run_one(case, "convert", untrusted, out_dir, str(ROOT))
        assert o.rc == theirs.rc == 1 and o.err.count("\n") == 1 and "inflate to exactly" in o.err, o.err


@pytest.mark.parametrize("name, message", [
    ("qed/l2-is-l1", "L2 table at offset 0x10000 overlaps L1 table at offset 0x10000"),
    ("vpc/bat-over-header", "dynamic header at offset 0x200 overlaps BAT at offset 0x200"),
])
def test_overlapping_metadata_strict(crafted, name, message):
    """Untrusted: metadata overlapping metadata is refused naming the image and the offsets; trusted: the
    exit status is qemu-img 7.2's."""
    out_dir, cases = crafted
    case = next(c for c in cases if c.name == name)
    o = hostile.run_one(case, "convert", True, out_dir, str(ROOT))
    assert o.rc == 1 and o.err.count("\n") == 1 and f"'{case.path}': {message}" in o.err, o.err
    assert o.err.count(case.path) == 1, o.err  # named once, also when the open adds its own prefix
    trusted = hostile.run_one(case, "convert", False, out_dir, str(ROOT))
    theirs = qemu("convert", "-O", "raw", case.path, f"{out_dir}/q.raw", check=False)
    assert trusted.rc == theirs.rc, (trusted.err, theirs.err)
