"""Creating VMDK images: every subformat qemu-img 7.2 writes, with its options.

References:
    VMware, "Virtual Disk Format 1.1" (descriptor layout, hosted sparse extent layout:
    header, embedded descriptor, redundant grain directory and tables, grain directory and
    tables, overhead rounded to a grain); "Virtual Disk Format 5.0" (stream-optimized
    layout).  Option names, defaults, file naming and messages follow qemu-img 7.2.
"""

from __future__ import annotations

import os
import re
import secrets

from ...errors import QimgError
from ...options import parse_bool
from . import descriptor as dsc
from . import sparse as sp

SECTOR = 512
GRAIN_SECTORS = 128
GTES_PER_GT = 512
SPLIT_SECTORS = 4194304  # 2 GiB per extent for the twoGbMaxExtent* subformats
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
              "streamOptimized")
ADAPTERS = ("ide", "lsilogic", "buslogic", "legacyESX")
PREALLOC = ("off", "falloc", "full")
#: the embedded descriptor area qemu-img reserves in a monolithic sparse file (sectors)
EMBEDDED_DESC_SECTORS = 20
#: the largest image VMware's formats describe (sectors as a 32-bit-safe GT range is not a limit)
MAX_SIZE = 1 << 50


def _opts(opts):
    o = opts.options
    adapter = o.get("adapter_type", "ide")
    subformat = o.get("subformat", "monolithicSparse")
    compat6 = parse_bool("compat6", o["compat6"]) if "compat6" in o else False
    zeroed = parse_bool("zeroed_grain", o["zeroed_grain"]) if "zeroed_grain" in o else False
    hw = o.get("hwversion", "undefined")
    tools = o.get("toolsversion", "2147483647")
    prealloc = o.get("preallocation", "off")
    return adapter, subformat, compat6, zeroed, hw, tools, prealloc


def format_line_options(opts) -> list[tuple[str, str]]:
    """The key=value pairs of "Formatting ..." in qemu-img's order."""
    o = opts.options
    adapter, subformat, compat6, zeroed, hw, tools, prealloc = _opts(opts)
    out = [("size", str(opts.size or 0))]
    if "adapter_type" in o:
        out.append(("adapter_type", adapter))
    if opts.backing_file:
        out.append(("backing_file", opts.backing_file))
    if opts.backing_fmt:
        out.append(("backing_fmt", opts.backing_fmt))
    out.append(("compat6", "on" if compat6 else "off"))
    out.append(("hwversion", hw))
    if "toolsversion" in o:
        out.append(("toolsversion", tools))
    if "subformat" in o:
        out.append(("subformat", subformat))
    if "zeroed_grain" in o:
        out.append(("zeroed_grain", "on" if zeroed else "off"))
    if "preallocation" in o:
        out.append(("preallocation", prealloc))
    return out


def _split(filename: str):
    """(directory, prefix, extension) as qemu-img names extent files: "a.vmdk" -> a-f001.vmdk."""
    d, base = os.path.split(filename)
    m = re.match(r"^\.(.+)\.[^.]{1,16}\.qimg-partial$", base)
    if m:
        base = m.group(1)  # a temporary name of convert: name the extents after the real target
    dot = base.rfind(".")
    if dot > 0:
        return d, base[:dot], base[dot:]
    return d, base, ""


