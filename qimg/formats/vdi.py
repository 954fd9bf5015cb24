"""vdi: VirtualBox Disk Image, dynamic and static (fixed).

References:
  - VirtualBox source, include/VBox/vd-vdi.h / "VDI image header" (VDIPREHEADER + VDIHEADER1PLUS):
    a 64-byte text line, signature 0xbeda107f, version 1.1, header size 0x180, image type
    (1 = normal/dynamic, 2 = fixed/static), block map offset and data offset, legacy
    geometry, sector size 512, disk size, block size (1 MiB), blocks in image, blocks
    allocated and four UUIDs (image, last snapshot, link, parent).
  - Block map: one little-endian u32 per block, the index of the block in the data area;
    VDI_IMAGE_BLOCK_FREE (0xffffffff) reads as zeros, VDI_IMAGE_BLOCK_ZERO (0xfffffffe)
    reads as zeros too (discarded block).
  - qemu-img 7.2's observed behaviour: block size 1 MiB only, bmap at 512, data after
    the block map rounded up to 512, blocks allocated in write order, no differencing images,
    `check` without repair (``check -r`` exits 63), create options size/static (+ the file
    protocol's preallocation).

Writes allocate blocks at the end of the data area in the order they are first written;
the block map and header counter are written back on flush/close (one write per table).
"""

from __future__ import annotations

import struct
import uuid

from ..core.driver import CreateOptions, Driver
from ..core.extent import Extent, split_at
from ..errors import CorruptImage, OpenError, QimgError
from ..options import SIZE_OPT, OptSpec, parse_bool
from ..units import round_up
from .blockmap import SMALL_TABLE, uint_table, uint_table_bytes, zero_stale

SECTOR = 512
VDI_SIGNATURE = 0xBEDA107F
VDI_VERSION_1_1 = 0x00010001
VDI_TYPE_DYNAMIC = 1
VDI_TYPE_STATIC = 2
VDI_IMAGE_BLOCK_FREE = 0xFFFFFFFF
VDI_IMAGE_BLOCK_ZERO = 0xFFFFFFFE
VDI_UNALLOCATED = VDI_IMAGE_BLOCK_FREE
DEFAULT_BLOCK_SIZE = 1 << 20
#: the block map must fit in a signed 32-bit byte count (qemu's limit)
VDI_BLOCKS_IN_IMAGE_MAX = 0x1FFFFF80
VDI_DISK_SIZE_MAX = VDI_BLOCKS_IN_IMAGE_MAX * DEFAULT_BLOCK_SIZE
VDI_TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"

# the 512-byte header (pre-header + header v1.1), little endian
_HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s56s")


def _hdr_dict(buf: bytes) -> dict:
    (text, signature, version, header_size, image_type, image_flags, description, offset_bmap, offset_data,
     cylinders, heads, sectors, sector_size, _unused1, disk_size, block_size, block_extra, blocks_in_image,
     blocks_allocated, uuid_image, uuid_last_snap, uuid_link, uuid_parent, _unused2) = _HEADER.unpack(buf)
    return dict(text=text, signature=signature, version=version, header_size=header_size, image_type=image_type,
                image_flags=image_flags, description=description, offset_bmap=offset_bmap,
                offset_data=offset_data, cylinders=cylinders, heads=heads, sectors=sectors,
                sector_size=sector_size, disk_size=disk_size, block_size=block_size, block_extra=block_extra,
                blocks_in_image=blocks_in_image, blocks_allocated=blocks_allocated, uuid_image=uuid_image,
                uuid_last_snap=uuid_last_snap, uuid_link=uuid_link, uuid_parent=uuid_parent)


def _pack_header(h: dict) -> bytes:
    return _HEADER.pack(h["text"], h["signature"], h["version"], h["header_size"], h["image_type"],
                        h["image_flags"], h["description"], h["offset_bmap"], h["offset_data"], h["cylinders"],
                        h["heads"], h["sectors"], h["sector_size"], 0, h["disk_size"], h["block_size"],
                        h["block_extra"], h["blocks_in_image"], h["blocks_allocated"], h["uuid_image"],
                        h["uuid_last_snap"], h["uuid_link"], h["uuid_parent"], bytes(56))


