"""VMDK text descriptors: parse and write.

References:
    VMware, "Virtual Disk Format 1.1" (VMDK spec), section "The Descriptor File":
    header (version, CID, parentCID, createType, parentFileNameHint), extent
    descriptions ("RW 4192256 SPARSE "test-s001.vmdk"", access / size in sectors /
    type / filename / offset for flat extents) and the disk database (ddb.*).
    VMware, "Virtual Disk Format 5.0", section "Stream-Optimized Compressed Sparse Extents".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...core.driver import c_string
from ...errors import CorruptImage, check_limit

#: descriptor text read at most (qemu reads the first MiB of a descriptor file)
MAX_DESCRIPTOR_BYTES = (1 << 20) - 1
#: extents in one descriptor
MAX_EXTENTS = 1 << 16
#: createType values whose descriptor lists the extents
DESCRIPTOR_TYPES = ("monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse",
                    "twoGbMaxExtentFlat")
EXTENT_TYPES = ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE", "ZERO")
CID_NONE = 0xFFFFFFFF

_EXTENT_RE = re.compile(r'^(\S{1,10})\s+(-?\d+)\s+(\S{1,10})(?:\s+"([^"\r\n]*)"(?:\s+(-?\d+))?)?')


@dataclass
class ExtentLine:
    """One extent description line."""

    access: str
    sectors: int
    type: str
    filename: str | None
    offset_sectors: int = 0
    line: str = ""


@dataclass
class Descriptor:
    """The parsed fields qemu and VMware use."""

    text: str
    version: int = 1
    cid: int = CID_NONE
    parent_cid: int = CID_NONE
    create_type: str | None = None
    parent_hint: str | None = None
    extents: list[ExtentLine] = field(default_factory=list)
    ddb: dict = field(default_factory=dict)


def looks_like_descriptor(head: bytes) -> bool:
    """The probe rule: the first line that is neither a comment nor blank is ``version=N``."""
    i, n = 0, len(head)
    while i < n:
        c = head[i:i + 1]
        if c == b"#":
            j = head.find(b"\n", i)
            if j < 0:
                return False
            i = j + 1
            continue
        if c in (b" ", b"\t", b"\n", b"\r"):
            i += 1
            continue
        rest = head[i:i + 11]
        for v in (b"1", b"2", b"3"):
            if rest.startswith(b"version=" + v + b"\n") or rest.startswith(b"version=" + v + b"\r\n"):
                return True
        return False
    return False


def _value(text: str, name: str) -> str | None:
    """The value of ``name=value`` or ``name = "value"`` (first occurrence at a line start)."""
    m = re.search(r'^[ \t]*' + re.escape(name) + r'[ \t]*=[ \t]*("([^"\r\n]*)"|([^\r\n]*))', text, re.M)
    if m is None:
        return None
    return m.group(2) if m.group(2) is not None else m.group(3).strip()


def _hex32(value: str | None, default: int) -> int:
    if value is None:
        return default
    m = re.match(r"\s*(?:0[xX])?([0-9a-fA-F]+)", value)
    if m is None:
        return default
    return int(m.group(1)[-8:], 16)


def parse(raw: bytes, extents_required: bool) -> Descriptor:
    """Parse descriptor text; ``extents_required`` for stand-alone descriptor files."""
    text = c_string(raw)
    d = Descriptor(text)
    ver = _value(text, "version")
    if ver is not None and ver.strip().isdigit():
        d.version = int(ver.strip())
    d.cid = _hex32(_value(text, "CID"), CID_NONE)
    d.parent_cid = _hex32(_value(text, "parentCID"), CID_NONE)
    d.create_type = _value(text, "createType")
    hint = _value(text, "parentFileNameHint")
    d.parent_hint = hint if hint else None
    for m in re.finditer(r'^[ \t]*(ddb\.[\w.]+)[ \t]*=[ \t]*"?([^"\r\n]*)"?', text, re.M):
        d.ddb[m.group(1)] = m.group(2)
    if not extents_required:
        return d
    if d.create_type is None:
        raise CorruptImage("invalid VMDK image descriptor")
    if d.create_type not in DESCRIPTOR_TYPES:
        shown = "".join(ch if ch.isprintable() else "?" for ch in d.create_type)  # keep the error one line
        raise CorruptImage(f"Unsupported image type '{shown}'")
    for line in text.splitlines():
        s = line.strip()
        if not s.startswith(("RW", "RDONLY", "NOACCESS")):
            continue
        m = _EXTENT_RE.match(s)
        if m is None or m.group(4) is None:
            continue
        access, sectors, etype, fname, off = m.groups()
        if access != "RW":
            continue  # qemu opens only read-write extents of a descriptor file
        if etype == "FLAT":
            if off is None:
                raise CorruptImage(f"Invalid extent line: {s}")
        elif off is not None:
            raise CorruptImage(f"Invalid extent line: {s}")
        if etype not in EXTENT_TYPES:
            raise CorruptImage(f"Invalid extent line: {s}")
        sectors = int(sectors)
        if sectors <= 0:
            continue
        check_limit("extent size in sectors", sectors, 1 << 50, "descriptor")
        offset = int(off) if off is not None else 0
        check_limit("flat extent offset in sectors", offset, 1 << 50, "descriptor")
        d.extents.append(ExtentLine(access, sectors, etype, fname, offset, s))
        check_limit("extents", len(d.extents), MAX_EXTENTS, "descriptor")
    if not d.extents:
        raise CorruptImage("no usable extent in the VMDK descriptor")
    return d


def geometry(size: int, adapter: str) -> tuple[int, int, int]:
    """CHS as qemu writes it: 16 heads and 63 sectors (255 for SCSI adapters)."""
    heads = 255 if adapter in ("lsilogic", "buslogic", "legacyESX") else 16
    sectors = 63
    return size // 512 // (heads * sectors), heads, sectors


def build(cid: int, parent_cid: int, create_type: str, extent_lines: list[str], size: int, adapter: str,
          hwversion: str, toolsversion: str, parent_hint: str | None = None, stream_style: bool = False,
          long_cid: str | None = None) -> str:
    """Descriptor text in qemu-img's layout (or ovftool's ddb set for stream-optimized disks)."""
    cyl, heads, secs = geometry(size, adapter)
    lines = ["# Disk DescriptorFile", "version=1"]
    if stream_style:
        lines.append('encoding="UTF-8"')  # VMware's exporters declare it; some importers insist
    lines += ["CID=%x" % cid, "parentCID=%x" % parent_cid, f'createType="{create_type}"']
    # qemu-img puts the parent hint where the blank line would be
    lines.append(f'parentFileNameHint="{parent_hint}"' if parent_hint else "")
    lines += ["# Extent description", *extent_lines, "", "# The Disk Data Base", "#DDB", ""]
    if stream_style:
        # the disk database as VMware's exporters write it: sorted keys, long content ID, tools info
        ddb = {
            "ddb.adapterType": adapter,
            "ddb.geometry.cylinders": str(cyl),
            "ddb.geometry.heads": str(heads),
            "ddb.geometry.sectors": str(secs),
            "ddb.longContentID": long_cid or "%032x" % 0,
            "ddb.toolsInstallType": "4",
            "ddb.toolsVersion": toolsversion,
            "ddb.virtualHWVersion": hwversion,
        }
        lines += [f'{k} = "{v}"' for k, v in sorted(ddb.items())]
    else:
        lines += [f'ddb.virtualHWVersion = "{hwversion}"',
                  f'ddb.geometry.cylinders = "{cyl}"',
                  f'ddb.geometry.heads = "{heads}"',
                  f'ddb.geometry.sectors = "{secs}"',
                  f'ddb.adapterType = "{adapter}"',
                  f'ddb.toolsVersion = "{toolsversion}"']
    return "\n".join(lines) + "\n"
