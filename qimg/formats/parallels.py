"""parallels: Parallels / Virtuozzo (ploop) expanding images, and Parallels Desktop .hdd bundles.

References:
  - "Parallels Expandable Image File Format" (QEMU docs/interop/parallels.txt): 64-byte
    little-endian header (magic "WithoutFreeSpace" or "WithouFreSpacExt", version 2, heads,
    cylinders, tracks = cluster size in sectors, nb_bat_entries, nb_sectors, in_use,
    data_off, flags, ext_off), the BAT of 32-bit entries right after it (offsets in sectors
    for "WithoutFreeSpace", in clusters for "WithouFreSpacExt"; 0 = unallocated), the
    data area; in_use 0x746F6E59 ("Ynot") while opened read/write.
  - Parallels Desktop bundle layout: a directory "NAME.hdd" with DiskDescriptor.xml
    (<Disk_Parameters><Disk_size> in sectors; <StorageData><Storage> with <Start>/<End> in
    sectors and <Image><GUID>/<Type>Compressed|Plain</Type>/<File>; <Snapshots><Shot> with
    <GUID>/<ParentGUID>).  "Compressed" parts are expanding images of this format, "Plain"
    parts are raw.  qemu-img cannot open bundles; qimg opens a bundle through its
    directory (``qimg info disk.hdd``) or its DiskDescriptor.xml, reading the newest
    snapshot of each storage and falling through to its parents where it has no data.
  - Observed qemu-img 7.2 behaviour: create writes a "WithouFreSpacExt" header with 16
    heads, cylinders = sectors / (16 * 32), 1 MiB clusters by default (cluster_size rounds
    up to sectors), data_off = header + BAT rounded up to a cluster; clusters are appended
    at the end of the data area; check reports clusters outside the file, an image left
    in use, and space leaked after the last cluster (repair truncates it).
"""

from __future__ import annotations

import os
import struct

from ..core.check import CheckResult, check_then_recheck
from ..core.driver import CreateOptions, Driver
from ..core.extent import Extent
from ..errors import CorruptImage, OpenError, QimgError, check_limit
from ..options import SIZE_OPT, OptSpec, parse_opt_size
from ..units import round_up
from .spans import write_span

HEADER_MAGIC = b"WithoutFreeSpace"
HEADER_MAGIC2 = b"WithouFreSpacExt"
HEADER_VERSION = 2
HEADER_INUSE_MAGIC = 0x746F6E59
PARALLELS_FLAG_EMPTY = 1
HEADER = struct.Struct("<16sIIIIIQIIIQ")  # 64 bytes
SECTOR = 512
DEFAULT_CLUSTER_SIZE = 1 << 20
MAX_PARALLELS_IMAGE_FACTOR = 1 << 32

#: named limits for values read from an image
MAX_CLUSTER_SECTORS = (1 << 31) // SECTOR      # 1 GiB clusters
MAX_BAT_ENTRIES = 1 << 28                      # 1 GiB of BAT
MAX_DESCRIPTOR_BYTES = 1 << 20
MAX_STORAGES = 4096
MAX_SNAPSHOT_DEPTH = 64

DESCRIPTOR_NAME = "DiskDescriptor.xml"


