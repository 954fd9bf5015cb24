"""Images for the inspect tests: made with qemu-img, or crafted (hostile) from one by editing bytes."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from tests.conftest import qemu


def qcow2(path, size="1M", *opts, backing=None, backing_fmt=None) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-u", "-b", backing] + (["-F", backing_fmt] if backing_fmt else [])
    qemu(*args, path, size)
    return Path(path)


def create(path, fmt, size="1M", *opts) -> Path:
    args = ["create", "-q", "-f", fmt]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu(*args, path, size)
    return Path(path)


def patch(path, offset: int, data: bytes) -> Path:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return Path(path)


def set_backing_name(path, name: bytes) -> Path:
    """Point a qcow2's backing name (header offset 8/16) at ``name``, written at offset 0x1000 of the
    header cluster (qemu-img leaves that area free in a 64 KiB cluster)."""
    patch(path, 0x1000, name)
    return patch(path, 8, struct.pack(">QI", 0x1000, len(name)))


def with_iso_descriptor(path) -> Path:
    """An ISO 9660 primary volume descriptor at 32 KiB (a qcow2 header cluster of 64 KiB holds it)."""
    return patch(path, 0x8000, b"\x01CD001\x01")


def vhd_footer(size: int) -> bytes:
    """A valid fixed-VHD footer for a disk of ``size`` bytes (what a hostile writer appends)."""
    f = bytearray(512)
    f[0:8] = b"conectix"
    struct.pack_into(">IIQI4sI4sQQ", f, 8, 2, 0x10000, 0xFFFFFFFFFFFFFFFF, 0, b"qimg", 0x10000, b"Wi2k",
                     size, size)
    struct.pack_into(">HBB", f, 56, 1024, 16, 63)  # geometry
    struct.pack_into(">I", f, 60, 2)  # fixed disk
    struct.pack_into(">I", f, 64, (~sum(f)) & 0xFFFFFFFF)
    return bytes(f)


def append(path, data: bytes) -> Path:
    with open(path, "ab") as f:
        f.write(data)
    return Path(path)


def vmdk_descriptor(path, extents: list[str], create_type="monolithicFlat", parent: str | None = None) -> Path:
    lines = ["# Disk DescriptorFile", "version=1", "CID=12345678",
             f"parentCID={'87654321' if parent else 'ffffffff'}", f'createType="{create_type}"']
    if parent:
        lines.append(f'parentFileNameHint="{parent}"')
    lines += ["", "# Extent description"] + extents + ["", "# The Disk Data Base", "#DDB", "",
                                                         'ddb.virtualHWVersion = "4"', 'ddb.adapterType = "ide"']
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def fifo(path) -> Path:
    os.mkfifo(path)
    return Path(path)
