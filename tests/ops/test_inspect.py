"""inspect: signatures and polyglots, feature flags, references judged by the untrusted rule, findings,
bytes read (a counting store, not timing)."""

from __future__ import annotations

import json
import os
import struct

import pytest

from qimg.ops.inspect import FINDINGS, InspectFailed, inspect
from tests.conftest import qemu, qemu_create_pbkdf
from tests.ops import inspect_images as im


def ids(res) -> list[str]:
    return [f.id for f in res.findings]


def test_plain_qcow2_is_safe(oracle, tmp_path):
    res = inspect(str(im.qcow2(tmp_path / "a.qcow2", "64M")))
    assert (res.format, res.candidates, res.virtual_size, res.safe, res.references, ids(res)) == (
        "qcow2", ["qcow2"], 64 << 20, True, [], [])
    assert res.features["compression-type"] == "zlib"
    assert res.features["encryption"] == "none"
    assert res.features["extended-l2"] is False
    assert res.exit_code == 0


def test_10g_qcow2_reads_under_1mib(oracle, tmp_path):
    """The target: a 10 GiB qcow2 (with data, so L1/L2/refcounts exist) is judged from under 1 MiB of reads."""
    path = im.qcow2(tmp_path / "big.qcow2", "10G")
    qemu_io = ["qemu-io", "-f", "qcow2"]
    for off in ("0", "5G", "9G"):
        qemu_io += ["-c", f"write -P 0x11 {off} 1M"]
    import subprocess

    subprocess.run(qemu_io + [str(path)], check=True, capture_output=True)
    res = inspect(str(path))
    assert res.safe and res.virtual_size == 10 << 30
    assert 0 < res.bytes_read < (1 << 20)


def test_feature_flags_extended_l2_zstd(oracle, tmp_path):
    res = inspect(str(im.qcow2(tmp_path / "x.qcow2", "1M", "extended_l2=on", "cluster_size=64k",
                               "compression_type=zstd")))
    assert res.safe
    assert res.features["extended-l2"] is True
    assert res.features["compression-type"] == "zstd"
    assert set(res.features["incompatible-features"]) == {"compression type", "extended L2 entries"}


def test_unknown_incompatible_bit(oracle, tmp_path):
    path = im.qcow2(tmp_path / "x.qcow2")
    im.patch(path, 72, struct.pack(">Q", 1 << 40))
    res = inspect(str(path))
    assert "unknown-features" in ids(res) and not res.safe
    assert res.features["unknown-incompatible-bits"] == 1 << 40
    assert "unknown bit 40" in res.features["incompatible-features"]


def test_corrupt_bit(oracle, tmp_path):
    path = im.qcow2(tmp_path / "x.qcow2")
    im.patch(path, 72, struct.pack(">Q", 2))
    res = inspect(str(path))
    assert ids(res) == ["corrupt-flag"]


def test_encrypted_qcow2_reports_luks(oracle, tmp_path):
    path = tmp_path / "e.qcow2"
    qemu_create_pbkdf("-q", "--object", "secret,id=s0,data=k", "-f", "qcow2", "-o",
         "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", path, "1M")
    res = inspect(str(path))
    assert res.features["encryption"] == "luks" and res.features.get("encrypted") is True
    assert res.safe


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.raw", "json:{\"file.filename\":\"/etc/passwd\"}",
                                  "nbd://127.0.0.1:10809/x", "http://example.com/x.img"])
def test_backing_outside_is_refused(oracle, tmp_path, name):
    (tmp_path / "outside.raw").write_bytes(b"\0" * 512)
    sub = tmp_path / "in"
    sub.mkdir()
    path = im.qcow2(sub / "top.qcow2")
    im.set_backing_name(path, name.encode())
    res = inspect(str(path))
    assert ids(res) == ["reference-refused"]
    (ref,) = res.references
    assert (ref.kind, ref.name, ref.allowed) == ("backing file", name, False)
    assert res.exit_code == 1


