"""vvfat: a host directory presented as a read-only FAT disk (``fat:[rw:][floppy:][12|16|32:]DIR``).

References:
  - Microsoft Extensible Firmware Initiative FAT32 File System Specification 1.03 ("fatgen103"): BPB fields,
    FAT12/16/32 entry packing, directory entries, date/time encoding, long file name (LFN) entries and their
    short-name checksum.
  - The classic MBR partition table layout (boot flag, CHS, type, LBA start, sector count).
  - Observed qemu-img 7.2 behaviour (``qemu-img info/convert fat:DIR``): hard disks are 1024x16x63 sectors
    (FAT12: 64 cylinders) with one partition at sector 63, floppies 2.88 MB (1.44 MB with ``12``), 8 KiB
    clusters, 512 root entries, the volume label "QEMU VVFAT", short names made from the long name
    (upper-cased, invalid characters dropped, "~N" when lossy), an LFN for every name, clusters assigned
    breadth first in directory-listing order; info names the image as a json: filename.

FAT32 is the one deliberate difference: qemu 7.2 writes a FAT16-style boot sector with 8 KiB clusters (too few
clusters for FAT32, so no reader accepts it); here FAT32 is laid out as the specification wants (4 KiB clusters,
FSInfo, root directory in clusters) on the same 504 MiB disk, so sizes agree and the files can be read back.

The disk is never materialised: metadata (MBR, boot sector, FATs, directory tables) is built in memory, file
contents are read from the host files on demand.  Writing back (``rw``) is not supported.
"""

from __future__ import annotations

import bisect
import json
import os
import stat
import struct
import time

from ..core.driver import Driver
from ..core.extent import Extent
from ..errors import OpenError, QimgError, Unsupported, check_limit

SECTOR = 512
SECTORS_PER_CLUSTER = 16
CLUSTER_SIZE = SECTOR * SECTORS_PER_CLUSTER
ROOT_ENTRIES = 512
#: FAT32 needs at least 65525 clusters, so it uses 4 KiB clusters, 32 reserved sectors (FSInfo at 1, backup boot
#: sector at 6) and keeps the root directory in the cluster area
FAT32_SECTORS_PER_CLUSTER = 8
FAT32_RESERVED_SECTORS = 32
FAT32_FSINFO_SECTOR = 1
FAT32_BACKUP_BOOT_SECTOR = 6
FAT32_ROOT_CLUSTER = 2
DIR_ENTRY = 32
RESERVED_SECTORS = 1
NUM_FATS = 2
HD_OFFSET_SECTORS = 63
VOLUME_LABEL = b"QEMU VVFAT "
VOLUME_SERIAL = 0xFABE1AFD
MBR_SIGNATURE = 0xBE1AFDFA
ATTR_DIRECTORY = 0x10
ATTR_ARCHIVE = 0x20
ATTR_VOLUME = 0x08
ATTR_LFN = 0x0F
LFN_CHARS = 13

#: limits on what a host directory tree may hold
MAX_DEPTH = 1024
MAX_FILES = 1 << 20
MAX_NAME_UNITS = 255
MAX_DIR_ENTRIES = 65536
MAX_FILE_SIZE = (1 << 32) - 1

_SHORT_OK = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'()-@^_`{}~")
_EOC = {12: 0xFFF, 16: 0xFFFF, 32: 0x0FFFFFFF}
_MAX_CLUSTERS = {12: 0xFF4, 16: 0xFFF4, 32: 0x0FFFFFF4}


def parse_fat_filename(filename: str) -> dict:
    """fat:[rw:][floppy:][12|16|32:]DIR -> {'dir', 'fat_type', 'floppy', 'rw'} (DIR is after the last ':')."""
    if not filename.startswith("fat:"):
        raise OpenError(f"'{filename}' is not a fat: filename")
    head, _, dirname = filename.rpartition(":")
    opts = head[len("fat:"):].split(":") if head != "fat" else []
    fat_type = 0
    floppy = rw = False
    for o in opts:
        if o in ("12", "16", "32"):
            fat_type = int(o)
        elif o == "floppy":
            floppy = True
        elif o == "rw":
            rw = True
        elif o:
            raise OpenError(f"Unknown vvfat option '{o}'")
    if not dirname:
        raise OpenError("vvfat needs a directory name")
    return {"dir": dirname, "fat_type": fat_type, "floppy": floppy, "rw": rw}


