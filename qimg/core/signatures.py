"""Every signature a file carries, not just the best one: what ``inspect`` needs to see a polyglot.

``registry.probe`` answers "which driver opens this file" the way qemu-img does (the first bytes,
best score wins).  An ingestion gate needs more: a file that is a valid qcow2 *and* a valid VHD (a
footer at its end), or a qcow2 header over an ISO 9660 volume, is read differently by different
readers, and that difference is the attack.  ``scan`` reports every match:

- image formats whose header is at offset 0, by each driver's own probe (qcow2, vmdk, vdi, ...);
- trailers: a VHD footer in the last 512 bytes (a fixed VHD has no header: qemu-img probes it as
  raw) and a DMG "koly" block there (qemu probes dmg by file name only);
- raw layouts: an MBR boot signature with plausible partition entries, a GPT header at LBA 1 and an
  ISO 9660 / UDF volume descriptor at 32 KiB.  These are ways a *raw* disk is laid out: several of
  them together (a hybrid ISO) are ordinary, but any of them next to an image header is a polyglot.

References: the VHD specification ("Hard Disk Footer Format"), Apple's UDIF trailer ("koly"), the UEFI
specification 2.10 section 5 (GPT and the protective MBR), ECMA-119 section 8 (volume descriptors at
logical sector 16) and ECMA-167 (UDF's NSR02/NSR03 descriptors).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import registry

#: the head ``scan`` looks at: the ISO 9660 primary volume descriptor ends at 34 KiB
HEAD_BYTES = 0x8800
#: the tail ``scan`` looks at (VHD footer, DMG trailer)
TAIL_BYTES = 512

ISO_OFFSET = 0x8000
ISO_IDS = (b"CD001", b"BEA01", b"NSR02", b"NSR03")
GPT_OFFSET = 512
GPT_SIGNATURE = b"EFI PART"
MBR_SIGNATURE_OFFSET = 510
MBR_PARTITIONS_OFFSET = 446
VHD_COOKIE = b"conectix"
DMG_TRAILER = b"koly"

#: kinds of match
IMAGE, TRAILER, LAYOUT = "image", "trailer", "layout"


@dataclass(frozen=True)
class Match:
    """One signature found: the format (or raw layout) name, where, and what kind of mark it is."""

    name: str
    offset: int
    kind: str

    def to_dict(self) -> dict:
        return {"name": self.name, "offset": self.offset, "kind": self.kind}


def _image_headers(head: bytes, filename: str) -> list[Match]:
    """Formats whose header is at offset 0, asked through each driver's probe (raw and dmg excluded:
    raw matches everything, dmg is recognised by its trailer)."""
    out = []
    window = head[:registry.PROBE_BYTES]
    hints = getattr(registry, "_MAGIC_HINTS", {})
    for name in registry.FORMATS:
        if name in ("raw", "file", "dmg"):
            continue
        hint = hints.get(name)
        if hint is not None and not hint(window, ""):
            continue
        try:
            cls = registry.get_driver(name)
        except Exception:  # a driver module that is missing is no signature
            continue
        if cls.probe(window, "") > 1:
            out.append(Match(name, 0, IMAGE))
    return out


def _mbr(head: bytes) -> bool:
    """A boot signature with four sane partition entries, at least one used (a FAT boot sector,
    which also ends in 55 AA, has no partition table: its BIOS parameter block says 2 FATs on a
    fixed disk)."""
    if head[MBR_SIGNATURE_OFFSET:MBR_SIGNATURE_OFFSET + 2] != b"\x55\xaa":
        return False
    if head[0x10] == 2 and head[0x15] == 0xF8:
        return False
    used = 0
    for i in range(4):
        entry = head[MBR_PARTITIONS_OFFSET + 16 * i:MBR_PARTITIONS_OFFSET + 16 * (i + 1)]
        boot, ptype = entry[0], entry[4]
        if boot not in (0x00, 0x80):
            return False
        used += ptype != 0
    return used > 0


def _layouts(head: bytes) -> list[Match]:
    out = []
    if len(head) >= 512 and _mbr(head):
        out.append(Match("mbr", MBR_SIGNATURE_OFFSET, LAYOUT))
    if head[GPT_OFFSET:GPT_OFFSET + 8] == GPT_SIGNATURE:
        out.append(Match("gpt", GPT_OFFSET, LAYOUT))
    # ECMA-119: volume descriptors from sector 16 (2 KiB sectors), type byte then the identifier
    for sector in range(ISO_OFFSET, min(len(head), HEAD_BYTES) - 6, 2048):
        if head[sector + 1:sector + 6] in ISO_IDS:
            out.append(Match("iso", sector, LAYOUT))
            break
    return out


def _trailers(tail: bytes, file_size: int) -> list[Match]:
    out = []
    if len(tail) >= TAIL_BYTES and file_size >= TAIL_BYTES:
        footer = tail[-TAIL_BYTES:]
        at = file_size - TAIL_BYTES
        if footer[:8] == VHD_COOKIE:
            # the footer's own checksum (one's complement of the byte sum without the field) guards
            # against eight stray bytes of guest data
            (stored,) = struct.unpack_from(">I", footer, 64)
            if (~(sum(footer[:64]) + sum(footer[68:])) & 0xFFFFFFFF) == stored:
                out.append(Match("vpc", at, TRAILER))
        if footer[:4] == DMG_TRAILER and struct.unpack_from(">I", footer, 4)[0] == 4:  # UDIF version 4
            out.append(Match("dmg", at, TRAILER))
    return out


def scan(head: bytes, tail: bytes | None, file_size: int | None, filename: str = "") -> list[Match]:
    """Every signature in ``head`` (the first bytes) and ``tail`` (the last bytes of a file of
    ``file_size`` bytes; None when unknown): image headers first, then trailers, then raw layouts."""
    matches = _image_headers(head, filename)
    if tail is not None and file_size is not None:
        matches += _trailers(tail, file_size)
    matches += _layouts(head)
    return matches


def candidates(matches: list[Match]) -> list[str]:
    """The format names matched, each once, in scan order; ``["raw"]`` when nothing matched."""
    names: list[str] = []
    for m in matches:
        if m.name not in names:
            names.append(m.name)
    return names or ["raw"]


def is_polyglot(matches: list[Match]) -> bool:
    """More than one image format, or an image header over a raw layout (a trailer format is raw
    data plus a footer, so a raw layout under it is ordinary)."""
    formats = {m.name for m in matches if m.kind in (IMAGE, TRAILER)}
    headers = [m for m in matches if m.kind == IMAGE]
    layouts = [m for m in matches if m.kind == LAYOUT]
    return len(formats) > 1 or bool(headers and layouts)