class ParallelsDriver(Driver):
    """An expanding Parallels image (one file), or a .hdd bundle through its descriptor."""

    format_name = "parallels"
    create_opts = (
        SIZE_OPT,
        OptSpec("cluster_size", "size", "Parallels image cluster size"),
    )

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) >= HEADER.size and head[:16] in (HEADER_MAGIC, HEADER_MAGIC2) and \
                struct.unpack_from("<I", head, 16)[0] == HEADER_VERSION:
            return 100
        if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:5] == b"<?xml" and b"<Parallels_disk_image" in head:
            return 100
        return 0

    def _open(self, options: dict) -> None:
        head = self.store.pread_full(0, HEADER.size)
        self.bundle = None
        if head[:16] not in (HEADER_MAGIC, HEADER_MAGIC2):
            if b"<?xml" in head[:64] or b"<Parallels_disk_image" in head:
                self.bundle = _Bundle(self)
                self.virtual_size = self.bundle.virtual_size
                return
            raise OpenError("Image not in Parallels format")
        (magic, version, heads, cyls, tracks, bat_entries, nb_sectors, in_use, data_off, flags,
         ext_off) = HEADER.unpack(head)
        if version != HEADER_VERSION:
            raise OpenError(f"Unsupported Parallels image version {version}")
        self.ext = magic == HEADER_MAGIC2
        if tracks == 0:
            raise CorruptImage("Invalid image: Zero sectors per track")
        check_limit("parallels cluster sectors", tracks, MAX_CLUSTER_SECTORS, "parallels header")
        check_limit("parallels BAT entries", bat_entries, MAX_BAT_ENTRIES, "parallels header")
        self.charge("parallels BAT", bat_entries * 4)
        if not self.ext:
            nb_sectors &= 0xFFFFFFFF  # only the low half counts in old images
        self.tracks = tracks
        self.cluster_bytes = tracks * SECTOR
        self.off_multiplier = self.cluster_bytes if self.ext else SECTOR
        self.bat_entries = bat_entries
        self.in_use = in_use
        self.flags = flags
        self.header_fields = [magic, version, heads, cyls, tracks, bat_entries, nb_sectors, in_use, data_off,
                              flags, ext_off]
        bat_end = HEADER.size + 4 * bat_entries
        file_size = self.store.size()
        if bat_end > max(file_size, HEADER.size):
            raise CorruptImage(f"parallels BAT ({bat_entries} entries) extends past the end of the file")
        self.data_off = data_off * SECTOR if data_off else round_up(bat_end, SECTOR)
        if self.data_off < bat_end:
            raise CorruptImage("Invalid image: data_off lies inside the BAT")
        if nb_sectors * SECTOR > (1 << 63) - 1:
            raise CorruptImage("Invalid image: nb_sectors is too large")
        self.virtual_size = nb_sectors * SECTOR
        self._bat = None  # loaded on first use: info needs no table (and no numpy)
        self._eof = None
        if self.writable:
            # qemu-img refuses a read/write open of an image left in use; qimg opens it (check
            # reports it, and closing cleanly clears the mark)
            self._set_in_use(HEADER_INUSE_MAGIC)

    @property
    def bat(self):
        if self._bat is None:
            import numpy as np

            self._bat = np.frombuffer(self.store.pread_full(HEADER.size, 4 * self.bat_entries), dtype="<u4").copy()
            if self.flags & PARALLELS_FLAG_EMPTY:
                self._bat[:] = 0
        return self._bat

    def _set_in_use(self, value: int) -> None:
        self.store.pwrite(44, struct.pack("<I", value))

    # ----- metadata -----
    def info_extra(self) -> dict:
        return {"dirty-flag": None}  # qemu-img has no image info for this format

    def allocated_file_size(self) -> int:
        if self.bundle is not None:
            return self.bundle.allocated_size()
        return self.store.allocated_size()

    @property
    def has_zero_init(self) -> bool:
        return True

    # ----- read side -----
    def block_status(self, offset: int, length: int) -> Extent:
        if self.bundle is not None:
            return self.bundle.block_status(offset, length)
        import numpy as np

        cs = self.cluster_bytes
        end = min(offset + length, self.virtual_size)
        idx = offset // cs
        if idx >= self.bat_entries:
            return Extent(offset, end - offset, data=False, zero=True, present=False)
        last = min((end - 1) // cs + 1, self.bat_entries)
        ents = self.bat[idx:last].astype(np.int64)
        first = int(ents[0])
        if first == 0:
            same = ents == 0
        else:
            mult = self.off_multiplier
            same = ents * mult == first * mult + np.arange(len(ents), dtype=np.int64) * cs
        bad = np.nonzero(~same)[0]
        run = int(bad[0]) if len(bad) else len(ents)
        run_end = (idx + run) * cs
        if first == 0 and run == len(ents) and last == self.bat_entries:
            run_end = end  # past the BAT the image reads as unallocated too; data runs end with the BAT
        n = min(end, run_end) - offset
        if first == 0:
            return Extent(offset, n, data=False, zero=True, present=False)
        host = first * self.off_multiplier + offset % cs
        if self.strict:
            self.check_host(self.store, first * self.off_multiplier, 1, offset, "BAT entry")
        return Extent(offset, n, data=True, zero=False, present=True, offset=host)

    def readinto(self, offset: int, buf) -> None:
        if self.bundle is not None:
            return self.bundle.readinto(offset, buf)
        return super().readinto(offset, buf)


    # ----- write side -----
    def _alloc(self, count: int) -> int:
        cs = self.cluster_bytes
        if self._eof is None:
            ends = [self.data_off, self.store.size()]
            self._eof = max(ends)
        off = self.data_off + round_up(max(0, self._eof - self.data_off), cs)
        self._eof = off + count * cs
        return off

    def pwrite(self, offset: int, data) -> None:
        if not self.writable:
            raise QimgError("Image is read-only")
        if self.bundle is not None:
            return self.bundle.pwrite(offset, data)
        import numpy as np

        data = memoryview(data).cast("B")
        end = offset + len(data)
        if end > self.virtual_size:
            raise QimgError(f"Cannot write beyond the end of the image ({end} > {self.virtual_size})")
        cs = self.cluster_bytes
        c0, c1 = offset // cs, (end - 1) // cs + 1
        if c1 > self.bat_entries:
            raise CorruptImage("parallels BAT does not cover the write")
        ents = self.bat[c0:c1].astype(np.int64)
        need = ents == 0  # (unallocated clusters read as zeros: parallels images have no backing file)
        hosts = write_span(self.store, offset, data, cs, ents * self.off_multiplier, need,
                           lambda i: bytes(cs) if need[i] else self.pread((c0 + i) * cs, cs), self._alloc)
        if hosts is not None:
            if self.store.size() < self._eof:
                self.store.truncate(self._eof)
            self.bat[c0:c1] = (hosts // self.off_multiplier).astype("<u4")
            self.store.pwrite(HEADER.size + 4 * c0, self.bat[c0:c1].tobytes())

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        end = min(offset + length, self.virtual_size)
        pos = offset
        while pos < end:
            ext = self.block_status(pos, end - pos)
            if ext.present:
                cur = pos
                while cur < pos + ext.length:
                    m = min(1 << 20, pos + ext.length - cur)
                    self.pwrite(cur, bytes(m))
                    cur += m
            pos += ext.length

    def flush(self) -> None:
        if self.bundle is not None:
            return self.bundle.flush()
        super().flush()

    def close(self) -> None:
        if self.bundle is not None:
            self.bundle.close()
            self.bundle = None
        elif self.store is not None and self.writable and hasattr(self, "header_fields"):
            prev = self.in_use if self.in_use != HEADER_INUSE_MAGIC else 0
            self._set_in_use(prev)
        super().close()

    # ----- check -----
    def check(self, repair: str | None = None) -> CheckResult:
        """Check, and after a repair check again (qemu-img reports the second pass with the fixed counts)."""
        return check_then_recheck(self._check, repair)

    def _check(self, repair: str | None) -> CheckResult:
        if self.bundle is not None:
            from ..errors import CheckUnsupported

            raise CheckUnsupported("This image format does not support checks")
        import numpy as np

        cs = self.cluster_bytes
        size = self.store.size()
        messages = []
        corruptions = fixed_c = 0
        if self.in_use == HEADER_INUSE_MAGIC:
            corruptions += 1
            messages.append(("Repairing" if repair == "all" else "ERROR") + " image was not closed correctly")
            if repair == "all":
                fixed_c += 1
                self.header_fields[7] = 0
                self.in_use = 0
        idxs = np.nonzero(self.bat)[0]
        offs = self.bat[idxs].astype(np.int64) * self.off_multiplier
        outside = offs > size  # as qemu: a cluster starting right at the end is not "outside"
        allocated = len(offs)
        # a cluster is fragmented when the guest cluster before it is allocated and not just before
        # it on the host (an unallocated one starts afresh; a repaired one counts as unallocated)
        host = self.bat.astype(np.int64) * self.off_multiplier
        if repair == "all":
            host[host > size] = 0
        fragmented = int(np.count_nonzero((host[1:] != 0) & (host[:-1] != 0) & (host[1:] != host[:-1] + cs)))
        bad = idxs[outside]
        for i in bad.tolist():
            messages.append(("Repairing" if repair == "all" else "ERROR") + f" cluster {i} is outside image")
        corruptions += len(bad)
        if repair == "all" and len(bad):
            self.bat[bad] = 0
            self.store.pwrite(HEADER.size, self.bat.tobytes())
            fixed_c += len(bad)
        live = offs if repair != "all" else offs[~outside]
        high = max([self.data_off] + (live + cs).tolist())
        leaks = fixed_l = 0
        if size > high:
            leak_bytes = size - high
            leaks = (leak_bytes + cs - 1) // cs
            if repair in ("leaks", "all"):
                messages.append(f"Repairing space leaked at the end of the image {leak_bytes}")
                self.store.truncate(high)
                self._eof = None
                fixed_l = leaks
            else:
                messages.append(f"ERROR space leaked at the end of the image {leak_bytes}")
        total = self.bat_entries  # qemu-img counts the BAT's entries, whatever the virtual size
        return CheckResult(corruptions=corruptions - fixed_c, leaks=leaks - fixed_l, corruptions_fixed=fixed_c,
                           leaks_fixed=fixed_l, allocated_clusters=allocated - (len(bad) if repair == "all" else 0),
                           total_clusters=total, fragmented_clusters=fragmented, image_end_offset=high,
                           messages=messages)

    # ----- create -----
    @classmethod
    def _cluster(cls, opts: CreateOptions) -> int:
        o = opts.options
        cs = parse_opt_size("cluster_size", o["cluster_size"]) if "cluster_size" in o else DEFAULT_CLUSTER_SIZE
        if cs > (1 << 31) - 1:
            raise QimgError("Cluster size is too large")
        return max(round_up(cs, SECTOR), SECTOR)

    @classmethod
    def create(cls, filename: str, opts: CreateOptions, opener) -> None:
        cs = cls._cluster(opts)
        size = round_up(opts.size or 0, SECTOR)
        if size >= MAX_PARALLELS_IMAGE_FACTOR * cs:
            raise QimgError("Image size is too large for this cluster size")
        sectors = size // SECTOR
        tracks = cs // SECTOR
        bat_entries = (sectors + tracks - 1) // tracks
        data_off = round_up(HEADER.size + 4 * bat_entries, cs)
        hdr = HEADER.pack(HEADER_MAGIC2, HEADER_VERSION, 16, sectors // (16 * 32), tracks, bat_entries, sectors, 0,
                          data_off // SECTOR, 0, 0)
        with opener.open_file(filename, writable=True, create=True) as store:
            zero = bytes(min(data_off, 1 << 20))
            for pos in range(0, data_off, len(zero)):
                store.pwrite(pos, zero[:data_off - pos])
            store.pwrite(0, hdr)

    @classmethod
    def format_line_options(cls, opts: CreateOptions) -> list[tuple[str, str]]:
        o = opts.options
        cs = parse_opt_size("cluster_size", o["cluster_size"]) if "cluster_size" in o else DEFAULT_CLUSTER_SIZE
        return [("size", str(opts.size or 0)), ("cluster_size", str(cs))]


# --------------------------------------------------------------------------------------
# Parallels Desktop bundles
# --------------------------------------------------------------------------------------

def _text(elem, tag: str, what: str) -> str:
    node = elem.find(tag)
    if node is None or node.text is None:
        raise CorruptImage(f"{DESCRIPTOR_NAME}: missing <{tag}> in <{what}>")
    return node.text.strip()


def _int(elem, tag: str, what: str) -> int:
    text = _text(elem, tag, what)
    try:
        return int(text)
    except ValueError:
        raise CorruptImage(f"{DESCRIPTOR_NAME}: <{tag}> is not a number: {text[:40]!r}") from None


class _Bundle:
    """The storages of a .hdd bundle: [(start, end, [layers newest first])] in bytes."""

    def __init__(self, drv: ParallelsDriver):
        import xml.etree.ElementTree as ET

        self.drv = drv
        size = drv.store.size()
        check_limit("DiskDescriptor.xml size", size, MAX_DESCRIPTOR_BYTES)
        raw = drv.store.pread(0, size)
        if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
            raise CorruptImage(f"{DESCRIPTOR_NAME}: document type declarations are not allowed")
        try:
            root = ET.fromstring(raw)
        except ET.ParseError as e:
            raise CorruptImage(f"{DESCRIPTOR_NAME} is not valid XML: {e}") from None
        if root.tag != "Parallels_disk_image":
            raise OpenError("Image not in Parallels format")
        params = root.find("Disk_Parameters")
        if params is None:
            raise CorruptImage(f"{DESCRIPTOR_NAME}: missing <Disk_Parameters>")
        disk_sectors = _int(params, "Disk_size", "Disk_Parameters")
        check_limit("Disk_size sectors", disk_sectors, ((1 << 63) - 1) // SECTOR, DESCRIPTOR_NAME)
        self.virtual_size = disk_sectors * SECTOR
        parents = {}
        for shot in root.iter("Shot"):
            guid = _text(shot, "GUID", "Shot")
            parents[guid] = shot.findtext("ParentGUID", "").strip()
        children = set(parents.values())
        tops = [g for g in parents if g not in children]
        top = tops[-1] if tops else None
        storages = root.find("StorageData")
        nodes = [] if storages is None else storages.findall("Storage")
        check_limit("bundle storages", len(nodes), MAX_STORAGES, DESCRIPTOR_NAME)
        self.parts = []
        self.layers_open = []
        pos = 0
        try:
            for st in nodes:
                start = _int(st, "Start", "Storage") * SECTOR
                end = _int(st, "End", "Storage") * SECTOR
                if start != pos or end < start or end > self.virtual_size:
                    raise CorruptImage(f"{DESCRIPTOR_NAME}: storage {start // SECTOR}-{end // SECTOR} "
                                       "does not continue the disk")
                images = {}
                for im in st.findall("Image"):
                    images[_text(im, "GUID", "Image")] = (_text(im, "Type", "Image"), _text(im, "File", "Image"))
                chain = []
                guid = top if top in images else (next(iter(images)) if images else None)
                seen = set()
                while guid and guid in images and guid not in seen:
                    check_limit("bundle snapshot depth", len(chain) + 1, MAX_SNAPSHOT_DEPTH, DESCRIPTOR_NAME)
                    seen.add(guid)
                    kind, fname = images[guid]
                    chain.append(self._open_layer(kind, fname))
                    guid = parents.get(guid)
                if not chain:
                    raise CorruptImage(f"{DESCRIPTOR_NAME}: storage at sector {start // SECTOR} has no image")
                self.parts.append((start, end, chain))
                pos = end
        except BaseException:
            self.close()
            raise
        if pos != self.virtual_size:
            self.close()
            raise CorruptImage(f"{DESCRIPTOR_NAME}: storages cover {pos} of {self.virtual_size} bytes")

    def _open_layer(self, kind: str, fname: str):
        if os.path.isabs(fname) or "/" in fname or fname in ("..", "."):
            raise CorruptImage(f"{DESCRIPTOR_NAME}: image file name {fname[:80]!r} leaves the bundle")
        fmt = {"Compressed": "parallels", "Plain": "raw"}.get(kind)
        if fmt is None:
            raise CorruptImage(f"{DESCRIPTOR_NAME}: unknown image type {kind[:40]!r}")
        path = self.drv.opener.resolve(fname)
        layer = self.drv.opener.open_image(fname, fmt, self.drv.writable)
        self.layers_open.append(layer)
        return (layer, path)

    def _part(self, offset: int):
        for start, end, chain in self.parts:
            if start <= offset < end:
                return start, end, chain
        raise QimgError(f"offset {offset} lies outside the bundle's storages")

    def block_status(self, offset: int, length: int) -> Extent:
        start, end, chain = self._part(offset)
        n = min(length, end - offset)
        rel = offset - start
        for layer, path in chain:
            if rel >= layer.virtual_size:
                continue
            ext = layer.block_status(rel, min(n, layer.virtual_size - rel))
            n = min(n, ext.length)
            if ext.present:
                return Extent(offset, n, data=ext.data, zero=ext.zero, present=True, offset=ext.offset,
                              compressed=ext.compressed, filename=ext.filename or path)
        return Extent(offset, n, data=False, zero=True, present=False)

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        pos = 0
        while pos < len(view):
            ext = self.block_status(offset + pos, len(view) - pos)
            n = min(ext.length, len(view) - pos)
            sub = view[pos:pos + n]
            if ext.data and not ext.zero:
                start, _end, chain = self._part(offset + pos)
                rel = offset + pos - start
                for layer, _path in chain:
                    if rel < layer.virtual_size and layer.block_status(rel, n).present:
                        layer.readinto(rel, sub)
                        break
            else:
                sub[:] = bytes(n)
            pos += n

    def pwrite(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            start, end, chain = self._part(offset + pos)
            n = min(len(view) - pos, end - offset - pos)
            chain[0][0].pwrite(offset + pos - start, view[pos:pos + n])
            pos += n

    def allocated_size(self) -> int:
        total = self.drv.store.allocated_size()
        for layer in self.layers_open:
            total += layer.allocated_file_size()
        return total

    def flush(self) -> None:
        for layer in self.layers_open:
            layer.flush()

    def close(self) -> None:
        for layer in self.layers_open:
            try:
                layer.close()
            except (QimgError, OSError):
                pass  # closing the others matters more
        self.layers_open = []