def test_symlink_escape_is_refused(oracle, tmp_path):
    outside = tmp_path / "secret.qcow2"
    im.qcow2(outside)
    sub = tmp_path / "in"
    sub.mkdir()
    os.symlink(outside, sub / "base.qcow2")
    path = im.qcow2(sub / "top.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    res = inspect(str(path))
    (ref,) = res.references
    assert (ref.allowed, ids(res)) == (False, ["reference-refused"])
    assert ref.reason == f"symlink leads outside the allowed folders (to '{outside}')"
    # the same folder given with --allow-dir makes it allowed
    res = inspect(str(path), allow_dirs=[str(tmp_path)])
    assert res.safe and res.references[0].allowed


def test_backing_inside_folder_is_allowed_and_followed(oracle, tmp_path):
    im.qcow2(tmp_path / "base2.qcow2", backing="/etc/hostname", backing_fmt="raw")
    im.qcow2(tmp_path / "base.qcow2", backing="base2.qcow2", backing_fmt="qcow2")
    top = im.qcow2(tmp_path / "top.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    res = inspect(str(top))
    assert [(r.kind, r.name, r.allowed) for r in res.references] == [
        ("backing file", "base.qcow2", True), ("backing file", "base2.qcow2", True),
        ("backing file", "/etc/hostname", False)]
    assert ids(res) == ["reference-refused"]


def test_backing_without_format_probed_raw_is_refused(oracle, tmp_path):
    (tmp_path / "base.img").write_bytes(b"\0" * 65536)
    top = im.set_backing_name(im.qcow2(tmp_path / "top.qcow2"), b"base.img")  # no backing format recorded
    res = inspect(str(top))
    assert ids(res) == ["reference-refused"] and "probed as raw" in res.findings[0].message


def test_missing_backing(oracle, tmp_path):
    top = im.qcow2(tmp_path / "top.qcow2", backing="gone.qcow2", backing_fmt="qcow2")
    res = inspect(str(top))
    assert ids(res) == ["reference-missing"] and res.references[0].allowed


def test_backing_fifo_does_not_block(oracle, tmp_path):
    im.fifo(tmp_path / "pipe")
    top = im.qcow2(tmp_path / "top.qcow2", backing="pipe", backing_fmt="raw")
    res = inspect(str(top))
    assert ids(res) == ["reference-refused"] and "FIFOs are not allowed" in res.findings[0].message


def test_backing_loop_and_depth(oracle, tmp_path):
    im.qcow2(tmp_path / "a.qcow2", backing="b.qcow2", backing_fmt="qcow2")
    im.qcow2(tmp_path / "b.qcow2", backing="a.qcow2", backing_fmt="qcow2")
    assert ids(inspect(str(tmp_path / "a.qcow2"))) == ["chain-loop"]
    deep = tmp_path / "deep"
    deep.mkdir()
    im.qcow2(deep / "l0.qcow2")
    for i in range(1, 19):
        im.qcow2(deep / f"l{i}.qcow2", backing=f"l{i - 1}.qcow2", backing_fmt="qcow2")
    assert ids(inspect(str(deep / "l18.qcow2"))) == ["chain-too-deep"]
    assert inspect(str(deep / "l16.qcow2")).safe


def test_data_file_outside(oracle, tmp_path):
    sub = tmp_path / "in"
    sub.mkdir()
    qemu("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", sub / "x.qcow2", "1M")
    res = inspect(str(sub / "x.qcow2"))
    assert [(r.kind, r.allowed) for r in res.references] == [("data file", False)]
    assert ids(res) == ["reference-refused"]
    assert "external data file" in res.features["incompatible-features"]


def test_vmdk_extent_outside(oracle, tmp_path):
    sub = tmp_path / "in"
    sub.mkdir()
    (tmp_path / "secret").write_bytes(b"s" * 1024 * 1024)
    (sub / "ok.raw").write_bytes(bytes(1 << 20))
    path = im.vmdk_descriptor(sub / "d.vmdk", [f'RW 2048 FLAT "{tmp_path / "secret"}" 0', 'RW 2048 FLAT "ok.raw" 0',
                                               'RW 2048 FLAT "../secret" 0'])
    res = inspect(str(path))
    # every extent is listed, not only the first one refused
    assert [(r.kind, r.name, r.allowed) for r in res.references] == [
        ("extent", str(tmp_path / "secret"), False), ("extent", "ok.raw", True), ("extent", "../secret", False)]
    assert ids(res) == ["reference-refused", "reference-refused"]


def test_vmdk_extent_inside(oracle, tmp_path):
    create(tmp_path / "d.vmdk", "vmdk", "1M", "subformat=monolithicFlat")
    res = inspect(str(tmp_path / "d.vmdk"))
    assert res.safe and res.features["create-type"] == "monolithicFlat"
    assert [(r.kind, r.name, r.allowed) for r in res.references] == [("extent", "d-flat.vmdk", True)]
    assert res.virtual_size == 1 << 20


def create(path, fmt, size, *opts):
    return im.create(path, fmt, size, *opts)


def test_polyglot_qcow2_over_iso(oracle, tmp_path):
    path = im.with_iso_descriptor(im.qcow2(tmp_path / "x.qcow2"))
    res = inspect(str(path))
    assert res.candidates == ["qcow2", "iso"] and ids(res) == ["polyglot"]


def test_polyglot_qcow2_with_vhd_footer(oracle, tmp_path):
    path = im.append(im.qcow2(tmp_path / "x.qcow2"), im.vhd_footer(1 << 20))
    res = inspect(str(path))
    assert res.candidates == ["qcow2", "vpc"] and ids(res) == ["polyglot"] and res.format == "qcow2"


def test_fixed_vhd_is_vpc_not_polyglot(oracle, tmp_path):
    path = create(tmp_path / "f.vhd", "vpc", "1M", "subformat=fixed")
    size = json.loads(qemu("info", "-f", "vpc", "--output=json", path).out)["virtual-size"]
    res = inspect(str(path))
    assert (res.format, res.candidates, res.virtual_size, res.safe) == ("vpc", ["vpc"], size, True)


def test_raw_layouts_are_not_polyglots(tmp_path):
    disk = bytearray(64 << 10)
    disk[446:462] = bytes([0x00, 0, 2, 0, 0xEE, 0, 0, 0]) + struct.pack("<II", 1, 127)
    disk[510:512] = b"\x55\xaa"
    disk[512:520] = b"EFI PART"
    disk[0x8000:0x8006] = b"\x01CD001"
    path = tmp_path / "hybrid.iso"
    path.write_bytes(bytes(disk))
    res = inspect(str(path))
    assert (res.format, res.candidates, res.safe) == ("raw", ["mbr", "gpt", "iso"], True)


def test_format_mismatch_and_allowed_formats(oracle, tmp_path):
    path = str(im.qcow2(tmp_path / "x.qcow2"))
    assert ids(inspect(path, fmt="raw")) == ["format-mismatch"]
    assert ids(inspect(path, fmt="vmdk")) == ["format-mismatch", "invalid-image"]
    assert ids(inspect(path, allowed_formats=["raw", "vmdk"])) == ["format-not-allowed"]
    assert inspect(path, allowed_formats=["qcow2"]).safe


def test_truncated_qcow2_is_invalid(oracle, tmp_path):
    path = im.qcow2(tmp_path / "x.qcow2")
    im.patch(path, 40, struct.pack(">Q", 1 << 50))  # L1 table far past the end of the file
    res = inspect(str(path))
    assert "invalid-image" in ids(res)


def test_could_not_inspect(tmp_path):
    with pytest.raises(InspectFailed) as e:
        inspect(str(tmp_path / "missing"))
    assert e.value.exit_code == 2
    with pytest.raises(InspectFailed):
        inspect(str(tmp_path), fmt="nosuch")


def test_finding_ids_are_documented():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    for fid in FINDINGS:
        assert f"`{fid}`" in readme, fid
