"""inspect checked against OpenStack's oslo.utils format_inspector on the same images.

Every image is judged by both (oslo: ``detect_file_format``, ``safety_check``, ``virtual_size``).
Each case names the class of disagreement it is expected to show (None: they agree), and the test
asserts that exactly the fields of that class differ, so a new disagreement fails here until it is
understood and listed in the README table ("Inspecting untrusted images"), which the last test
checks too.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess

import pytest

from qimg.ops.inspect import inspect
from tests.conftest import decompress_to, qemu, qemu_create_pbkdf
from tests.ops import inspect_images as im

fi = pytest.importorskip("oslo_utils.imageutils.format_inspector")

#: class of disagreement -> the fields that differ (format, safe, virtual-size)
CLASSES = {
    "layout-names": {"format"},           # oslo names raw disks by their layout (gpt, iso); qimg says raw
    "formats-oslo-lacks": {"format"},     # bochs, cloop, dmg, parallels: oslo reads raw (size: what it read)
    "qcow-v1": {"format", "safe"},        # oslo takes qcow v1 for an unsupported qcow2
    "qed": {"safe"},                      # oslo bans qed outright
    "confined-references": {"safe"},      # references inside the image's folder: qimg allows, oslo refuses
    "vmdk-subformats": {"safe"},          # oslo knows monolithicSparse/streamOptimized only
    "vmdk-descriptor-as-raw": {"format"},  # a descriptor padded with NULs (as qemu rewrites it): oslo sees raw
    "vmdk-descriptor-as-raw-escape": {"format", "safe"},  # ... and so misses an extent outside the folder
    "extended-l2": {"safe"},              # oslo refuses incompatible bit 4 as unknown
    "trailer-polyglot": {"safe"},         # a VHD footer at the end of another format: qimg sees two formats
    "fixed-vhd": {"format"},              # oslo misses a fixed VHD (footer at the end only): raw or gpt
    "structure-checked": {"safe"},        # the header is fine, the structure is not: qimg opens it
    "corrupt-flag": {"safe"},             # qcow2 marked corrupt by qemu
    "vhd-size-rule": {"virtual-size"},    # VHD size from CHS for creator 'vpc ', as qemu-img
    "luks-payload": {"virtual-size"},     # oslo counts the bytes it read minus the payload offset
}

#: oslo's names for qimg's formats
OSLO_NAMES = {"vhd": "vpc"}
#: oslo's answers for a raw disk: its virtual size is the bytes it read before deciding (or an ISO's
#: volume size), so sizes are compared only for image formats
OSLO_RAW = {"raw", "gpt", "iso"}


def oslo_view(path) -> dict:
    try:
        insp = fi.detect_file_format(str(path))
    except fi.ImageFormatError:
        return {"format": "multiple", "safe": False, "virtual-size": None}
    try:
        insp.safety_check()
        safe = True
    except (fi.SafetyCheckFailed, fi.ImageFormatError):
        safe = False
    return {"format": OSLO_NAMES.get(str(insp), str(insp)), "safe": safe, "virtual-size": insp.virtual_size}


def qimg_view(path) -> dict:
    res = inspect(str(path))
    return {"format": res.format, "safe": res.safe, "virtual-size": res.virtual_size}


def differing(q: dict, o: dict) -> set[str]:
    """The fields that differ; the format only when oslo settled on one, the size only for images both
    call safe (an unsafe image's size is no answer)."""
    out = set()
    if o["format"] != "multiple" and q["format"] != o["format"]:
        out.add("format")
    if q["safe"] != o["safe"]:
        out.add("safe")
    if q["safe"] and o["safe"] and o["format"] not in OSLO_RAW and q["virtual-size"] != o["virtual-size"]:
        out.add("virtual-size")
    return out


def assert_class(path, expected: str | None):
    q, o = qimg_view(path), oslo_view(path)
    got = differing(q, o)
    want = CLASSES[expected] if expected else set()
    assert got == want, f"{path}: qimg {q}, oslo {o}; expected class {expected}"
    return q, o


# ------------------------------------------------------------------------------------ the shared corpus
CORPUS = {
    "bochs/empty.bochs.bz2": "formats-oslo-lacks",
    "cloop/simple-pattern.cloop.bz2": "formats-oslo-lacks",
    "dmg/simple-dmg.dmg.bz2": "formats-oslo-lacks",
    "dmg/hfsplus_zlib.dmg": "formats-oslo-lacks",
    "parallels/parallels-v1.bz2": "formats-oslo-lacks",
    "parallels/parallels-v2.bz2": "formats-oslo-lacks",
    "parallels/parallels-with-bitmap.bz2": "formats-oslo-lacks",
    "parallels/fake.parallels.bz2": "formats-oslo-lacks",
    "raw/grub_mbr.raw.bz2": "layout-names",
    "vhdx/iotest-dynamic-1G.vhdx.bz2": None,
    "vhdx/iotest-dirtylog-10G-4M.vhdx.bz2": "structure-checked",
    "vhdx/test-disk2vhd.vhdx.bz2": None,
    "vhdx/vhdx-log-replay.vhdx.gz": "structure-checked",
    "vhdx/fixed.vhdx.gz": None,
    "vhdx/dynamic.vhdx.gz": None,
    "vhdx/btrfs.vhdx.gz": None,
    "vhdx/swap.vhdx.gz": None,
    "vhdx/xfs5.vhdx.gz": None,
    "vmdk/iotest-version3.vmdk.bz2": None,
    "vmdk/afl9.vmdk.bz2": None,
    "vmdk/image.vmdk": None,
    "vmdk/sesparse-esxi/sesparse-descriptor.vmdk": "vmdk-subformats",
    "vpc/hyperv2012r2-dynamic.vhd.bz2": None,
    "vpc/virtualpc-dynamic.vhd.bz2": "vhd-size-rule",
    "vpc/d2v-zerofilled.vhd.bz2": None,
    "vpc/afl5.img.bz2": "structure-checked",
    "vpc/fixed.vhd.gz": "fixed-vhd",
    "vpc/dynamic.vhd.gz": None,
    "vpc/image.vhd": None,
    "vpc/fat-differential.vhd": None,
    "vdi/basic.vdi.gz": None,
    "vdi/wheatos-disk.vdi": None,
    "vdi/lumiere-disk.vdi": None,
    "qcow2/basic.qcow2.gz": None,
    "qcow2/basic-zstd.qcow2.gz": None,
    "qcow2/snapshot.qcow2.gz": None,
    "qcow2/backing-chain-1.qcow2.gz": "confined-references",
    "qcow2/backing-chain-2.qcow2.gz": "confined-references",
    "qcow2/backing-chain-3.qcow2.gz": None,
    "qcow2/data-file.qcow2.gz": "confined-references",
    "qcow2/image.qcow2": None,
    "qcow2/vsstest.qcow2": None,
    "luks/compatimage.img.xz": "luks-payload",
    "parallels/split.hdd/split.hdd.5.{5fbaabe3-6958-40ff-92a7-860e329aab41}.hds.gz": "formats-oslo-lacks",
}


@pytest.fixture(scope="module")
def corpus_dir(shared_images, tmp_path_factory):
    """The corpus decompressed folder by folder (siblings beside each other, as the images name them)."""
    out = tmp_path_factory.mktemp("corpus")
    for key in CORPUS:
        src = shared_images / key
        for sib in src.parent.iterdir():
            if sib.is_file():
                decompress_to(sib, out / os.path.dirname(key))
    return out


def _decompressed(key: str) -> str:
    for ext in (".bz2", ".gz", ".xz"):
        if key.endswith(ext):
            return key[: -len(ext)]
    return key


def test_corpus_covers_every_image(expected_images):
    images = {k for k, v in expected_images["images"].items() if v.get("role") == "image" and v["format"] != "raw"}
    images |= {"raw/grub_mbr.raw.bz2"}
    # the bundle storages other than the last one of the split bundle add nothing new
    missing = {k for k in images - set(CORPUS) if "/expanding.hdd/" not in k and "/plain.hdd/" not in k
               and "/split.hdd/" not in k and "sesparse.vmdk" not in k}
    assert not missing


@pytest.mark.parametrize("key", sorted(CORPUS))
def test_corpus(corpus_dir, expected_images, key):
    q, _ = assert_class(corpus_dir / _decompressed(key), CORPUS[key])
    if q["safe"]:  # and the size is qemu-img's
        assert q["virtual-size"] == expected_images["images"][key]["virtual_size"]


# ------------------------------------------------------------------------- images made with qemu-img
GENERATED = [
    ("raw", (), None),
    ("qcow2", ("compat=0.10",), None),
    ("qcow2", ("compat=1.1", "lazy_refcounts=on"), None),
    ("qcow2", ("compression_type=zstd",), None),
    ("qcow2", ("extended_l2=on",), "extended-l2"),
    ("qcow", (), "qcow-v1"),
    ("qed", (), "qed"),
    ("vdi", (), None),
    ("vdi", ("static=on",), None),
    ("vpc", (), None),
    ("vpc", ("subformat=fixed",), "fixed-vhd"),
    ("vhdx", (), None),
    ("vmdk", (), None),
    ("vmdk", ("subformat=streamOptimized",), None),
    # written once by qemu-io, so qemu rewrote the descriptor (new CID) padded to 512 bytes with NULs
    ("vmdk", ("subformat=monolithicFlat",), "vmdk-descriptor-as-raw"),
    ("vmdk", ("subformat=twoGbMaxExtentSparse",), "vmdk-descriptor-as-raw"),
    ("parallels", (), "formats-oslo-lacks"),
]


def test_generated_vmdk_descriptor_as_written(oracle, tmp_path):
    """A descriptor file as qemu-img create writes it (text only): oslo knows it, and refuses the subformat."""
    path = im.create(tmp_path / "d.vmdk", "vmdk", "4M", "subformat=monolithicFlat")
    assert_class(path, "vmdk-subformats")


@pytest.mark.parametrize("fmt,opts,cls", GENERATED, ids=[f"{f}-{'-'.join(o) or 'default'}" for f, o, _ in GENERATED])
def test_generated(oracle, tmp_path, fmt, opts, cls):
    path = im.create(tmp_path / f"img.{fmt}", fmt, "4M", *opts)
    if fmt != "vmdk" or "subformat=streamOptimized" not in opts:
        subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x5a 1M 64k", str(path)], check=True,
                       capture_output=True)
    q, _ = assert_class(path, cls)
    if q["safe"]:
        assert q["virtual-size"] == json.loads(qemu("info", "-f", fmt, "--output=json", path).out)["virtual-size"]


