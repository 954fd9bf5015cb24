"""vpc: Microsoft Virtual Hard Disk (VHD), fixed and dynamic.

References:
  - Microsoft "Virtual Hard Disk Image Format Specification" v1.0 (2006): the hard disk
    footer (cookie "conectix", features, version, data offset, time stamp, creator
    application/version/host OS, original and current size, disk geometry, disk type,
    checksum, unique id, saved state), the dynamic disk header (cookie "cxsparse",
    table offset, max table entries, block size, checksum, parent fields), the block
    allocation table (big-endian u32 sector numbers, 0xffffffff = unused), the per-block
    sector bitmap, and Appendix "CHS Calculation".
  - Checksum: one's complement of the byte sum of the structure with its checksum zeroed.
  - qemu-img 7.2's observed behaviour:
      * the virtual size comes from the CHS geometry, except for images whose creator is
        'win ' (Hyper-V), 'qem2' (qemu with force_size), 'd2v ' (Disk2vhd), 'CTXS'
        (XenConverter) or 'tap\\0' (XenServer), or whose geometry is the maximum
        65535/16/255: those use the footer's current_size.  The open option
        ``force_size_calc=chs|current_size`` overrides the creator rule.
      * create rounds the size up to the CHS geometry unless force_size=on, which writes
        creator 'qem2' and the maximum geometry; 2 MiB blocks; the BAT at 1536.
      * differencing disks are read like dynamic ones (parent locators are ignored).
      * a fixed VHD has only a footer at the end of the file, so probing sees raw data:
        qemu 7.2 (and qimg, for compatibility) probes it as ``raw``.  Opt in with
        ``-f vpc`` to read it as a VHD (the footer is then hidden and the size checked).

Writes to a dynamic image allocate 2 MiB blocks (sector bitmap all ones, as qemu does)
contiguously at the end of the file; the BAT and the footer are written back on
flush/close.
"""

from __future__ import annotations

import struct
import time
import uuid

from ..core.driver import CreateOptions, Driver
from ..core.extent import Extent, split_at
from ..core.policy import refuse_overlaps
from ..errors import CorruptImage, OpenError, QimgError
from ..options import SIZE_OPT, OptSpec, parse_bool
from .blockmap import SMALL_TABLE, uint_table_bytes, zero_stale

SECTOR = 512
HEADER_SIZE = 512
DYN_HEADER_SIZE = 1024
VHD_FIXED = 2
VHD_DYNAMIC = 3
VHD_DIFFERENCING = 4
VHD_CHS_MAX_C = 65535
VHD_CHS_MAX_H = 16
VHD_CHS_MAX_S = 255
VHD_MAX_GEOMETRY = VHD_CHS_MAX_C * VHD_CHS_MAX_H * VHD_CHS_MAX_S
VHD_MAX_SECTORS = 0xFF000000  # 2040 GiB
VHD_TIMESTAMP_BASE = 946684800  # 2000-01-01 00:00:00 UTC
BAT_UNUSED = 0xFFFFFFFF
DEFAULT_BLOCK_SIZE = 2 << 20
#: the BAT is read whole; qemu refuses more than INT_MAX / 4 entries
MAX_TABLE_ENTRIES = 0x7FFFFFFF // 4
_TRUNCATED = ("block-vpc: free_data_block_offset points after the end of file. "
              "The image has been truncated.")
#: creators whose images use current_size rather than the CHS geometry
SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")

# footer: cookie features version data_offset timestamp creator_app creator_ver creator_os
#         orig_size current_size cyls heads secs type checksum uuid saved_state reserved
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
# dynamic header: cookie data_offset table_offset version max_table_entries block_size checksum
#                 parent_uuid parent_timestamp reserved parent_name locators reserved
_DYN = struct.Struct(">8sQQIIII16sII512s192s256s")


def vpc_checksum(buf) -> int:
    """The VHD checksum: one's complement of the byte sum."""
    return (~sum(buf)) & 0xFFFFFFFF


