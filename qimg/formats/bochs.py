"""bochs: Bochs growing ("redolog") disk images, read-only.

References:
  - Bochs documentation, "Disk image formats" / redolog header (bximage): a 512-byte
    little-endian header (magic "Bochs Virtual HD Image", type "Redolog", subtype
    "Growing", version 0x00010000 or 0x00020000, header size, catalog entries, bitmap
    size, extent size, then the disk size: at offset 84 in version 1 and at offset 88
    (after a reserved word) in version 2), the catalog of 32-bit extent numbers
    (0xffffffff = not allocated) right after the header, then per allocated extent a
    bitmap (one bit per 512-byte sector, least significant bit first) followed by the
    extent's sectors.
  - Observed qemu-img 7.2 behaviour: only "Growing" redologs open; the whole image is
    reported as data by ``map``; ``info`` prints no cluster size and no dirty flag.
"""

from __future__ import annotations

import struct

from ..core.driver import Driver
from ..errors import CorruptImage, OpenError, check_limit

HEADER_MAGIC = b"Bochs Virtual HD Image"
REDOLOG_TYPE = b"Redolog"
GROWING_TYPE = b"Growing"
HEADER_V1 = 0x00010000
HEADER_VERSION = 0x00020000
HEADER_SIZE = 512
BOCHS_UNALLOCATED = 0xFFFFFFFF
SECTOR = 512

#: named limits for values read from an image
MAX_CATALOG_ENTRIES = 1 << 24          # 64 MiB of catalog
MAX_EXTENT_BYTES = 1 << 30
MAX_BITMAP_BYTES = 1 << 24
MAX_HEADER_BYTES = 1 << 20


def _cstr(b: bytes) -> bytes:
    return b.split(b"\0", 1)[0]


class BochsDriver(Driver):
    """Read-only Bochs growing images."""

    format_name = "bochs"

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) < HEADER_SIZE:
            return 0
        if _cstr(head[:32]) == HEADER_MAGIC and _cstr(head[32:48]) == REDOLOG_TYPE and \
                _cstr(head[48:64]) == GROWING_TYPE and struct.unpack_from("<I", head, 64)[0] in (HEADER_V1,
                                                                                                 HEADER_VERSION):
            return 100
        return 0

    def _open(self, options: dict) -> None:
        if self.writable:
            raise OpenError("Driver 'bochs' can only be used for read-only devices")
        h = self.store.pread_full(0, HEADER_SIZE)
        if not self.probe(h, self.filename):
            raise OpenError("Image not in Bochs format")
        version, header, catalog, bitmap, extent = struct.unpack_from("<IIIII", h, 64)
        if version == HEADER_V1:
            disk = struct.unpack_from("<Q", h, 84)[0]
        else:
            disk = struct.unpack_from("<Q", h, 88)[0]
        check_limit("bochs header size", header, MAX_HEADER_BYTES, "bochs header")
        check_limit("bochs catalog entries", catalog, MAX_CATALOG_ENTRIES, "bochs header")
        check_limit("bochs extent size", extent, MAX_EXTENT_BYTES, "bochs header")
        check_limit("bochs bitmap size", bitmap, MAX_BITMAP_BYTES, "bochs header")
        self.charge("bochs catalog", catalog * 4)
        if extent < SECTOR or extent % SECTOR:
            raise CorruptImage(f"Extent size {extent} must be a non-zero multiple of {SECTOR}")
        if bitmap == 0 or bitmap * 8 < extent // SECTOR:
            raise CorruptImage(f"bochs bitmap size {bitmap} cannot describe an extent of {extent} bytes")
        if disk > catalog * extent:
            raise CorruptImage("Catalog size is too small for this disk size")
        if header + 4 * catalog > self.store.size():
            raise CorruptImage("bochs catalog extends past the end of the file")
        self.virtual_size = disk // SECTOR * SECTOR
        self.catalog_offset = header
        self.catalog_entries = catalog
        self._catalog = None  # loaded on first read: info needs no table (and no numpy)
        self.extent_bytes = extent
        self.data_offset = header + 4 * catalog
        self.bitmap_blocks = 1 + (bitmap - 1) // SECTOR
        self.extent_blocks = 1 + (extent - 1) // SECTOR

    @property
    def catalog(self):
        if self._catalog is None:
            import numpy as np

            raw = self.store.pread_full(self.catalog_offset, 4 * self.catalog_entries)
            self._catalog = np.frombuffer(raw, dtype="<u4").copy()
        return self._catalog

    def info_extra(self) -> dict:
        return {"dirty-flag": None}

    def readinto(self, offset: int, buf) -> None:
        """Copy the runs of allocated sectors of each extent; everything else reads as zeros."""
        import numpy as np

        view = memoryview(buf).cast("B")
        total = len(view)
        pos = 0
        ext = self.extent_bytes
        while pos < total:
            off = offset + pos
            idx, within = divmod(off, ext)
            n = min(ext - within, total - pos)
            sub = view[pos:pos + n]
            block = int(self.catalog[idx]) if idx < len(self.catalog) else BOCHS_UNALLOCATED
            if block == BOCHS_UNALLOCATED:
                sub[:] = bytes(n)
            else:
                base = self.data_offset + SECTOR * block * (self.extent_blocks + self.bitmap_blocks)
                if self.strict:  # qemu-img reads an extent past the end of the file as zeros
                    self.check_host(self.store, base, 1, off, "catalog entry at host offset")
                s0 = within // SECTOR
                s1 = (within + n + SECTOR - 1) // SECTOR
                bits = np.unpackbits(np.frombuffer(self.store.pread_full(base + s0 // 8, (s1 + 7) // 8 - s0 // 8),
                                                   dtype=np.uint8), bitorder="little")
                bits = bits[s0 % 8:s0 % 8 + (s1 - s0)]
                data = bytearray(self.store.pread_full(base + SECTOR * (self.bitmap_blocks + s0), (s1 - s0) * SECTOR))
                arr = np.frombuffer(data, dtype=np.uint8).reshape(s1 - s0, SECTOR)
                arr[bits == 0] = 0
                head = within - s0 * SECTOR
                sub[:] = data[head:head + n]
            pos += n

