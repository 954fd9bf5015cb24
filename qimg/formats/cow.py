"""cow: User Mode Linux copy-on-write overlays (the "COW" files of the ubd driver).

References:
  - The UML COW file layout (Linux arch/um/drivers, cow_user.c header descriptions and
    the ubd documentation): magic 0x4f4f4f4d ("MOOO"); version 1 (host-endian: magic,
    version, backing_file[256], mtime u32, size u64, sectorsize s32 = 280 bytes), version 2
    (big-endian, backing_file[4096]: 4120 bytes), version 3 (big-endian: magic, version,
    mtime u32, size u64, sectorsize, alignment, cow_format, backing_file[4096] = 4128
    bytes, packed).  Then a bitmap with one bit per sector (least significant bit first;
    set = the sector lives in this file), then the data area where sector n sits at
    data_offset + n * sectorsize.
  - Sizes: versions 1 and 2 keep the bitmap right after the header, bitmap_len =
    (size + sectorsize - 1) / (8 * sectorsize), data_offset = bitmap end rounded up to a
    sector; version 3 puts the bitmap at the header size rounded up to ``alignment``,
    bitmap_len = ceil(ceil(size / sectorsize) / 8), data_offset = bitmap end rounded up to
    ``alignment``.  The "broken" 64-bit version 3 layout (8-byte mtime plus padding) is
    recognised by its shifted cow_format field.
  - qemu-img 7.2 has no cow driver; qimg writes version 3 headers (512-byte sectors,
    4 KiB alignment, the backing file's mtime and size) and stores the backing name as
    given, resolved relative to the image like other formats.
"""

from __future__ import annotations

import os
import struct

from ..core.driver import BackingRef, CreateOptions, Driver, c_string
from ..core.extent import Extent
from ..errors import CorruptImage, OpenError, QimgError, check_limit
from ..options import BACKING_FILE_OPT, BACKING_FMT_OPT, SIZE_OPT
from ..units import round_up

COW_MAGIC = 0x4F4F4F4D
COW_VERSION = 3
COW_BITMAP = 0
PATH_LEN_V1 = 256
PATH_LEN_V3 = 4096
V1 = struct.Struct("<II256sIQi")          # host-endian (x86) version 1
V1_BE = struct.Struct(">II256sIQi")
V2 = struct.Struct(">II4096sIQi")
V3 = struct.Struct(">IIIQIII4096s")
V3_BROKEN = struct.Struct(">IIqQIII4096s")  # 64-bit mtime and padding, old 64-bit builds
DEFAULT_ALIGNMENT = 4096
SECTOR = 512

#: named limits for values read from an image
MIN_SECTOR_SIZE, MAX_SECTOR_SIZE = 512, 1 << 16
MAX_ALIGNMENT = 1 << 20
MAX_VIRTUAL_SIZE = (1 << 63) - 1
MAX_STATUS_SECTORS = 1 << 16        # sectors inspected per block_status call