class VdiDriver(Driver):
    """A VirtualBox VDI image (dynamic or static)."""

    format_name = "vdi"
    create_opts = (
        SIZE_OPT,
        OptSpec("static", "bool", "VDI static (pre-allocated) image"),
    )

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) < 72:
            return 0
        if struct.unpack_from("<I", head, 64)[0] == VDI_SIGNATURE:
            return 100
        return 0

    # ----- open -----
    def _open(self, options: dict) -> None:
        buf = self.store.pread(0, SECTOR)
        if len(buf) < SECTOR:
            raise OpenError("Could not read VDI header: image is truncated" if buf else
                            "Image not in VDI format (bad signature 00000000)")
        h = _hdr_dict(buf)
        if h["signature"] != VDI_SIGNATURE:
            raise OpenError("Image not in VDI format (bad signature %08x)" % h["signature"])
        if h["version"] != VDI_VERSION_1_1:
            raise OpenError("unsupported VDI image (version %u.%u)" % (h["version"] >> 16, h["version"] & 0xFFFF))
        if h["disk_size"] % SECTOR:
            # VBoxManage convertfromraw may record an unaligned size; qemu rounds it up
            h["disk_size"] = round_up(h["disk_size"], SECTOR)
        if h["offset_bmap"] % SECTOR:
            raise CorruptImage("unsupported VDI image (unaligned block map offset 0x%x)" % h["offset_bmap"])
        if h["offset_data"] % SECTOR:
            raise CorruptImage("unsupported VDI image (unaligned data offset 0x%x)" % h["offset_data"])
        if h["sector_size"] != SECTOR:
            raise CorruptImage("unsupported VDI image (sector size %u is not %u)" % (h["sector_size"], SECTOR))
        if h["block_size"] != DEFAULT_BLOCK_SIZE:
            raise CorruptImage("unsupported VDI image (block size %u is not %u)"
                               % (h["block_size"], DEFAULT_BLOCK_SIZE))
        if h["disk_size"] > VDI_DISK_SIZE_MAX:
            raise CorruptImage("Unsupported VDI image size (size is 0x%x, max supported is 0x%x)"
                               % (h["disk_size"], VDI_DISK_SIZE_MAX))
        if h["disk_size"] > h["blocks_in_image"] * h["block_size"]:
            raise CorruptImage("unsupported VDI image (disk size %u, image bitmap has room for %u)"
                               % (h["disk_size"], h["blocks_in_image"] * h["block_size"]))
        if h["uuid_link"] != bytes(16):
            raise CorruptImage("unsupported VDI image (non-NULL link UUID)")
        if h["uuid_parent"] != bytes(16):
            raise CorruptImage("unsupported VDI image (non-NULL parent UUID)")
        if h["blocks_in_image"] > VDI_BLOCKS_IN_IMAGE_MAX:
            raise CorruptImage("unsupported VDI image (too many blocks %u, max is %u)"
                               % (h["blocks_in_image"], VDI_BLOCKS_IN_IMAGE_MAX))
        bmap_bytes = h["blocks_in_image"] * 4
        if h["offset_bmap"] < SECTOR:
            raise CorruptImage("unsupported VDI image (block map offset 0x%x overlaps the header)" % h["offset_bmap"])
        if h["offset_bmap"] + bmap_bytes > h["offset_data"] and h["blocks_in_image"]:
            raise CorruptImage("unsupported VDI image (block map at 0x%x overlaps the data at 0x%x)"
                               % (h["offset_bmap"], h["offset_data"]))
        self.header = h
        self.block_size = h["block_size"]
        self.virtual_size = h["disk_size"]
        self.bmap = None  # loaded on first use: info needs only the header
        self._open_size = self.store.size()
        self._runs = None
        self._bmap_dirty = False
        self._header_dirty = False
        self._file_end = 0

    def _load_bmap(self):
        if self.bmap is not None:
            return self.bmap
        h = self.header
        n = h["blocks_in_image"]
        # a block map claimed past the end of the file is refused before any buffer is sized for it
        if h["offset_bmap"] + n * 4 > self.store.size():
            raise CorruptImage("Could not read VDI block map: image is truncated")
        self.charge("VDI block map", n * 4)
        raw = self.store.pread(h["offset_bmap"], n * 4)
        if len(raw) < n * 4:
            raise CorruptImage("Could not read VDI block map: image is truncated")
        bmap = uint_table(raw, 4)
        top, bad = -1, None  # the highest allocated entry; the first entry past the image's blocks
        if n > SMALL_TABLE:
            import numpy as np

            v = np.frombuffer(bmap, np.uint32)
            allocated = v < VDI_IMAGE_BLOCK_ZERO
            if allocated.any():
                top = int(v[allocated].max())
                if top >= n:
                    bad = int(np.flatnonzero(allocated & (v >= n))[0])
            del v
        else:
            for i, e in enumerate(bmap):
                if e < VDI_IMAGE_BLOCK_ZERO and e > top:
                    top = e
                    if e >= n and bad is None:
                        bad = i
        if bad is not None:
            raise CorruptImage("VDI block map entry %u points to block %u, beyond the %u blocks of the image"
                               % (bad, int(bmap[bad]), n))
        self.bmap = bmap
        # never hand out a block some entry already uses, even if the header counter is off
        self._next_free = top + 1
        self._file_end = h["offset_data"] + h["blocks_allocated"] * self.block_size
        return bmap

    @property
    def cluster_size(self) -> int:
        return self.block_size

    @property
    def has_zero_init(self) -> bool:
        return True

    # ----- read side -----
    def _run_ends(self):
        """For each block, the first block after it that starts a new run (state or host contiguity changes)."""
        if self._runs is None and len(self._load_bmap()) <= SMALL_TABLE:
            bmap = self.bmap
            runs = [0] * len(bmap)
            end = len(bmap)
            for j in range(len(bmap) - 1, -1, -1):
                runs[j] = end
                if j:
                    a, b = bmap[j - 1], bmap[j]
                    if a >= VDI_IMAGE_BLOCK_ZERO:
                        if b < VDI_IMAGE_BLOCK_ZERO:
                            end = j
                    elif b != a + 1 or b >= VDI_IMAGE_BLOCK_ZERO:
                        end = j
            self._runs = runs
        if self._runs is None:
            import numpy as np

            bmap = np.frombuffer(self._load_bmap(), np.uint32).astype(np.int64)
            n = len(bmap)
            free = bmap >= VDI_IMAGE_BLOCK_ZERO
            brk = np.ones(n, dtype=bool)  # brk[j]: block j starts a run
            if n > 1:
                same_free = free[1:] & free[:-1]
                contiguous = ~free[1:] & ~free[:-1] & (bmap[1:] == bmap[:-1] + 1)
                brk[1:] = ~(same_free | contiguous)
            starts = np.flatnonzero(brk)
            # run end of block i = next start after i
            nxt = np.append(starts[1:], n)
            self._runs = np.repeat(nxt, np.diff(np.append(starts, n)))
        return self._runs

    def block_status(self, offset: int, length: int) -> Extent:
        bmap = self._load_bmap()
        bs = self.block_size
        end = min(offset + length, self.virtual_size)
        idx = offset // bs
        run_end = min(int(self._run_ends()[idx]) * bs, end)
        n = run_end - offset
        entry = int(bmap[idx])
        if entry >= VDI_IMAGE_BLOCK_ZERO:
            return Extent(offset, n, data=False, zero=True, present=True)
        host = self.header["offset_data"] + entry * bs + (offset - idx * bs)
        if self.strict:
            self.check_host(self.store, host - (offset - idx * bs), 1, offset, "block map entry at host offset")
        if self.header["image_type"] == VDI_TYPE_STATIC:
            # qemu looks through a static image's blocks into the file: holes there read as zeros
            return self._host_status(offset, n, host)
        return Extent(offset, n, data=True, zero=False, present=True, offset=host)

    def _host_status(self, offset: int, n: int, host: int) -> Extent:
        store = self.store
        nxt = store.next_data(host)
        if nxt is None or nxt >= host + n:
            return Extent(offset, n, data=True, zero=True, present=True, offset=host)
        if nxt > host:
            return Extent(offset, nxt - host, data=True, zero=True, present=True, offset=host)
        hole = store.next_hole(host)
        return Extent(offset, max(min(hole, host + n) - host, 1), data=True, zero=False, present=True, offset=host)

    def plain_host_file(self, start: int, end: int):
        """(fd, host offset of ``start``) when [start, end) lies in contiguously allocated blocks (copy offload)."""
        fd = getattr(self.store, "fd", -1)
        if fd is None or fd < 0 or getattr(self.store, "is_block", True) or end > self.virtual_size:
            return None
        bmap = self._load_bmap()
        bs = self.block_size
        idx = start // bs
        entry = int(bmap[idx])
        if entry >= VDI_IMAGE_BLOCK_ZERO or int(self._run_ends()[idx]) * bs < end:
            return None
        return fd, self.header["offset_data"] + entry * bs + (start - idx * bs)


    # ----- write side -----
    def pwrite(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        bs = self.block_size
        bmap = self._load_bmap()
        pos = 0
        total = len(view)
        if offset + total > self.virtual_size:
            raise QimgError("Cannot write beyond the end of the image")
        while pos < total:
            off = offset + pos
            idx = off // bs
            in_block = off - idx * bs
            n = min(bs - in_block, total - pos)
            entry = int(bmap[idx])
            if entry >= VDI_IMAGE_BLOCK_ZERO:
                entry = self._allocate(idx)
            host = self.header["offset_data"] + entry * bs + in_block
            # extend the write over following blocks that are (or can be made) contiguous on the host
            nidx, nentry = idx + 1, entry + 1
            while pos + n < total and nidx < len(bmap):
                e2 = int(bmap[nidx])
                if e2 >= VDI_IMAGE_BLOCK_ZERO and self.header["blocks_allocated"] == nentry:
                    e2 = self._allocate(nidx)
                if e2 != nentry:
                    break
                n += min(bs, total - pos - n)
                nidx += 1
                nentry += 1
            self.store.pwrite(host, view[pos:pos + n])
            pos += n

    def _allocate(self, idx: int) -> int:
        """Give block ``idx`` the next free block of the data area (zeros until written)."""
        h = self.header
        entry = max(h["blocks_allocated"], self._next_free)
        if entry >= h["blocks_in_image"]:
            raise CorruptImage("VDI image has no free block left (%u allocated)" % entry)
        self.bmap[idx] = entry
        self._runs = None
        h["blocks_allocated"] = entry + 1
        self._next_free = entry + 1
        self._bmap_dirty = True
        self._header_dirty = True
        start = h["offset_data"] + entry * self.block_size
        self._file_end = max(self._file_end, start + self.block_size)
        zero_stale(self.store, start, self.block_size, self._open_size)
        return entry

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        bmap = self._load_bmap()
        bs = self.block_size
        for pos, nxt in split_at(offset, offset + length, bs):
            if int(bmap[pos // bs]) < VDI_IMAGE_BLOCK_ZERO:  # allocated: unallocated blocks read as zeros
                super().write_zeroes(pos, nxt - pos, may_unmap)

    def write_metadata(self) -> None:
        if self.store is None or not self.writable:
            return
        if self._file_end and self.store.size() < self._file_end:
            # a partly written last block must still lie inside the file
            self.store.truncate(self._file_end)
        if self._bmap_dirty:
            self.store.pwrite(self.header["offset_bmap"], uint_table_bytes(self.bmap, 4))
            self._bmap_dirty = False
        if self._header_dirty:
            self.store.pwrite(0, _pack_header(self.header))
            self._header_dirty = False

    # ----- check -----
    def check(self, repair: str | None = None):
        """qemu's vdi check: block map entries in range, no block mapped twice, allocation count."""
        from ..errors import CheckUnsupported

        if repair:
            raise CheckUnsupported("This image format does not support checks")
        import numpy as np

        h = self.header
        n = h["blocks_in_image"]
        # entries past the end of the file count as free: read only the part that is there
        avail = max(0, min(n * 4, self.store.size() - h["offset_bmap"])) // 4
        raw = self.store.pread(h["offset_bmap"], avail * 4)
        bmap = np.frombuffer(raw[:len(raw) // 4 * 4], "<u4")
        allocated = bmap < VDI_IMAGE_BLOCK_ZERO
        found = []  # (guest block, message), reported in block order as qemu does
        for i in np.flatnonzero(allocated & (bmap >= n))[:1000]:
            found.append((int(i), "ERROR: block index %u too large, is %u" % (int(i), int(bmap[i]))))
        idxs = np.flatnonzero(allocated & (bmap < n))
        targets = bmap[idxs]
        _, first_pos = np.unique(targets, return_index=True)
        later = np.ones(len(idxs), dtype=bool)
        later[first_pos] = False
        for j in np.flatnonzero(later)[:1000]:
            t = int(targets[j])
            # qemu 7.2 names the shared data block twice
            found.append((int(idxs[j]), "ERROR: block index %u also used by %u" % (t, t)))
        found.sort(key=lambda x: x[0])
        errors = [m for _, m in found]
        count = len(idxs)
        if count != h["blocks_allocated"]:
            errors.append("ERROR: allocated blocks mismatch, is %u, should be %u" % (count, h["blocks_allocated"]))
        from ..core.check import CheckResult

        return CheckResult(corruptions=len(errors), messages=errors)

    # ----- create -----
    @classmethod
    def create(cls, filename: str, opts: CreateOptions, opener) -> None:
        static = parse_bool("static", opts.options.get("static", "off"))
        prealloc = opts.options.get("preallocation", "off")
        if prealloc not in ("off", "falloc", "full"):
            if prealloc == "metadata":
                raise QimgError("Unsupported preallocation mode: metadata")
            raise QimgError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
        size = round_up(opts.size or 0, SECTOR)
        if size > VDI_DISK_SIZE_MAX:
            raise QimgError("Unsupported VDI image size (size is 0x%x, max supported is 0x%x)"
                            % (size, VDI_DISK_SIZE_MAX))
        bs = DEFAULT_BLOCK_SIZE
        blocks = (size + bs - 1) // bs
        offset_bmap = SECTOR
        offset_data = offset_bmap + round_up(blocks * 4, SECTOR)
        h = dict(text=VDI_TEXT.ljust(64, b"\0"), signature=VDI_SIGNATURE, version=VDI_VERSION_1_1,
                 header_size=0x180, image_type=VDI_TYPE_STATIC if static else VDI_TYPE_DYNAMIC, image_flags=0,
                 description=bytes(256), offset_bmap=offset_bmap, offset_data=offset_data, cylinders=0, heads=0,
                 sectors=0, sector_size=SECTOR, disk_size=size, block_size=bs, block_extra=0,
                 blocks_in_image=blocks, blocks_allocated=blocks if static else 0,
                 uuid_image=uuid.uuid4().bytes, uuid_last_snap=uuid.uuid4().bytes, uuid_link=bytes(16),
                 uuid_parent=bytes(16))
        if not static:
            table = b"\xff" * (4 * blocks)  # VDI_IMAGE_BLOCK_FREE
        elif blocks <= SMALL_TABLE:
            from array import array

            table = uint_table_bytes(array("I", range(blocks)), 4)
        else:
            import numpy as np

            table = np.arange(blocks, dtype="<u4").tobytes()
        with opener.open_file(filename, writable=True, create=True) as store:
            store.pwrite(0, _pack_header(h))
            store.pwrite(offset_bmap, table + bytes(offset_data - offset_bmap - len(table)))
            if static:
                end = offset_data + blocks * bs
                store.truncate(end)
                if prealloc == "falloc":
                    store.fallocate(offset_data, end - offset_data)
                elif prealloc == "full":
                    chunk = bytes(1 << 20)
                    pos = offset_data
                    while pos < end:
                        store.pwrite(pos, chunk[:min(len(chunk), end - pos)])
                        pos += len(chunk)

    @classmethod
    def format_line_options(cls, opts: CreateOptions) -> list[tuple[str, str]]:
        static = parse_bool("static", opts.options.get("static", "off"))
        out = [("size", str(opts.size or 0)), ("static", "on" if static else "off")]
        if "preallocation" in opts.options:
            out.append(("preallocation", opts.options["preallocation"]))
        return out
