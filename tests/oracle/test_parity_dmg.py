"""DMG images whose block map is a classic binary resource fork (older hdiutil), read as qemu-img 7.2 reads
them.  The forks are built here from the public layout (Inside Macintosh: More Macintosh Toolbox,
"Resource Manager": a 16-byte header with the data and map offsets and lengths, the data area at 0x100
holding each resource as a 4-byte length and its bytes, then the map with its type list and reference
lists), carrying the corpus images' own 'blkx' mish blocks."""

from __future__ import annotations

import bz2
import plistlib
import shutil
import struct

import pytest

from tests.oracle.twin import Twin

CORPUS = ["simple-dmg.dmg.bz2", "hfsplus_zlib.dmg"]


def rsrc_fork(resources) -> bytes:
    """A resource fork holding ``resources`` [(type, bytes)], grouped by type in the map."""
    data = bytearray()
    types: dict = {}
    for kind, blob in resources:
        types.setdefault(kind, []).append(len(data))
        data += struct.pack(">I", len(blob)) + blob
    data_off = 0x100
    ref_base = 2 + 8 * len(types)
    type_list = bytearray(struct.pack(">H", len(types) - 1))
    refs = bytearray()
    for kind, offs in types.items():
        type_list += struct.pack(">4sHH", kind, len(offs) - 1, ref_base + len(refs))
        for i, off in enumerate(offs):
            refs += struct.pack(">hHII", i, 0xFFFF, off & 0xFFFFFF, 0)  # id, no name, attributes|offset, handle
    header = struct.pack(">IIII", data_off, data_off + len(data), len(data), 28 + len(type_list) + len(refs))
    rmap = header + bytes(8) + struct.pack(">HH", 28, 28 + len(type_list) + len(refs)) + type_list + refs
    return header + bytes(data_off - 16) + bytes(data) + rmap


def build(src: bytes, variant: str) -> bytes:
    """The image ``src`` (a plist dmg) with its blkx table moved into a resource fork."""
    koly = bytearray(src[-512:])
    xml_off, xml_len = struct.unpack_from(">QQ", koly, 216)
    blocks = [b["Data"] for b in plistlib.loads(src[xml_off:xml_off + xml_len])["resource-fork"]["blkx"]]
    fork = bytearray(rsrc_fork([(b"blkx", b) for b in blocks] + [(b"plst", bytes(0x28))]))
    out = bytearray(src[:xml_off])
    fork_off, fork_len = len(out), len(fork)
    if variant == "map-outside":       # the trailer's fork length stops where the map begins
        fork_len = struct.unpack_from(">I", fork, 4)[0]
    elif variant == "data-0x200":      # the data area elsewhere than 0x100: qemu reads the header's offset
        fork = fork[:16] + bytes(0x100) + fork[16:]
        struct.pack_into(">I", fork, 0, 0x200)
        fork_len = len(fork)
    elif variant == "no-data":         # an empty data area
        struct.pack_into(">I", fork, 8, 0)
    out += fork
    if variant == "with-plist":        # both: the resource fork wins
        struct.pack_into(">QQ", koly, 216, len(out), xml_len)
        out += src[xml_off:xml_off + xml_len]
    else:
        struct.pack_into(">QQ", koly, 216, 0, 0)
    struct.pack_into(">QQ", koly, 40, fork_off, fork_len)
    return bytes(out + koly)


@pytest.fixture(params=CORPUS)
def source(request, shared_images):
    path = shared_images / "dmg" / request.param
    data = path.read_bytes()
    return bz2.decompress(data) if request.param.endswith(".bz2") else data


@pytest.mark.parametrize("variant", ["plain", "map-outside", "data-0x200", "with-plist", "no-data"])
@pytest.mark.parametrize("cmd", [["info"], ["map", "--output=json"], ["convert", "-O", "raw", "@", "o.raw"]])
def test_dmg_resource_fork(tmp_path, qemu_img, source, variant, cmd):
    twin = Twin(tmp_path)
    img = build(source, variant)
    twin.each(lambda d: (d / "r.dmg").write_bytes(img))
    argv = [a if a != "@" else "r.dmg" for a in cmd] + ([] if "@" in cmd else ["r.dmg"])
    twin.both(*argv)
    if "o.raw" in cmd and (twin.q / "o.raw").exists():
        twin.same_file("o.raw")


def test_resource_fork_image_reads_as_its_plist_twin(tmp_path, qemu_img, source):
    """The same blkx table read from the plist and from the resource fork: the same bytes."""
    (tmp_path / "p.dmg").write_bytes(source)
    (tmp_path / "r.dmg").write_bytes(build(source, "plain"))
    twin = Twin(tmp_path / "t")
    for name in ("p.dmg", "r.dmg"):
        shutil.copy(tmp_path / name, twin.i / name)
    assert twin.qimg("convert", "-O", "raw", "p.dmg", "p.raw")[0] == 0
    assert twin.qimg("convert", "-O", "raw", "r.dmg", "r.raw")[0] == 0
    assert (twin.i / "p.raw").read_bytes() == (twin.i / "r.raw").read_bytes()