def calculate_geometry(total_sectors: int) -> tuple[int, int, int]:
    """CHS for a sector count (VHD spec, appendix "CHS Calculation")."""
    total_sectors = min(total_sectors, VHD_MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        secs = 255
        heads = 16
        cyls_heads = total_sectors // secs
    else:
        secs = 17
        cyls_heads = total_sectors // secs
        heads = (cyls_heads + 1023) // 1024
        heads = max(heads, 4)
        if cyls_heads >= heads * 1024 or heads > 16:
            secs = 31
            heads = 16
            cyls_heads = total_sectors // secs
        if cyls_heads >= heads * 1024:
            secs = 63
            heads = 16
            cyls_heads = total_sectors // secs
    return cyls_heads // heads, heads, secs


def create_geometry(size: int, force_size: bool) -> tuple[int, int, int, int]:
    """(total_sectors, cyls, heads, secs) that qemu-img 7.2 writes for a requested size."""
    if force_size:
        cyls, heads, secs = VHD_CHS_MAX_C, VHD_CHS_MAX_H, VHD_CHS_MAX_S
    else:
        want = min(VHD_MAX_GEOMETRY, (size + SECTOR - 1) // SECTOR)
        cyls = heads = secs = 0
        i = 0
        # the smallest geometry holding at least the requested sectors
        while want > cyls * heads * secs:
            cyls, heads, secs = calculate_geometry(want + i)
            i += 1
    if cyls * heads * secs == VHD_MAX_GEOMETRY:
        total = (size + SECTOR - 1) // SECTOR
    else:
        total = cyls * heads * secs
    return total, cyls, heads, secs


def _footer_dict(buf: bytes) -> dict:
    f = _FOOTER.unpack(buf[:HEADER_SIZE])
    keys = ("cookie", "features", "version", "data_offset", "timestamp", "creator_app", "creator_ver",
            "creator_os", "orig_size", "current_size", "cyls", "heads", "secs", "type", "checksum", "uuid",
            "saved_state", "reserved")
    return dict(zip(keys, f))


def _pack_footer(d: dict) -> bytes:
    d = dict(d, checksum=0)
    raw = _FOOTER.pack(d["cookie"], d["features"], d["version"], d["data_offset"], d["timestamp"],
                       d["creator_app"], d["creator_ver"], d["creator_os"], d["orig_size"], d["current_size"],
                       d["cyls"], d["heads"], d["secs"], d["type"], 0, d["uuid"], d["saved_state"],
                       bytes(427))
    csum = vpc_checksum(raw)
    return raw[:64] + struct.pack(">I", csum) + raw[68:]


class VpcDriver(Driver):
    """A VHD image: fixed (footer only) or dynamic/differencing (BAT of blocks)."""

    format_name = "vpc"
    create_opts = (
        SIZE_OPT,
        OptSpec("subformat", "string",
                "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} "),
        OptSpec("force_size", "bool",
                "Force disk size calculation to use the actual size specified, rather than using the "
                "nearest CHS-based calculation"),
    )

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        # a dynamic VHD starts with a copy of its footer; a fixed one does not (probes raw)
        if head[:8] == b"conectix":
            return 100
        return 0

    # ----- open -----
    def _open(self, options: dict) -> None:
        store = self.store
        file_size = store.size()
        buf = store.pread_full(0, HEADER_SIZE)  # a short file reads as zero-padded (fails the checksum)
        footer_off = 0
        if buf[:8] != b"conectix":
            if file_size < HEADER_SIZE:
                raise OpenError("Invalid VPC image: the file is shorter than a footer")
            footer_off = file_size - HEADER_SIZE
            buf = store.pread(footer_off, HEADER_SIZE)
            if buf[:8] != b"conectix":
                raise OpenError("invalid VPC image")
        f = _footer_dict(buf)
        zeroed = buf[:64] + bytes(4) + buf[68:HEADER_SIZE]
        if vpc_checksum(zeroed) != f["checksum"]:
            raise CorruptImage("Incorrect header checksum")
        self.footer = f
        self.footer_buf = bytes(buf)
        self.disk_type = f["type"]
        # qemu reads every non-fixed type (dynamic, differencing, unknown) through the BAT

        total = f["cyls"] * f["heads"] * f["secs"]
        creator = f["creator_app"]
        use_chs = creator not in SIZE_CREATORS
        calc = options.get("force_size_calc")
        if calc is not None:
            if calc == "chs":
                use_chs = True
            elif calc == "current_size":
                use_chs = False
            else:
                raise QimgError("Invalid force_size_calc value '%s'" % calc)
        if not use_chs or total == VHD_MAX_GEOMETRY:
            total = f["current_size"] // SECTOR
        if total > VHD_MAX_SECTORS:
            raise CorruptImage("File too large")
        self.virtual_size = total * SECTOR
        self.bat = None
        self._next_used = None
        self._bat_dirty = False
        self._footer_dirty = False

        if f["type"] == VHD_FIXED:
            # the data, then the footer; a short data area reads as the file does (as qemu), but is not written
            self.block_size = None
            self.data_end = footer_off if footer_off else file_size
            return

        dyn_off = f["data_offset"]
        dbuf = store.pread_full(dyn_off, DYN_HEADER_SIZE) if dyn_off < file_size else b""
        if dbuf[:8] != b"cxsparse":
            raise CorruptImage("Invalid header magic")
        (_cookie, _doff, table_offset, _ver, max_entries, block_size, _csum, *_rest) = _DYN.unpack(dbuf)
        if block_size < SECTOR or block_size & (block_size - 1):
            raise CorruptImage("Invalid block size %u" % block_size)
        if self.virtual_size // block_size > 0xFFFFFFFF:
            raise CorruptImage("Too many blocks")
        if max_entries * block_size < self.virtual_size:
            raise CorruptImage("Page table too small")
        if max_entries > MAX_TABLE_ENTRIES:
            raise CorruptImage("Max Table Entries too large (%d)" % max_entries)
        bat_bytes = max_entries * 4
        if table_offset + bat_bytes > file_size:
            raise CorruptImage(_TRUNCATED)
        if self.strict:  # untrusted mode: the footer copy, the dynamic header and the BAT do not overlap
            refuse_overlaps(self.filename, [("footer copy", 0, HEADER_SIZE), ("BAT", table_offset, bat_bytes),
                                            ("dynamic header", dyn_off, DYN_HEADER_SIZE)])
        self.block_size = block_size
        self.bitmap_size = ((block_size // (8 * SECTOR)) + 511) & ~511
        self.max_table_entries = max_entries
        self.bat_offset = table_offset
        self.dyn_offset = dyn_off
        self._file_size = file_size
        # where the next block goes: after the BAT and after every allocated block (checked at open, as qemu)
        from array import array

        bat = array("I")
        self.charge("VHD block allocation table", bat_bytes)
        bat.frombytes(store.pread(table_offset, bat_bytes))
        if bat.itemsize != 4:  # pragma: no cover - exotic platforms
            raise QimgError("unsupported platform: 32-bit unsigned array items are not 4 bytes")
        if struct.pack("=I", 1) != struct.pack(">I", 1):
            bat.byteswap()
        free = (table_offset + bat_bytes + SECTOR - 1) // SECTOR * SECTOR
        if len(bat) > 65536:
            import numpy as np

            used = np.frombuffer(bat, np.uint32)
            used = used[used != BAT_UNUSED]
            top = int(used.max()) if len(used) else None
        else:
            top = max((e for e in bat if e != BAT_UNUSED), default=None)
        if top is not None:
            free = max(free, top * SECTOR + self.bitmap_size + block_size)
        if free > file_size:
            raise CorruptImage(_TRUNCATED)
        self.free_data_block_offset = free
        self._bat_array = bat

    def _load_bat(self):
        if self.bat is not None:
            return self.bat
        if len(self._bat_array) <= SMALL_TABLE:
            bat = self._bat_array  # an array('I'): indexing it beats numpy's, and numpy is not imported
        else:
            import numpy as np

            bat = np.frombuffer(self._bat_array, np.uint32).astype(np.int64)
        self.bat = bat  # before dropping the array: another reader thread may be here too
        self._bat_array = None
        return bat

    @property
    def cluster_size(self):
        return self.block_size

    @property
    def has_zero_init(self) -> bool:
        if self.disk_type == VHD_FIXED:
            return not getattr(self.store, "is_block", False)
        return True

    # ----- read side -----
    def block_status(self, offset: int, length: int) -> Extent:
        end = min(offset + length, self.virtual_size)
        if self.disk_type == VHD_FIXED:
            return self._fixed_status(offset, end)
        bat = self._load_bat()
        bs = self.block_size
        idx = offset // bs
        entry = int(bat[idx])
        if entry == BAT_UNUSED:
            if self._next_used is None:
                # for each block, the first allocated block at or after it
                if len(bat) <= SMALL_TABLE:
                    nxt = [0] * len(bat)
                    nb = len(bat)
                    for j in range(len(bat) - 1, -1, -1):
                        if bat[j] != BAT_UNUSED:
                            nb = j
                        nxt[j] = nb
                    self._next_used = nxt
                else:
                    import numpy as np

                    used = np.flatnonzero(bat != BAT_UNUSED)
                    self._next_used = np.append(used, len(bat))[np.searchsorted(used, np.arange(len(bat)))]
            nb = int(self._next_used[idx])
            return Extent(offset, min(nb * bs, end) - offset, data=False, zero=True, present=True)
        # each block has its own bitmap in front, so host runs never span blocks
        host = entry * SECTOR + self.bitmap_size + (offset - idx * bs)
        if self.strict:
            self.check_host(self.store, entry * SECTOR, 1, offset, "BAT entry at host offset")
        return Extent(offset, min((idx + 1) * bs, end) - offset, data=True, zero=False, present=True, offset=host)

    def _fixed_status(self, offset: int, end: int) -> Extent:
        store = self.store
        nxt = store.next_data(offset)
        if nxt is None or nxt >= end:
            return Extent(offset, end - offset, data=True, zero=True, present=True, offset=offset)
        if nxt > offset:
            return Extent(offset, nxt - offset, data=True, zero=True, present=True, offset=offset)
        hole = store.next_hole(offset)
        return Extent(offset, max(min(hole, end) - offset, 1), data=True, zero=False, present=True, offset=offset)

    def plain_host_file(self, start: int, end: int):
        """(fd, host offset of ``start``) when [start, end) is stored plainly in one run (copy offload)."""
        fd = getattr(self.store, "fd", -1)
        if fd is None or fd < 0 or getattr(self.store, "is_block", True) or end > self.virtual_size:
            return None
        if self.disk_type == VHD_FIXED:
            return fd, start
        bs = self.block_size
        idx = start // bs
        if (end - 1) // bs != idx:
            return None
        entry = int(self._load_bat()[idx])
        if entry == BAT_UNUSED:
            return None
        return fd, entry * SECTOR + self.bitmap_size + (start - idx * bs)

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        if self.disk_type == VHD_FIXED:
            self.read_host(self.store, offset, view)
            return
        super().readinto(offset, view)


    # ----- write side -----
    def pwrite(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        total = len(view)
        if offset + total > self.virtual_size:
            raise QimgError("Cannot write beyond the end of the image")
        if self.disk_type == VHD_FIXED:
            if offset + total > self.data_end:
                raise QimgError("Cannot write beyond the data area of a fixed VHD (it ends at %u)" % self.data_end)
            self.store.pwrite(offset, view)
            return
        bat = self._load_bat()
        bs = self.block_size
        pos = 0
        while pos < total:
            off = offset + pos
            idx = off // bs
            in_block = off - idx * bs
            n = min(bs - in_block, total - pos)
            entry = int(bat[idx])
            if entry == BAT_UNUSED:
                entry = self._allocate(idx)
            self.store.pwrite(entry * SECTOR + self.bitmap_size + in_block, view[pos:pos + n])
            pos += n

    def _allocate(self, idx: int) -> int:
        """Place block ``idx`` at the end of the data area: bitmap of ones, data reads as zeros."""
        start = self.free_data_block_offset
        entry = start // SECTOR
        if entry >= BAT_UNUSED:
            raise QimgError("VHD image is full: no BAT entry can address offset %u" % start)
        # the old footer (or anything else) may sit where the block goes: it must read as zeros
        zero_stale(self.store, start + self.bitmap_size, self.block_size, self._file_size)
        self.store.pwrite(start, b"\xff" * self.bitmap_size)
        self.bat[idx] = entry
        self._next_used = None
        self.free_data_block_offset = start + self.bitmap_size + self.block_size
        self._bat_dirty = True
        self._footer_dirty = True
        return entry

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        if self.disk_type == VHD_FIXED:
            return super().write_zeroes(offset, length, may_unmap)
        bat = self._load_bat()
        bs = self.block_size
        for pos, nxt in split_at(offset, offset + length, bs):
            if int(bat[pos // bs]) != BAT_UNUSED:  # allocated: unallocated blocks read as zeros
                super().write_zeroes(pos, nxt - pos, may_unmap)

    def write_metadata(self) -> None:
        if self.store is None or not self.writable:
            return
        if self.disk_type == VHD_FIXED:
            return
        if self._bat_dirty:
            self.store.pwrite(self.bat_offset, uint_table_bytes(self.bat, 4, little=False))
            self._bat_dirty = False
        if self._footer_dirty:
            # the footer moves behind the last block
            self.store.pwrite(self.free_data_block_offset, self.footer_buf)
            self._footer_dirty = False

    # ----- create -----
    @classmethod
    def create(cls, filename: str, opts: CreateOptions, opener) -> None:
        sub = opts.options.get("subformat", "dynamic")
        if sub not in ("dynamic", "fixed"):
            raise QimgError(f"Parameter 'subformat' does not accept value '{sub}'")
        force = parse_bool("force_size", opts.options.get("force_size", "off"))
        prealloc = opts.options.get("preallocation", "off")
        if prealloc not in ("off", "falloc", "full"):
            if prealloc == "metadata":
                raise QimgError("Unsupported preallocation mode: metadata")
            raise QimgError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
        size = opts.size or 0
        if (size + SECTOR - 1) // SECTOR > VHD_MAX_SECTORS:
            raise QimgError("The image size is too large for file format 'vpc'")
        total, cyls, heads, secs = create_geometry(size, force)
        if total > VHD_MAX_SECTORS:
            raise QimgError("Disk size is too large, max size is 2040 GiB")
        vsize = total * SECTOR
        fixed = sub == "fixed"
        footer = dict(cookie=b"conectix", features=2, version=0x00010000,
                      data_offset=0xFFFFFFFFFFFFFFFF if fixed else HEADER_SIZE,
                      timestamp=(int(time.time()) - VHD_TIMESTAMP_BASE) & 0xFFFFFFFF,
                      creator_app=b"qem2" if force else b"qemu", creator_ver=0x00050003, creator_os=b"Wi2k",
                      orig_size=vsize, current_size=vsize, cyls=cyls, heads=heads, secs=secs,
                      type=VHD_FIXED if fixed else VHD_DYNAMIC, checksum=0, uuid=uuid.uuid4().bytes,
                      saved_state=0)
        fbuf = _pack_footer(footer)
        with opener.open_file(filename, writable=True, create=True) as store:
            if fixed:
                store.truncate(vsize + HEADER_SIZE)
                if prealloc == "falloc" and vsize:
                    store.fallocate(0, vsize)
                elif prealloc == "full":
                    chunk = bytes(1 << 20)
                    pos = 0
                    while pos < vsize:
                        store.pwrite(pos, chunk[:min(len(chunk), vsize - pos)])
                        pos += len(chunk)
                elif vsize:
                    # qemu's file layer allocates the first 4 KiB (alignment probing)
                    store.pwrite(0, bytes(min(4096, vsize)))
                store.pwrite(vsize, fbuf)
                return
            bs = DEFAULT_BLOCK_SIZE
            entries = (vsize + bs - 1) // bs
            table_offset = 3 * SECTOR
            bat_bytes = (entries * 4 + SECTOR - 1) // SECTOR * SECTOR
            dyn = bytearray(DYN_HEADER_SIZE)
            struct.pack_into(">8sQQIII", dyn, 0, b"cxsparse", 0xFFFFFFFFFFFFFFFF, table_offset, 0x00010000,
                             entries, bs)
            struct.pack_into(">I", dyn, 36, vpc_checksum(dyn))
            store.pwrite(0, fbuf)
            store.pwrite(HEADER_SIZE, bytes(dyn))
            store.pwrite(table_offset, b"\xff" * bat_bytes)
            store.pwrite(table_offset + bat_bytes, fbuf)

    @classmethod
    def format_line_options(cls, opts: CreateOptions) -> list[tuple[str, str]]:
        out = [("size", str(opts.size or 0))]
        for key in ("subformat", "force_size", "preallocation"):
            if key in opts.options:
                v = opts.options[key]
                if key == "force_size":
                    v = "on" if parse_bool(key, v) else "off"
                out.append((key, v))
        return out
