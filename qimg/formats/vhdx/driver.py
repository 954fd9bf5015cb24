"""VhdxDriver: open (headers, region table, metadata, BAT), read and write a VHDX image.

References: [MS-VHDX] (see layout.py); the package docstring has the behaviour qemu-img 7.2 shows.
"""

from __future__ import annotations

import struct
import uuid

from ...core.driver import CreateOptions, Driver
from ...core.extent import Extent, split_at
from ...errors import CorruptImage, OpenError, QimgError, Unsupported, check_limit
from ...options import OptSpec
from ..blockmap import uint_table, uint_table_bytes
from .check import validate_bat
from .crc32c import _checksum_ok
from .layout import (
    BAT_GUID,
    FILE_PARAMETERS,
    FILE_PARAMETERS_GUID,
    LOGICAL_SECTOR_SIZE_GUID,
    METADATA_GUID,
    METADATA_TABLE_ENTRY,
    METADATA_TABLE_HEADER,
    PAGE83_DATA_GUID,
    PARENT_LOCATOR_GUID,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
    PHYSICAL_SECTOR_SIZE_GUID,
    REGION_TABLE_ENTRY,
    REGION_TABLE_HEADER,
    SMALL_BAT_ENTRIES,
    VHDX_BAT_FILE_OFF_MASK,
    VHDX_BAT_STATE_BIT_MASK,
    VHDX_HEADER1_OFFSET,
    VHDX_HEADER2_OFFSET,
    VHDX_HEADER_SIZE,
    VHDX_MAX_BLOCK_SIZE,
    VHDX_MAX_ENTRIES,
    VHDX_MAX_IMAGE_SIZE,
    VHDX_MAX_LOG_SIZE,
    VHDX_METADATA_TABLE_MAX_SIZE,
    VHDX_MIN_BLOCK_SIZE,
    VHDX_REGION_TABLE2_OFFSET,
    VHDX_REGION_TABLE_OFFSET,
    VHDX_REGION_TABLE_SIZE,
    VIRTUAL_DISK_SIZE_GUID,
    ZERO_GUID,
    MiB,
    _pack_header,
    _parse_header,
)
from .log import VhdxLogMixin

_ZEROS = memoryview(bytes(4 << 20))


def _fill_zero(view) -> None:
    """Zero a memoryview without allocating a new buffer for every call."""
    pos = 0
    n = len(view)
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        view[pos:pos + k] = _ZEROS[:k]
        pos += k