class CowDriver(Driver):
    """UML COW overlay: a sector bitmap over a backing file."""

    format_name = "cow"
    supports_backing = True
    create_opts = (
        SIZE_OPT,
        BACKING_FILE_OPT,
        BACKING_FMT_OPT,
    )

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) < 8:
            return 0
        be = struct.unpack_from(">II", head)
        le = struct.unpack_from("<II", head)
        if be[0] == COW_MAGIC and be[1] in (1, 2, 3) or le == (COW_MAGIC, 1):
            return 100
        return 0

    def _open(self, options: dict) -> None:
        head = self.store.pread_full(0, V3.size + 8)
        be = struct.unpack_from(">II", head)
        le = struct.unpack_from("<II", head)
        if le == (COW_MAGIC, 1):
            _m, _v, name, mtime, size, ss = V1.unpack_from(head)
            version, align, bitmap_off = 1, ss, V1.size
        elif be[0] != COW_MAGIC:
            raise OpenError("Image not in cow format")
        elif be[1] == 1:
            _m, _v, name, mtime, size, ss = V1_BE.unpack_from(head)
            version, align, bitmap_off = 1, ss, V1.size
        elif be[1] == 2:
            _m, _v, name, mtime, size, ss = V2.unpack_from(head)
            version, align, bitmap_off = 2, ss, V2.size
        elif be[1] == 3:
            _m, _v, mtime, size, ss, align, fmt, name = V3.unpack_from(head)
            if fmt != COW_BITMAP:
                # the unpacked 64-bit layout moves cow_format onto the first bytes of the name
                first_fmt = fmt
                _m, _v, mtime, size, ss, align, fmt, name = V3_BROKEN.unpack_from(head)
                if fmt != COW_BITMAP:
                    raise CorruptImage(f"cow format {first_fmt} is not supported")
            version = 3
            check_limit("cow alignment", align, MAX_ALIGNMENT, "cow header")
            if align == 0:
                raise CorruptImage("cow alignment must not be zero")
            bitmap_off = round_up(V3.size, align)
        else:
            raise OpenError(f"Unsupported cow version {be[1]}")
        if ss < MIN_SECTOR_SIZE or ss & (ss - 1):
            raise CorruptImage(f"cow sector size {ss} is not a power of two of at least {MIN_SECTOR_SIZE}")
        check_limit("cow sector size", ss, MAX_SECTOR_SIZE, "cow header")
        check_limit("cow disk size", size, MAX_VIRTUAL_SIZE, "cow header")
        self.version = version
        self.sector_bytes = ss
        self.mtime = mtime
        if version < 3:
            bitmap_len = (size + ss - 1) // (8 * ss)
            data_off = round_up(bitmap_off + bitmap_len, ss)
        else:
            bitmap_len = ((size + ss - 1) // ss + 7) // 8
            data_off = round_up(bitmap_off + bitmap_len, align)
        self.bitmap_off = bitmap_off
        self.bitmap_len = bitmap_len
        self.data_off = data_off
        # sectors beyond the bitmap (the v1/v2 rounding) never live in this file
        self.bitmap_sectors = bitmap_len * 8
        self.virtual_size = round_up(size, SECTOR)
        name = c_string(name)
        if name:
            self.backing = BackingRef(name, None)

    # ----- metadata -----
    def info_extra(self) -> dict:
        return {"dirty-flag": None}

    @property
    def has_zero_init(self) -> bool:
        return self.backing is None

    def _bits(self, first: int, count: int):
        """Bitmap bits of sectors [first, first+count) as a numpy bool array."""
        import numpy as np

        # bitmap bytes past the end of the file read as zeros: stop there (callers treat the rest as unallocated)
        stored = max(0, self.store.size() - self.bitmap_off) * 8
        count = max(0, min(count, self.bitmap_sectors - first, stored - first))
        if count == 0:
            return np.zeros(0, dtype=bool)
        b0 = first // 8
        b1 = (first + count + 7) // 8
        raw = np.frombuffer(self.store.pread_full(self.bitmap_off + b0, b1 - b0), dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little")
        return bits[first - b0 * 8:first - b0 * 8 + count].astype(bool)

    # ----- read side -----
    def block_status(self, offset: int, length: int) -> Extent:
        import numpy as np

        ss = self.sector_bytes
        end = min(offset + length, self.virtual_size)
        s0 = offset // ss
        s1 = min((end + ss - 1) // ss, s0 + MAX_STATUS_SECTORS)
        bits = self._bits(s0, s1 - s0)
        if len(bits) == 0:
            return Extent(offset, end - offset, data=False, zero=True, present=False)
        first = bool(bits[0])
        change = np.nonzero(bits != first)[0]
        run = int(change[0]) if len(change) else len(bits)
        n = min(end, (s0 + run) * ss) - offset
        if len(bits) < s1 - s0 and not len(change) and not first:
            n = end - offset
        if first:
            return Extent(offset, n, data=True, zero=False, present=True, offset=self.data_off + offset)
        return Extent(offset, n, data=False, zero=True, present=False)


    # ----- write side -----
    def pwrite(self, offset: int, data) -> None:
        if not self.writable:
            raise QimgError("Image is read-only")
        import numpy as np

        data = memoryview(data).cast("B")
        end = offset + len(data)
        if end > self.virtual_size:
            raise QimgError(f"Cannot write beyond the end of the image ({end} > {self.virtual_size})")
        if not data:
            return
        ss = self.sector_bytes
        s0, s1 = offset // ss, (end + ss - 1) // ss
        if s1 > self.bitmap_sectors:
            raise CorruptImage("cow bitmap does not cover the write")
        head, tail = offset - s0 * ss, s1 * ss - end
        if head or tail:
            # sectors are the unit of copy-on-write: complete partial ones from the current view
            pre = self._sector_view(s0)[:head] if head else b""
            post = self._sector_view(s1 - 1)[ss - tail:] if tail else b""
            data = memoryview(b"".join((pre, data, post)))
        # data first, then the bitmap that makes it visible
        self.store.pwrite(self.data_off + s0 * ss, data)
        b0, b1 = s0 // 8, (s1 + 7) // 8
        raw = np.frombuffer(self.store.pread_full(self.bitmap_off + b0, b1 - b0), dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little")
        bits[s0 - b0 * 8:s1 - b0 * 8] = 1
        self.store.pwrite(self.bitmap_off + b0, np.packbits(bits, bitorder="little").tobytes())

    def _sector_view(self, sector: int) -> bytes:
        ss = self.sector_bytes
        bits = self._bits(sector, 1)
        if len(bits) and bits[0]:
            return self.store.pread_full(self.data_off + sector * ss, ss)
        return self.read_below(sector * ss, ss)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        end = min(offset + length, self.virtual_size)
        pos = offset
        while pos < end:
            ext = self.block_status(pos, end - pos)
            if ext.present or self.backing is not None:
                cur = pos
                while cur < pos + ext.length:
                    m = min(1 << 20, pos + ext.length - cur)
                    self.pwrite(cur, bytes(m))
                    cur += m
            pos += ext.length

    def make_empty(self) -> None:
        zero = bytes(min(self.bitmap_len, 1 << 20))
        for pos in range(0, self.bitmap_len, max(len(zero), 1)):
            self.store.pwrite(self.bitmap_off + pos, zero[:self.bitmap_len - pos])
        self.store.truncate(self.data_off)

    def set_backing(self, filename: str | None, fmt: str | None) -> None:
        name = (filename or "").encode()
        limit = PATH_LEN_V1 if self.version == 1 else PATH_LEN_V3
        if len(name) >= limit:
            raise QimgError("Backing file name too long")
        field = {1: 8, 2: 8, 3: V3.size - PATH_LEN_V3}[self.version]
        self.store.pwrite(field, name.ljust(limit, b"\0"))
        self.backing = BackingRef(filename, None) if name else None

    # ----- create -----
    @classmethod
    def create(cls, filename: str, opts: CreateOptions, opener) -> None:
        name = (opts.backing_file or "").encode()
        if len(name) >= PATH_LEN_V3:
            raise QimgError("Backing file name too long")
        mtime = 0
        if opts.backing_file:
            try:
                mtime = int(os.stat(opener.backing_path(opts.backing_file)).st_mtime) & 0xFFFFFFFF
            except OSError:
                mtime = 0
        size = opts.size or 0
        align = DEFAULT_ALIGNMENT
        bitmap_off = round_up(V3.size, align)
        bitmap_len = ((size + SECTOR - 1) // SECTOR + 7) // 8
        data_off = round_up(bitmap_off + bitmap_len, align)
        hdr = V3.pack(COW_MAGIC, COW_VERSION, mtime, size, SECTOR, align, COW_BITMAP, name)
        with opener.open_file(filename, writable=True, create=True) as store:
            store.pwrite(0, hdr)
            store.truncate(data_off)

    @classmethod
    def format_line_options(cls, opts: CreateOptions) -> list[tuple[str, str]]:
        out = [("size", str(opts.size or 0))]
        if opts.backing_file:
            out.append(("backing_file", opts.backing_file))
        if opts.backing_fmt:
            out.append(("backing_fmt", opts.backing_fmt))
        return out
