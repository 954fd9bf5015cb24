"""qcow2 in-place edits write the header back through the one header reader/writer.

Unknown header extensions survive snapshot, resize, amend and rebase -u byte for byte (as with
qemu-img, whose result is the reference), a backing file name placed right after the header leaves no
room for extensions (as qemu-img reads it), and a shrink after a large grow with small clusters ends.
"""

from __future__ import annotations

import shutil
import struct

import pytest

from tests.conftest import guest_sha256, run_qimg, run_qimg_subprocess

UNKNOWN_EXT = 0x7E57DA7A
UNKNOWN_DATA = b"kept as it is"   # 13 bytes: padded to 16 in the file


def _ext_area(path) -> bytes:
    """The header extensions (header_length up to and including the end marker) of a qcow2 file."""
    with open(path, "rb") as f:
        head = f.read(65536)
    version = struct.unpack_from(">I", head, 4)[0]
    pos = struct.unpack_from(">I", head, 100)[0] if version >= 3 else 72
    start = pos
    while True:
        etype, elen = struct.unpack_from(">II", head, pos)
        pos += 8
        if etype == 0:
            return head[start:pos]
        pos += (elen + 7) & ~7


def _add_unknown_extension(path) -> None:
    """Insert an extension qcow2 does not define before the end marker (where qemu-img keeps it)."""
    with open(path, "r+b") as f:
        head = bytearray(f.read(65536))
        area = _ext_area(path)
        hlen = struct.unpack_from(">I", head, 100)[0]
        end = hlen + len(area) - 8
        ext = struct.pack(">II", UNKNOWN_EXT, len(UNKNOWN_DATA)) + UNKNOWN_DATA + bytes(-len(UNKNOWN_DATA) % 8)
        bfo, bfs = struct.unpack_from(">QI", head, 8)
        tail = bytes(head[end:bfo + bfs if bfo else end + 8])
        head[end:end + len(ext) + len(tail)] = ext + tail
        if bfo:
            struct.pack_into(">Q", head, 8, bfo + len(ext))
        f.seek(0)
        f.write(head)


OPS = {
    "snapshot": ("snapshot", "-c", "s1"),
    "resize": ("resize", None, "+1M"),
    "amend": ("amend", "-o", "lazy_refcounts=on"),
    "rebase": ("rebase", "-u", "-b", "base.raw", "-F", "raw"),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_unknown_extension_survives(tmp_path, oracle, op):
    oracle("create", "-q", "-f", "raw", tmp_path / "base.raw", "4M")
    img = tmp_path / "a.qcow2"
    oracle("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img, "4M")
    _add_unknown_extension(img)
    assert UNKNOWN_DATA in _ext_area(img)
    assert oracle("check", img, check=False).rc == 0
    ref = tmp_path / "ref.qcow2"
    shutil.copy(img, ref)
    args = OPS[op]

    def cmd(path):
        if op == "resize":
            return ["resize", path, args[2]]
        return [*args, path]

    r = run_qimg(*cmd(img))
    assert r.rc == 0, r.err
    oracle(*cmd(ref))
    # the extensions (the unknown one included) are what qemu-img writes for the same change
    assert UNKNOWN_DATA in _ext_area(img)
    assert _ext_area(img) == _ext_area(ref)
    assert oracle("check", img, check=False).rc == 0
    assert _info_lines(oracle, img) == _info_lines(oracle, ref)


def _info_lines(oracle, path) -> list:
    """qemu-img info without what depends on where clusters went or when a snapshot was taken."""
    out = oracle("info", path).out.replace(str(path), "X").splitlines()
    return [ln for ln in out if not ln.startswith("disk size:") and not ln[:1].isdigit()]


def test_unknown_extension_survives_downgrade_and_upgrade(tmp_path, oracle):
    img = tmp_path / "a.qcow2"
    oracle("create", "-q", "-f", "qcow2", img, "4M")
    _add_unknown_extension(img)
    before = guest_sha256(img, "qcow2")
    for compat in ("0.10", "1.1"):
        r = run_qimg("amend", "-o", f"compat={compat}", img)
        assert r.rc == 0, r.err
        assert oracle("check", img, check=False).rc == 0
    # a downgrade keeps only what version 2 can carry: the unknown extension goes, as with qemu-img
    assert UNKNOWN_DATA not in _ext_area(img)
    assert guest_sha256(img, "qcow2") == before


def test_backing_name_right_after_header(tmp_path, oracle):
    """A backing file name at header_length: no extensions are read (qemu-img opens such images)."""
    oracle("create", "-q", "-f", "raw", tmp_path / "base.raw", "1M")
    img = tmp_path / "o.qcow2"
    oracle("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw", img)
    with open(img, "r+b") as f:
        head = bytearray(f.read(4096))
        bfo, bfs = struct.unpack_from(">QI", head, 8)
        exts = bytes(head[72:bfo])
        name = bytes(head[bfo:bfo + bfs])
        head[72:72 + len(name) + len(exts)] = name + exts   # the name first, the old extensions behind it
        struct.pack_into(">QI", head, 8, 72, len(name))
        f.seek(0)
        f.write(head)
    ours = run_qimg("info", "--output=json", img)
    assert ours.rc == 0, ours.err
    assert ours.out == oracle("info", "--output=json", img).out


def test_shrink_after_large_grow_small_clusters(tmp_path, oracle):
    """The new refcount structure lands past clusters the old image still uses: sizing it must end."""
    img = tmp_path / "r.qcow2"
    ref = tmp_path / "ref.qcow2"
    oracle("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "10M")
    with open(tmp_path / "data.raw", "wb") as f:
        f.write(bytes(range(256)) * (9 * 4096))
    oracle("convert", "-n", "-f", "raw", "-O", "qcow2", tmp_path / "data.raw", img)
    assert run_qimg("resize", img, "+100M").rc == 0
    shutil.copy(img, ref)
    r = run_qimg_subprocess("resize", "--shrink", img, "5M", timeout=60)
    assert r.rc == 0, r.err
    oracle("resize", "-q", "--shrink", ref, "5M")
    assert oracle("check", img, check=False).rc == 0
    assert guest_sha256(img, "qcow2") == guest_sha256(ref, "qcow2")