class VhdxDriver(VhdxLogMixin, Driver):
    """A VHDX image (dynamic or fixed; differencing images are refused as qemu does)."""

    format_name = "vhdx"
    create_opts = (
        OptSpec("size", "size", "Virtual disk size; max of 64TB."),
        OptSpec("log_size", "size", "Log size; min 1MB."),
        OptSpec("block_size", "size", "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size."),
        OptSpec("subformat", "string",
                "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'."),
        OptSpec("block_state_zero", "bool",
                "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when "
                "using 'qemu-img convert' with subformat=dynamic."),
    )

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 100 if head[:8] == b"vhdxfile" else 0

    # ----- open -----
    def _open(self, options: dict) -> None:
        store = self.store
        self.file_size = store.size()
        if store.pread(0, 8) != b"vhdxfile":
            raise OpenError("Image is not in VHDX format (no 'vhdxfile' signature)")
        self._read_headers()
        self._read_region_table()
        self._bat = None
        self._bat_dirty = None
        self._headers_updated = False
        self.replayed_log = False
        if self.header["log_guid"] != ZERO_GUID:
            seq = self._find_log_sequence()
            if seq:
                if not self.writable:
                    name = self.filename
                    raise OpenError(
                        f"VHDX image file '{name}' opened read-only, but contains a log that needs to be replayed\n"
                        f"To replay the log, run:\nqemu-img check -r all '{name}'")
                self._replay_log(seq)
                self.replayed_log = True
        self._read_metadata()
        self._file_end = self.file_size
        # qemu validates every allocated block at open; ``check`` opens with the errors kept for its report
        self.bat_errors = validate_bat(self)
        if self.bat_errors and not options.get("check"):
            raise CorruptImage(self.bat_errors[0])

    @property
    def replayed(self) -> bool:
        return self.replayed_log

    def _read_headers(self) -> None:
        h1 = _parse_header(self.store.pread(VHDX_HEADER1_OFFSET, VHDX_HEADER_SIZE))
        h2 = _parse_header(self.store.pread(VHDX_HEADER2_OFFSET, VHDX_HEADER_SIZE))
        if h1 is None and h2 is None:
            raise CorruptImage("No valid VHDX header found")
        # the valid header with the higher sequence number is current
        if h2 is None or (h1 is not None and h1["seq"] > h2["seq"]):
            self.header, self.header_slot = h1, 0
        else:
            self.header, self.header_slot = h2, 1
        h = self.header
        if h["log_guid"] == ZERO_GUID:
            return  # no log in use: qemu ignores the log fields then
        if h["log_length"] % MiB or h["log_offset"] % MiB:
            raise CorruptImage("VHDX log offset %u or length %u is not a multiple of 1 MiB"
                               % (h["log_offset"], h["log_length"]))
        check_limit("VHDX log length", h["log_length"], VHDX_MAX_LOG_SIZE)
        if h["log_length"] and h["log_offset"] < MiB:
            raise CorruptImage("VHDX log at offset %u overlaps the header area" % h["log_offset"])

    def _read_region_table(self) -> None:
        buf = self.store.pread_full(VHDX_REGION_TABLE_OFFSET, VHDX_REGION_TABLE_SIZE)
        if buf[:4] != b"regi" or not _checksum_ok(buf):
            # the second copy is identical by design; use it when the first is damaged
            buf = self.store.pread_full(VHDX_REGION_TABLE2_OFFSET, VHDX_REGION_TABLE_SIZE)
            if buf[:4] != b"regi" or not _checksum_ok(buf):
                raise CorruptImage("Invalid VHDX region table (bad signature or checksum)")
        count = REGION_TABLE_HEADER.unpack(buf)["entry_count"]
        check_limit("VHDX region table entry count", count, VHDX_MAX_ENTRIES)
        bat = meta = None
        seen = []
        for i in range(count):
            e = REGION_TABLE_ENTRY.unpack(buf, 16 + 32 * i)
            guid, off, length, required = e["guid"], e["file_offset"], e["length"], e["required"]
            if off % MiB or length % MiB or off < MiB:
                raise CorruptImage("VHDX region %d (offset %u, length %u) is not 1 MiB aligned" % (i, off, length))
            # (qemu-img 7.2 does not look: a region past the end reads as zeros)
            if self.strict and off + length > self.file_size:
                raise CorruptImage("VHDX region %d (offset %u, length %u) lies beyond the end of the file"
                                   % (i, off, length))
            for (o2, l2) in seen:
                if off < o2 + l2 and o2 < off + length:
                    raise CorruptImage("VHDX regions overlap (offset %u and %u)" % (off, o2))
            seen.append((off, length))
            if guid == BAT_GUID:
                if bat is not None:
                    raise CorruptImage("VHDX region table has two BAT entries")
                bat = (off, length)
            elif guid == METADATA_GUID:
                if meta is not None:
                    raise CorruptImage("VHDX region table has two metadata entries")
                meta = (off, length)
            elif required & 1:
                raise Unsupported("Operation not supported")
        if bat is None or meta is None:
            raise CorruptImage("VHDX region table lacks the %s region" % ("BAT" if bat is None else "metadata"))
        self.bat_offset, self.bat_length = bat
        self.meta_offset, self.meta_length = meta
        self.regions = seen

    def _read_metadata(self) -> None:
        mlen = min(self.meta_length, VHDX_METADATA_TABLE_MAX_SIZE)
        buf = self.store.pread_full(self.meta_offset, mlen)
        mh = METADATA_TABLE_HEADER.unpack(buf)
        sig, count = mh["signature"], mh["entry_count"]
        if sig != b"metadata":
            if not self.strict:  # qemu-img 7.2 says no more than this
                raise CorruptImage(f"Could not open '{self.filename}': Invalid argument")
            raise CorruptImage("Invalid VHDX metadata table signature")
        check_limit("VHDX metadata entry count", count, VHDX_MAX_ENTRIES)
        items = {}
        for i in range(count):
            e = METADATA_TABLE_ENTRY.unpack(buf, 32 + 32 * i)
            item, off, length, flags = e["item_id"], e["offset"], e["length"], e["flags"]
            if length == 0:
                continue
            if off < VHDX_METADATA_TABLE_MAX_SIZE or off + length > self.meta_length:
                raise CorruptImage("VHDX metadata item %d (offset %u, length %u) lies outside the metadata region"
                                   % (i, off, length))
            check_limit("VHDX metadata item length", length, MiB)
            if item in items:
                raise CorruptImage("VHDX metadata item %d appears twice" % i)
            known = (FILE_PARAMETERS_GUID, VIRTUAL_DISK_SIZE_GUID, PAGE83_DATA_GUID, LOGICAL_SECTOR_SIZE_GUID,
                     PHYSICAL_SECTOR_SIZE_GUID, PARENT_LOCATOR_GUID)
            if item not in known:
                if flags & 4:
                    raise Unsupported("Operation not supported")
                continue
            items[item] = self.store.pread_full(self.meta_offset + off, length)
        for req in (FILE_PARAMETERS_GUID, VIRTUAL_DISK_SIZE_GUID, LOGICAL_SECTOR_SIZE_GUID,
                    PHYSICAL_SECTOR_SIZE_GUID):
            if req not in items or len(items[req]) < (8 if req == FILE_PARAMETERS_GUID or
                                                      req == VIRTUAL_DISK_SIZE_GUID else 4):
                raise CorruptImage("VHDX metadata lacks a required item")
        params = FILE_PARAMETERS.unpack(items[FILE_PARAMETERS_GUID])
        block_size, fflags = params["block_size"], params["flags"]
        if fflags & 2:
            # differencing images (a parent) are not supported, as in qemu-img 7.2
            raise Unsupported("Operation not supported")
        if block_size < VHDX_MIN_BLOCK_SIZE or block_size > VHDX_MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise CorruptImage("VHDX block size %u is invalid (power of two from 1 MiB to 256 MiB)" % block_size)
        vsize = struct.unpack_from("<Q", items[VIRTUAL_DISK_SIZE_GUID])[0]
        check_limit("VHDX virtual disk size", vsize, VHDX_MAX_IMAGE_SIZE)
        lss = struct.unpack_from("<I", items[LOGICAL_SECTOR_SIZE_GUID])[0]
        pss = struct.unpack_from("<I", items[PHYSICAL_SECTOR_SIZE_GUID])[0]
        if lss not in (512, 4096):
            raise CorruptImage("VHDX logical sector size %u is invalid" % lss)
        if pss not in (512, 4096):
            raise CorruptImage("VHDX physical sector size %u is invalid" % pss)
        if vsize % lss:
            raise CorruptImage("VHDX virtual disk size %u is not a multiple of the sector size %u" % (vsize, lss))
        self.block_size = block_size
        self.leave_blocks_allocated = bool(fflags & 1)
        self.logical_sector_size = lss
        self.physical_sector_size = pss
        self.virtual_size = vsize
        self.chunk_ratio = (1 << 23) * lss // block_size
        self.data_blocks = (vsize + block_size - 1) // block_size
        self.bat_entries = self.data_blocks + (self.data_blocks - 1) // self.chunk_ratio if self.data_blocks else 0
        self.charge("VHDX block allocation table", self.bat_entries * 8)
        if self.bat_entries * 8 > self.bat_length:
            raise CorruptImage("VHDX BAT region (%u bytes) is too small for %u entries"
                               % (self.bat_length, self.bat_entries))

    def _load_bat(self):
        if self._bat is not None:
            return self._bat
        raw = self.store.pread_full(self.bat_offset, self.bat_entries * 8)
        if self.bat_entries <= self.SMALL_BAT_ENTRIES:
            # array('Q') / array('q') tables: no numpy import for a small image (it costs more than the walk)
            from array import array

            bat = uint_table(raw, 8)
            ratio = self.chunk_ratio
            pidx = array("q", (i + i // ratio for i in range(self.data_blocks)))
            present = (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT)
            offs = array("q", ((bat[b] & VHDX_BAT_FILE_OFF_MASK) if bat[b] & VHDX_BAT_STATE_BIT_MASK in present
                               else -1 for b in pidx))
            self._pidx = pidx
            self._block_off = offs
            self._bat_dirty = set()
            self._bat = bat
            return bat
        import numpy as np

        bat = np.frombuffer(raw, "<u8").copy()
        states = bat & VHDX_BAT_STATE_BIT_MASK
        # payload entries only: drop every (chunk_ratio+1)-th (sector bitmap) entry
        idx = np.arange(self.data_blocks, dtype=np.int64)
        pidx = idx + idx // self.chunk_ratio
        pay = bat[pidx]
        pstates = states[pidx]
        present = (pstates == PAYLOAD_BLOCK_FULLY_PRESENT) | (pstates == PAYLOAD_BLOCK_PARTIALLY_PRESENT)
        offs = (pay & np.uint64(VHDX_BAT_FILE_OFF_MASK)).astype(np.int64)
        self._pidx = pidx
        # per payload block: host offset, or -1 where the block reads as zeros
        self._block_off = np.where(present, offs, -1)
        self._bat_dirty = set()
        self._bat = bat  # last: reader threads take a set _bat to mean the tables above are ready
        return bat

    #: up to this many BAT entries the open-time validation runs without numpy (keeps ``info`` fast)
    SMALL_BAT_ENTRIES = SMALL_BAT_ENTRIES

    @property
    def cluster_size(self) -> int:
        return self.block_size

    @property
    def has_zero_init(self) -> bool:
        return True

    # ----- read side -----
    def block_status(self, offset: int, length: int) -> Extent:
        # qemu 7.2's vhdx driver has no block status: the whole range reads as allocated data
        end = min(offset + length, self.virtual_size)
        return Extent(offset, end - offset, data=True, zero=False, present=True)

    def plain_host_file(self, start: int, end: int):
        """(fd, host offset of ``start``) when [start, end) lies in contiguously stored blocks (copy offload)."""
        fd = getattr(self.store, "fd", -1)
        if fd is None or fd < 0 or getattr(self.store, "is_block", True) or end > self.virtual_size or end <= start:
            return None
        self._load_bat()
        bs = self.block_size
        idx, last = start // bs, (end - 1) // bs
        if last - idx > 64:
            return None
        offs = self._block_off
        host = int(offs[idx])
        if host < 0:
            return None
        for i in range(idx + 1, last + 1):
            if int(offs[i]) != host + (i - idx) * bs:
                return None
        return fd, host + (start - idx * bs)

    def readinto(self, offset: int, buf) -> None:
        self._load_bat()
        view = memoryview(buf).cast("B")
        total = len(view)
        bs = self.block_size
        offs = self._block_off
        pos = 0
        while pos < total:
            off = offset + pos
            if off >= self.virtual_size:
                _fill_zero(view[pos:])
                return
            idx = off // bs
            in_block = off - idx * bs
            n = min(bs - in_block, total - pos, self.virtual_size - off)
            host = int(offs[idx])
            sub = view[pos:pos + n]
            if host < 0:
                _fill_zero(sub)
            else:
                # extend over blocks that follow contiguously on the host
                nidx = idx + 1
                while pos + n < total and nidx < len(offs) and int(offs[nidx]) == host - in_block + (nidx - idx) * bs:
                    n = min(n + bs, total - pos, self.virtual_size - off)
                    nidx += 1
                sub = view[pos:pos + n]
                self.read_host(self.store, host + in_block, sub)
            pos += n


    # ----- write side -----
    def _update_headers(self) -> None:
        """Before the first change: new write GUIDs in both header slots (as qemu does on a writable open)."""
        if self._headers_updated:
            return
        self._headers_updated = True
        h = dict(self.header)
        h["file_write_guid"] = uuid.uuid4().bytes_le
        h["data_write_guid"] = uuid.uuid4().bytes_le
        for _ in range(2):
            h["seq"] += 1
            slot = 1 - self.header_slot
            self.store.pwrite(VHDX_HEADER2_OFFSET if slot else VHDX_HEADER1_OFFSET, _pack_header(h))
            self.header_slot = slot
        self.header = h

    def pwrite(self, offset: int, data) -> None:
        self._load_bat()
        view = memoryview(data).cast("B")
        total = len(view)
        if offset + total > self.virtual_size:
            raise QimgError("Cannot write beyond the end of the image")
        self._update_headers()
        bs = self.block_size
        offs = self._block_off
        pos = 0
        while pos < total:
            off = offset + pos
            idx = off // bs
            in_block = off - idx * bs
            n = min(bs - in_block, total - pos)
            host = int(offs[idx])
            if host < 0:
                host = self._allocate(idx)
            # extend over blocks that are (or can be made) contiguous on the host
            nidx = idx + 1
            while pos + n < total and nidx < len(offs):
                h2 = int(offs[nidx])
                want = host + (nidx - idx) * bs
                if h2 < 0 and self._file_end == want:
                    h2 = self._allocate(nidx)
                if h2 != want:
                    break
                n += min(bs, total - pos - n)
                nidx += 1
            self.store.pwrite(host + in_block, view[pos:pos + n])
            pos += n

    def _allocate(self, idx: int) -> int:
        """A new block at the end of the file (1 MiB aligned); it reads as zeros until written."""
        host = (self._file_end + MiB - 1) // MiB * MiB
        self._file_end = host + self.block_size
        self._block_off[idx] = host
        b = int(self._pidx[idx])
        self._bat[b] = host | PAYLOAD_BLOCK_FULLY_PRESENT
        self._bat_dirty.add(b)
        return host

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        self._load_bat()
        bs = self.block_size
        for pos, nxt in split_at(offset, offset + length, bs):
            if int(self._block_off[pos // bs]) >= 0:  # allocated: unallocated blocks read as zeros
                super().write_zeroes(pos, nxt - pos, may_unmap)

    def write_metadata(self) -> None:
        if self.store is None or not self.writable:
            return
        if not self._bat_dirty:
            return
        if self.store.size() < self._file_end:
            self.store.truncate(self._file_end)
        # write each run of dirty entries in one go (aligned to 4 KiB pages of the BAT)
        pages = sorted({d // 512 for d in self._bat_dirty})
        self._bat_dirty = set()
        start = 0
        while start < len(pages):
            stop = start
            while stop + 1 < len(pages) and pages[stop + 1] == pages[stop] + 1:
                stop += 1
            a = int(pages[start]) * 512
            b = min((int(pages[stop]) + 1) * 512, len(self._bat))
            self.store.pwrite(self.bat_offset + a * 8, uint_table_bytes(self._bat[a:b], 8))
            start = stop + 1

    # ----- check -----
    def check(self, repair: str | None = None):
        """qemu's vhdx check (see check.py)."""
        from .check import check_image

        return check_image(self, repair)

    # ----- create -----
    @classmethod
    def create(cls, filename: str, opts: CreateOptions, opener) -> None:
        from .create import create

        create(filename, opts, opener)

    @classmethod
    def format_line_options(cls, opts: CreateOptions) -> list[tuple[str, str]]:
        from .create import format_line_options

        return format_line_options(opts)