def _fat_datetime(t: float) -> tuple[int, int]:
    """(date, time) in FAT encoding, local time, clamped to the FAT epoch range."""
    try:
        tm = time.localtime(t)
    except (OverflowError, OSError, ValueError):
        tm = time.localtime(0)
    year = min(max(tm.tm_year, 1980), 2107)
    date = ((year - 1980) << 9) | (tm.tm_mon << 5) | tm.tm_mday
    tim = (tm.tm_hour << 11) | (tm.tm_min << 5) | (tm.tm_sec // 2)
    return date, tim


def _short_filter(text: str, stop_at_dot: bool) -> tuple[str, bool]:
    out = []
    lossy = False
    for ch in text:
        if ch == "." and stop_at_dot:
            lossy = True
            break
        up = ch.upper() if ch.isascii() else ch
        if up in _SHORT_OK:
            out.append(up)
        else:
            lossy = True
    return "".join(out), lossy


def short_name(name: str, taken: set) -> bytes:
    """The 11-byte 8.3 name for ``name``, unique within ``taken`` (which it joins)."""
    dot = name.rfind(".")
    if dot >= 0:
        base_src, ext_src = name[:dot], name[dot + 1:]
    else:
        base_src, ext_src = name, ""
    base, lossy_b = _short_filter(base_src, True)
    ext, lossy_e = _short_filter(ext_src, False)
    lossy = lossy_b or lossy_e
    if not base:
        base, ext = ext, ""
        lossy = True
    if len(base) > 8:
        base, lossy = base[:8], True
    if len(ext) > 3:
        ext, lossy = ext[:3], True
    cand = (base.ljust(8) + ext.ljust(3)).encode("ascii")
    if lossy or cand in taken:
        n = 1
        while True:
            suffix = f"~{n}"
            cand = ((base[:8 - len(suffix)] + suffix).ljust(8) + ext.ljust(3)).encode("ascii")
            if cand not in taken:
                break
            n += 1
    taken.add(cand)
    return cand


def lfn_checksum(short: bytes) -> int:
    s = 0
    for b in short:
        s = (((s & 1) << 7) + (s >> 1) + b) & 0xFF
    return s


def lfn_entries(name: str, short: bytes) -> list[bytes]:
    """LFN directory entries for ``name``, in on-disk order (last part first)."""
    units = name.encode("utf-16-le")
    n_units = len(units) // 2
    check_limit("vvfat long file name length", n_units, MAX_NAME_UNITS, name)
    parts = -(-n_units // LFN_CHARS)
    padded = units
    if n_units % LFN_CHARS:
        padded += b"\0\0"
        padded += b"\xff\xff" * (parts * LFN_CHARS - n_units - 1)
    csum = lfn_checksum(short)
    out = []
    for i in range(parts, 0, -1):
        chunk = padded[(i - 1) * 26:i * 26]
        seq = i | (0x40 if i == parts else 0)
        out.append(bytes([seq]) + chunk[0:10] + bytes([ATTR_LFN, 0, csum]) + chunk[10:22] + b"\0\0" + chunk[22:26])
    return out


def dir_entry(short: bytes, attr: int, st, cluster: int, size: int) -> bytes:
    if st is not None:
        cdate, ctime = _fat_datetime(st.st_ctime)
        adate, _ = _fat_datetime(st.st_atime)
        mdate, mtime = _fat_datetime(st.st_mtime)
    else:
        cdate = ctime = adate = mdate = mtime = 0
    return struct.pack("<11sBBBHHHHHHHI", short, attr, 0, 0, ctime, cdate, adate, cluster >> 16, mtime, mdate,
                       cluster & 0xFFFF, size)


class _Node:
    __slots__ = ("children", "cluster", "clusters", "is_dir", "name", "parent", "path", "size", "st", "table")

    def __init__(self, name, path, st, is_dir, parent):
        self.name, self.path, self.st, self.is_dir, self.parent = name, path, st, is_dir, parent
        self.size = 0
        self.cluster = 0
        self.clusters = 0
        self.children = []
        self.table = b""


class VvfatDriver(Driver):
    """A read-only FAT disk generated from a directory tree."""

    format_name = "raw"

    @classmethod
    def open_protocol(cls, filename: str, writable: bool = False, options: dict | None = None):
        p = parse_fat_filename(filename)
        if p["rw"] and not writable:
            raise OpenError("Unable to set VVFAT to 'rw' when drive is read-only")
        if writable:
            raise Unsupported("vvfat: writing to a directory disk is not supported")
        drv = cls(None, filename, False, None)
        drv._build(p)
        return drv

    # ----- layout -----
    def _build(self, p: dict) -> None:
        self.params = p
        dirname = p["dir"]
        try:
            st = os.stat(dirname)
        except OSError:
            raise OpenError(f"Could not read directory {dirname}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise OpenError(f"Could not read directory {dirname}")
        floppy, fat_type = p["floppy"], p["fat_type"]
        if floppy:
            if fat_type == 12:
                cyls, heads, secs = 80, 2, 18
            else:
                cyls, heads, secs = 80, 2, 36
                fat_type = fat_type or 12
            self.offset_sectors = 0
        else:
            fat_type = fat_type or 16
            cyls, heads, secs = (64 if fat_type == 12 else 1024), 16, 63
            self.offset_sectors = HD_OFFSET_SECTORS
        self.fat_type, self.floppy = fat_type, floppy
        self.geometry = (cyls, heads, secs)
        total = cyls * heads * secs
        self.virtual_size = total * SECTOR
        self.part_sectors = total - self.offset_sectors
        if fat_type == 32:
            self.spc, self.reserved, root_sectors = FAT32_SECTORS_PER_CLUSTER, FAT32_RESERVED_SECTORS, 0
        else:
            self.spc, self.reserved = SECTORS_PER_CLUSTER, RESERVED_SECTORS
            root_sectors = ROOT_ENTRIES * DIR_ENTRY // SECTOR
        self.cluster_bytes = self.spc * SECTOR
        # FAT size for the most clusters the partition could hold (the FATs themselves ignored, as qemu does)
        max_clusters = (self.part_sectors - self.reserved - root_sectors) // self.spc
        fat_bytes = ((max_clusters + 2) * 3 + 1) // 2 if fat_type == 12 else (max_clusters + 2) * fat_type // 8
        self.spf = -(-fat_bytes // SECTOR)
        self.fat_start = (self.offset_sectors + self.reserved) * SECTOR
        self.root_start = self.fat_start + NUM_FATS * self.spf * SECTOR
        self.data_start = self.root_start + root_sectors * SECTOR
        self.data_clusters = min((self.virtual_size - self.data_start) // self.cluster_bytes,
                                 _MAX_CLUSTERS[fat_type] - 1)
        self._scan(dirname, st)
        self._layout_regions()

    def _capacity_error(self):
        mb = self.part_sectors * SECTOR / 1024000
        return OpenError(f"Directory does not fit in FAT{self.fat_type} (capacity {mb:.2f} MB)")

    def _scan(self, dirname: str, st) -> None:
        """Breadth-first walk: children get clusters in listing order, directories queue up for later."""
        root = _Node("", dirname, st, True, None)
        self.root = root
        queue = [root]
        next_cluster = 2
        files = 0
        qi = 0
        self.chains = []  # (first cluster, count, node) in cluster order
        while qi < len(queue):
            node = queue[qi]
            qi += 1
            depth = 0
            anc = node.parent
            ancestors = {(node.st.st_dev, node.st.st_ino)}
            while anc is not None:
                depth += 1
                ancestors.add((anc.st.st_dev, anc.st.st_ino))
                anc = anc.parent
            check_limit("vvfat directory depth", depth, MAX_DEPTH, node.path)
            try:
                names = [e.name for e in os.scandir(node.path)]
            except OSError:
                if node is root:
                    raise OpenError(f"Could not read directory {dirname}") from None
                names = []
            taken: set = set()
            entries = []
            for name in names:
                path = os.path.join(node.path, name)
                try:
                    cst = os.stat(path)
                except OSError:
                    continue  # dangling link or vanished file: qemu leaves it out too
                is_dir = stat.S_ISDIR(cst.st_mode)
                if is_dir and (cst.st_dev, cst.st_ino) in ancestors:
                    is_dir_loop = True
                else:
                    is_dir_loop = False
                child = _Node(name, path, cst, is_dir, node)
                if not is_dir and stat.S_ISREG(cst.st_mode):
                    if cst.st_size > MAX_FILE_SIZE:
                        raise self._capacity_error()
                    child.size = cst.st_size
                if is_dir_loop:
                    child.path = None  # a link back up the tree: shown as an empty directory
                files += 1
                check_limit("vvfat number of files", files, MAX_FILES)
                short = short_name(name, taken)
                entries.append((child, short))
                node.children.append(child)
            # the directory table of this node (root: the fixed area)
            n_entries = (1 if node is root else 2) + sum(len(lfn_entries(c.name, s)) + 1 for c, s in entries)
            if node is root and self.fat_type != 32:
                if n_entries > ROOT_ENTRIES:
                    raise OpenError(f"Could not read directory {dirname}")
            else:
                check_limit("vvfat directory entries", n_entries, MAX_DIR_ENTRIES, node.path)
            if node is root and self.fat_type == 32:
                root.clusters = max(1, -(-n_entries * DIR_ENTRY // self.cluster_bytes))
                root.cluster = next_cluster
                next_cluster += root.clusters
                self.chains.append((root.cluster, root.clusters, root))
            for child, _short in entries:
                if child.is_dir:
                    # its table size is known once it is listed; reserve by counting now
                    child.clusters = max(1, -(-self._count_entries(child) * DIR_ENTRY // self.cluster_bytes))
                else:
                    child.clusters = -(-child.size // self.cluster_bytes)
                if child.clusters:
                    child.cluster = next_cluster
                    next_cluster += child.clusters
                    if next_cluster - 2 > self.data_clusters:
                        raise self._capacity_error()
                    self.chains.append((child.cluster, child.clusters, child))
                if child.is_dir and child.path is not None:
                    queue.append(child)
            node.table = self._make_table(node, entries)
        self.next_cluster = next_cluster

    def _count_entries(self, node: _Node) -> int:
        """Directory entries a directory will need (., .., LFNs and short entries of its children)."""
        if node.path is None:
            return 2
        try:
            names = [e.name for e in os.scandir(node.path)]
        except OSError:
            return 2
        n = 2
        for name in names:
            try:
                os.stat(os.path.join(node.path, name))
            except OSError:
                continue
            units = len(name.encode("utf-16-le")) // 2
            check_limit("vvfat long file name length", units, MAX_NAME_UNITS, name)
            n += -(-units // LFN_CHARS) + 1
        check_limit("vvfat directory entries", n, MAX_DIR_ENTRIES, node.path)
        return n

    def _make_table(self, node: _Node, entries) -> bytes:
        parts = []
        if node is self.root:
            parts.append(dir_entry(VOLUME_LABEL, ATTR_VOLUME | ATTR_ARCHIVE, None, 0, 0))
        else:
            parent = node.parent
            parts.append(dir_entry(b".          ", ATTR_DIRECTORY, node.st, node.cluster, 0))
            pcl = 0 if parent is self.root else parent.cluster
            parts.append(dir_entry(b"..         ", ATTR_DIRECTORY, parent.st, pcl, 0))
        for child, short in entries:
            parts.extend(lfn_entries(child.name, short))
            attr = ATTR_DIRECTORY if child.is_dir else ATTR_ARCHIVE
            parts.append(dir_entry(short, attr, child.st, child.cluster, 0 if child.is_dir else child.size))
        table = b"".join(parts)
        if node.clusters and len(table) > node.clusters * self.cluster_bytes:
            # the directory grew between counting and listing: keep what fits
            table = table[:node.clusters * self.cluster_bytes]
        return table

    def _fat_bytes(self) -> bytes:
        import numpy as np

        n = self.spf * SECTOR * 8 // self.fat_type
        fat = np.zeros(n, dtype=np.uint32)
        media = 0xF0 if self.floppy else 0xF8
        eoc = _EOC[self.fat_type]
        fat[0] = (eoc & ~0xFF) | media
        fat[1] = eoc
        for first, count, _node in self.chains:
            fat[first:first + count - 1] = np.arange(first + 1, first + count, dtype=np.uint32)
            fat[first + count - 1] = eoc
        if self.fat_type == 16:
            out = fat.astype("<u2").tobytes()
        elif self.fat_type == 32:
            out = fat.astype("<u4").tobytes()
        else:
            even = fat[0::2][: n // 2].astype(np.uint32)
            odd = fat[1::2][: n // 2].astype(np.uint32)
            packed = np.empty((len(even), 3), dtype=np.uint8)
            packed[:, 0] = even & 0xFF
            packed[:, 1] = ((even >> 8) & 0x0F) | ((odd & 0x0F) << 4)
            packed[:, 2] = (odd >> 4) & 0xFF
            out = packed.tobytes()
        size = self.spf * SECTOR
        return out[:size].ljust(size, b"\0")

    def _boot_sector(self) -> bytes:
        _cyls, heads, secs = self.geometry
        total = self.part_sectors
        b = bytearray(SECTOR)
        b[0:3] = b"\xeb\x3e\x90"
        b[3:11] = b"MSWIN4.1"
        media = 0xF0 if self.floppy else 0xF8
        if self.fat_type == 32:
            struct.pack_into("<HBHBHHBHHHII", b, 11, SECTOR, self.spc, self.reserved, NUM_FATS, 0, 0, media, 0,
                             secs, heads, self.offset_sectors, total)
            struct.pack_into("<IHHIHH12sBBBI11s8s", b, 36, self.spf, 0, 0, FAT32_ROOT_CLUSTER, FAT32_FSINFO_SECTOR,
                             FAT32_BACKUP_BOOT_SECTOR, bytes(12), 0 if self.floppy else 0x80, 0, 0x29,
                             VOLUME_SERIAL, VOLUME_LABEL, b"FAT32   ")
            b[0:3] = b"\xeb\x58\x90"
        else:
            struct.pack_into("<HBHBHHBHHHII", b, 11, SECTOR, self.spc, self.reserved, NUM_FATS, ROOT_ENTRIES,
                             total if total < 0x10000 else 0, media, self.spf, secs, heads, self.offset_sectors,
                             0 if total < 0x10000 else total)
            struct.pack_into("<BBBI11s8s", b, 36, 0 if self.floppy else 0x80, 0, 0x29, VOLUME_SERIAL, VOLUME_LABEL,
                             b"FAT12   " if self.fat_type == 12 else b"FAT16   ")
        b[510:512] = b"\x55\xaa"
        return bytes(b)

    def _fsinfo(self) -> bytes:
        """FAT32 FSInfo sector: free counts left unknown (0xFFFFFFFF) so readers compute them."""
        b = bytearray(SECTOR)
        struct.pack_into("<I", b, 0, 0x41615252)
        struct.pack_into("<IIII", b, 484, 0x61417272, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        struct.pack_into("<I", b, 508, 0xAA550000)
        return bytes(b)

    def _mbr(self) -> bytes:
        cyls, heads, secs = self.geometry
        b = bytearray(SECTOR)
        struct.pack_into("<I", b, 0x1B8, MBR_SIGNATURE)

        def chs(lba):
            c = lba // (heads * secs)
            h = (lba // secs) % heads
            s = lba % secs + 1
            if c > 1023:
                c, h, s = 1023, heads - 1, secs
            return bytes([h, s | ((c >> 8) << 6), c & 0xFF])

        ptype = {12: 0x01, 16: 0x06, 32: 0x0B}[self.fat_type]
        total = cyls * heads * secs
        entry = bytes([0x80]) + chs(self.offset_sectors) + bytes([ptype]) + chs(total - 1) + \
            struct.pack("<II", self.offset_sectors, total - self.offset_sectors)
        b[0x1BE:0x1CE] = entry
        b[510:512] = b"\x55\xaa"
        return bytes(b)

    def _layout_regions(self) -> None:
        """Sorted (start, length, bytes-or-node) regions; everything else reads as zeros."""
        regions = []
        if not self.floppy:
            regions.append((0, SECTOR, self._mbr()))
        boot = self._boot_sector()
        part = self.offset_sectors * SECTOR
        regions.append((part, SECTOR, boot))
        if self.fat_type == 32:
            regions.append((part + FAT32_FSINFO_SECTOR * SECTOR, SECTOR, self._fsinfo()))
            regions.append((part + FAT32_BACKUP_BOOT_SECTOR * SECTOR, SECTOR, boot))
        fat = self._fat_bytes()
        for i in range(NUM_FATS):
            regions.append((self.fat_start + i * len(fat), len(fat), fat))
        if self.fat_type != 32:
            regions.append((self.root_start, len(self.root.table), self.root.table))
        for first, count, node in self.chains:
            start = self.data_start + (first - 2) * self.cluster_bytes
            if node.is_dir:
                regions.append((start, len(node.table), node.table))
            elif node.size:
                regions.append((start, node.size, node))
        regions.sort(key=lambda r: r[0])
        self.regions = regions
        self.starts = [r[0] for r in regions]

    # ----- driver interface -----
    @property
    def display_filename(self) -> str:
        p = self.params
        return "json:" + json.dumps({"driver": "raw", "file": {
            "fat-type": p["fat_type"], "dir": p["dir"], "driver": "vvfat", "floppy": p["floppy"], "rw": p["rw"]}})

    def block_status(self, offset: int, length: int) -> Extent:
        n = max(min(length, self.virtual_size - offset), 1)
        return Extent(offset, n, data=True, zero=False, present=True)

    def allocated_file_size(self):
        return None

    def info_extra(self) -> dict:
        return {"dirty-flag": None}


    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        total = len(view)
        end = offset + total
        view[:] = bytes(total) if total <= (1 << 20) else b"\0" * total
        i = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        while i < len(self.regions):
            start, length, src = self.regions[i]
            if start >= end:
                break
            i += 1
            lo, hi = max(start, offset), min(start + length, end)
            if lo >= hi:
                continue
            dst = view[lo - offset:hi - offset]
            if isinstance(src, bytes):
                dst[:] = src[lo - start:hi - start]
            else:
                self._read_file(src, lo - start, dst)

    def _read_file(self, node: _Node, pos: int, dst) -> None:
        try:
            fd = os.open(node.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise QimgError(f"Could not read '{node.path}': {e.strerror}") from None
        try:
            done = 0
            while done < len(dst):
                n = os.preadv(fd, [dst[done:]], pos + done)
                if n <= 0:
                    break  # the file shrank since the scan: the rest stays zero
                done += n
        except OSError as e:
            raise QimgError(f"Could not read '{node.path}': {e.strerror}") from None
        finally:
            os.close(fd)

    def close(self) -> None:
        pass