def test_generated_luks(oracle, tmp_path):
    path = tmp_path / "x.luks"
    qemu_create_pbkdf("-q", "--object", "secret,id=s0,data=k", "-f", "luks", "-o", "key-secret=s0,iter-time=10",
         path, "4M")
    assert_class(path, "luks-payload")
    assert qimg_view(path)["virtual-size"] == 4 << 20


# --------------------------------------------------------------------------------------- hostile images
def _hostile(tmp_path, case):
    sub = tmp_path / "in"
    sub.mkdir()
    if case == "backing-absolute":
        return im.qcow2(sub / "x.qcow2", backing="/etc/passwd", backing_fmt="raw"), None
    if case == "backing-escape":
        (tmp_path / "x.raw").write_bytes(b"x" * 4096)
        return im.qcow2(sub / "x.qcow2", backing="../x.raw", backing_fmt="raw"), None
    if case == "data-file-outside":
        qemu("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.raw'}", sub / "x.qcow2", "1M")
        return sub / "x.qcow2", None
    if case == "vmdk-extent-absolute":
        return im.vmdk_descriptor(sub / "x.vmdk", ['RW 2048 FLAT "/etc/passwd" 0']), None
    if case == "vmdk-padded-extent-absolute":
        path = im.vmdk_descriptor(sub / "x.vmdk", ['RW 2048 FLAT "/etc/passwd" 0'], create_type="monolithicSparse")
        return im.append(path, bytes(512 - path.stat().st_size % 512)), "vmdk-descriptor-as-raw-escape"
    if case == "polyglot-iso":
        return im.with_iso_descriptor(im.qcow2(sub / "x.qcow2")), None
    if case == "polyglot-vhd-footer":
        return im.append(im.qcow2(sub / "x.qcow2"), im.vhd_footer(1 << 20)), "trailer-polyglot"
    if case == "unknown-incompatible":
        return im.patch(im.qcow2(sub / "x.qcow2"), 72, struct.pack(">Q", 1 << 33)), None
    if case == "corrupt-bit":
        return im.patch(im.qcow2(sub / "x.qcow2"), 72, struct.pack(">Q", 2)), "corrupt-flag"
    if case == "l1-past-eof":
        return im.patch(im.qcow2(sub / "x.qcow2"), 40, struct.pack(">Q", 1 << 50)), "structure-checked"
    if case == "huge-size":
        return im.patch(im.qcow2(sub / "x.qcow2"), 24, struct.pack(">Q", 1 << 62)), "structure-checked"
    if case == "backing-inside":
        im.qcow2(sub / "base.qcow2")
        return im.qcow2(sub / "x.qcow2", backing="base.qcow2", backing_fmt="qcow2"), "confined-references"
    if case == "iso":
        disk = bytearray(64 << 10)
        disk[0x8000:0x8006] = b"\x01CD001"
        (sub / "x.iso").write_bytes(bytes(disk))
        return sub / "x.iso", "layout-names"
    if case == "gpt":
        disk = bytearray(64 << 10)
        disk[446:462] = bytes([0x00, 0, 2, 0, 0xEE, 0, 0, 0]) + struct.pack("<II", 1, 127)
        disk[510:512] = b"\x55\xaa"
        disk[512:520] = b"EFI PART"
        (sub / "x.img").write_bytes(bytes(disk))
        return sub / "x.img", "layout-names"
    raise AssertionError(case)


HOSTILE = ["backing-absolute", "backing-escape", "data-file-outside", "vmdk-extent-absolute",
           "vmdk-padded-extent-absolute", "polyglot-iso",
           "polyglot-vhd-footer", "unknown-incompatible", "corrupt-bit", "l1-past-eof", "huge-size",
           "backing-inside", "iso", "gpt"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile(oracle, tmp_path, case):
    path, cls = _hostile(tmp_path, case)
    q, o = assert_class(path, cls)
    if case.startswith(("backing-a", "backing-e", "data-file", "vmdk-extent", "polyglot-iso", "unknown")):
        assert not q["safe"] and not o["safe"]
    if q["safe"] and o["format"] in OSLO_RAW:
        assert q["virtual-size"] == os.path.getsize(path)


def test_readme_lists_every_class():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    section = readme.split("## Inspecting untrusted images", 1)[-1]
    for cls in CLASSES:
        assert f"| `{cls}` |" in section, cls