def extent_names(filename: str, subformat: str, size: int) -> list[tuple[str, int]]:
    """(file name relative to the descriptor, sectors) of each extent file."""
    _d, prefix, ext = _split(filename)
    sectors = -(-size // SECTOR)
    if subformat not in ("monolithicSparse", "streamOptimized") and sectors == 0:
        return []  # qemu-img writes a descriptor without extents
    if subformat == "monolithicFlat":
        return [(f"{prefix}-flat{ext}", sectors)]
    if subformat in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        letter = "s" if subformat == "twoGbMaxExtentSparse" else "f"
        out = []
        i, left = 1, sectors
        while left > 0 or i == 1:
            n = min(left, SPLIT_SECTORS)
            out.append((f"{prefix}-{letter}{i:03d}{ext}", n))
            left -= n
            i += 1
            if left <= 0:
                break
        return out
    return [(prefix + ext, sectors)]


def created_files(filename: str, options: dict) -> list[str]:
    """The files a create/convert of this subformat made (for clean-up after a failure)."""
    files = [filename]
    subformat = options.get("subformat", "monolithicSparse")
    if subformat in ("monolithicSparse", "streamOptimized"):
        return files
    d = os.path.dirname(filename)
    try:
        from ...io.store import FileStore

        with FileStore(filename, lock=None) as store:  # the descriptor this create just wrote
            text = store.pread(0, dsc.MAX_DESCRIPTOR_BYTES)
        names = [line.filename for line in dsc.parse(text, True).extents if line.filename]
    except (OSError, QimgError):
        _d, prefix, ext = _split(filename)
        pat = re.compile(re.escape(prefix) + r"-(flat|[sf]\d{3})" + re.escape(ext) + "$")
        names = [n for n in os.listdir(d or ".") if pat.match(n)]
    for n in names:
        p = n if os.path.isabs(n) else os.path.join(d, n)
        if p not in files:
            files.append(p)
    return files


def _sparse_layout(sectors: int, embedded: bool):
    """qemu-img's hosted sparse layout: (header, rgd, gd, overhead, gt_count, gd_sectors) in sectors."""
    grains = -(-sectors // GRAIN_SECTORS)
    gt_count = -(-grains // GTES_PER_GT)
    gt_sectors = GTES_PER_GT * 4 // SECTOR
    gd_sectors = -(-gt_count * 4 // SECTOR)
    desc_offset, desc_size = 1, EMBEDDED_DESC_SECTORS  # reserved even in the extents of a split image
    rgd = 1 + desc_size
    gd = rgd + gd_sectors + gt_count * gt_sectors
    end = gd + gd_sectors + gt_count * gt_sectors
    overhead = -(-end // GRAIN_SECTORS) * GRAIN_SECTORS
    return desc_offset, desc_size, rgd, gd, overhead, gt_count, gd_sectors, gt_sectors


def write_sparse(store, sectors: int, zeroed: bool, desc_text: str | None) -> None:
    """A hosted sparse extent with preallocated (redundant) grain directories and tables."""
    import numpy as np

    desc_offset, desc_size, rgd, gd, overhead, gt_count, gd_sectors, gt_sectors = _sparse_layout(
        sectors, desc_text is not None)
    flags = sp.FLAG_NL_DETECT | sp.FLAG_RGD | (sp.FLAG_ZERO_GRAIN if zeroed else 0)
    h = sp.new_header(sectors, GRAIN_SECTORS, flags, 2 if zeroed else 1, desc_offset, desc_size, rgd, gd,
                      overhead, 0)
    buf = bytearray(overhead * SECTOR)
    buf[:SECTOR] = h.pack()
    if desc_text is not None:
        raw = desc_text.encode()
        if len(raw) > desc_size * SECTOR:
            raise QimgError("VMDK descriptor too long")
        buf[SECTOR:SECTOR + len(raw)] = raw
    for table in (rgd, gd):
        entries = table + gd_sectors + np.arange(gt_count, dtype=np.uint32) * gt_sectors
        buf[table * SECTOR:table * SECTOR + gt_count * 4] = entries.astype("<u4").tobytes()
    store.truncate(0)
    store.pwrite(0, bytes(buf))


def write_stream(store, sectors: int, desc_text: str) -> None:
    """An empty streamOptimized file: header, descriptor, then an empty directory, footer and EOS."""
    raw = desc_text.encode()
    desc_size = max(1, -(-len(raw) // SECTOR))
    overhead = -(-(1 + desc_size) // GRAIN_SECTORS) * GRAIN_SECTORS
    flags = sp.FLAG_NL_DETECT | sp.FLAG_COMPRESS | sp.FLAG_MARKER
    h = sp.new_header(sectors, GRAIN_SECTORS, flags, 3, 1, desc_size, 0, sp.GD_AT_END, overhead,
                      sp.COMPRESSION_DEFLATE)
    buf = bytearray(overhead * SECTOR)
    buf[:SECTOR] = h.pack()
    buf[SECTOR:SECTOR + len(raw)] = raw
    grains = -(-sectors // GRAIN_SECTORS)
    gt_count = -(-grains // GTES_PER_GT)
    gd_sectors = max(1, -(-gt_count * 4 // SECTOR))
    footer = sp.new_header(sectors, GRAIN_SECTORS, flags, 3, 1, desc_size, 0, overhead + 1, overhead,
                           sp.COMPRESSION_DEFLATE)
    tail = (sp.marker(gd_sectors, 0, sp.MARKER_GD) + bytes(gd_sectors * SECTOR)
            + sp.marker(1, 0, sp.MARKER_FOOTER) + footer.pack() + sp.marker(0, 0, sp.MARKER_EOS))
    store.truncate(0)
    store.pwrite(0, bytes(buf) + tail)


def new_cid() -> int:
    """A random content ID, never the "no parent" / "all zeroes" values 0xffffffff and 0xfffffffe."""
    while True:
        cid = secrets.randbits(32)
        if cid not in (0, 0xFFFFFFFF, 0xFFFFFFFE):
            return cid


def _parent_cid(opener, backing_file: str, backing_fmt: str | None) -> int:
    if backing_fmt not in (None, "vmdk"):
        raise QimgError("backing_file must be a vmdk image")
    try:
        chain = opener.open_backing(backing_file, None, backing=False)  # the parent alone, as qemu-img
    except QimgError as e:
        raise QimgError(f"Could not open backing file: {e}") from None
    with chain:
        if chain.top.format_name != "vmdk":
            raise QimgError("backing_file must be a vmdk image")
        return chain.top.cid


def create(filename: str, opts, opener) -> None:
    """Create a VMDK of any subformat qemu-img 7.2 writes."""
    adapter, subformat, compat6, zeroed, hw, tools, prealloc = _opts(opts)
    if adapter not in ADAPTERS:
        raise QimgError(f"invalid parameter value: {adapter}")
    if subformat not in SUBFORMATS:
        raise QimgError(f"invalid parameter value: {subformat}")
    if prealloc not in PREALLOC:
        if prealloc == "metadata":
            raise QimgError(f"Unsupported preallocation mode: {prealloc}")
        raise QimgError(f"invalid parameter value: {prealloc}")
    if compat6 and hw != "undefined":
        raise QimgError("compat6 cannot be enabled with hwversion set")
    hwversion = hw if hw != "undefined" else ("6" if compat6 else "4")
    size = opts.size or 0
    if size > MAX_SIZE:
        raise QimgError(f"Image size {size} exceeds the limit {MAX_SIZE}")
    sectors = -(-size // SECTOR)
    parent_cid = dsc.CID_NONE
    if opts.backing_file:
        if subformat == "streamOptimized":
            raise QimgError("streamOptimized images cannot have a backing file")
        parent_cid = _parent_cid(opener, opts.backing_file, opts.backing_fmt)
    cid = new_cid()
    stream = subformat == "streamOptimized"
    names = extent_names(filename, subformat, size)
    kind = "FLAT" if "Flat" in subformat else "SPARSE"
    lines = [f'RW {n} {kind} "{name}"' + (" 0" if kind == "FLAT" else "") for name, n in names]
    text = dsc.build(cid, parent_cid, subformat, lines, size, adapter, hwversion, tools,
                     parent_hint=opts.backing_file, stream_style=stream, long_cid=secrets.token_hex(16))
    if subformat in ("monolithicSparse", "streamOptimized"):
        with opener.open_file(os.path.basename(filename), writable=True, create=True) as store:
            if stream:
                write_stream(store, sectors, text)
            else:
                write_sparse(store, sectors, zeroed, text)
        return
    d = os.path.dirname(filename)
    made = []
    try:
        for name, n in names:
            path = os.path.join(d, name)
            made.append(path)
            with opener.open_file(name, writable=True, create=True) as store:
                if kind == "SPARSE":
                    write_sparse(store, n, zeroed, None)
                else:
                    store.truncate(n * SECTOR)
                    if prealloc == "falloc" and n:
                        store.fallocate(0, n * SECTOR)
                    elif prealloc == "full":
                        chunk = bytes(1 << 20)
                        pos = 0
                        while pos < n * SECTOR:
                            k = min(len(chunk), n * SECTOR - pos)
                            store.pwrite(pos, chunk[:k])
                            pos += k
                    elif n:
                        # as qemu's file layer: the first block is allocated so alignment probing works
                        store.pwrite(0, bytes(min(4096, n * SECTOR)))
        with opener.open_file(os.path.basename(filename), writable=True, create=True) as store:
            store.pwrite(0, text.encode())
    except BaseException:
        for p in made:
            try:
                os.unlink(p)
            except OSError:
                pass
        raise
