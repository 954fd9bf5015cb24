"""dmg: Apple UDIF disk images (.dmg), read-only.

References:
  - Apple's UDIF layout as described publicly (e.g. "Demystifying the DMG file format",
    the libdmg/dmg2img and newosxbook write-ups): a 512-byte big-endian "koly" trailer at the
    end of the file (DataForkOffset at 24, RsrcForkOffset/Length at 40/48, XMLOffset/Length
    at 216/224, SectorCount at 492), and block tables ("mish" blocks, 204-byte header:
    SectorNumber at 8, SectorCount at 16, DataOffset at 24, NumberOfBlockChunks at 200)
    stored as the 'blkx' resources of either the XML property list (resource-fork -> blkx
    -> Data) or the classic binary resource fork.  Each 40-byte chunk: EntryType,
    Comment, SectorNumber, SectorCount, CompressedOffset, CompressedLength.
  - Chunk types: 0x00000000 zero fill, 0x00000001 raw, 0x00000002 ignored (reads as
    zeros), 0x80000004 ADC, 0x80000005 zlib, 0x80000006 bzip2, 0x80000007 LZFSE,
    0x7ffffffe comment, 0xffffffff terminator.
  - Observed qemu-img 7.2 behaviour: probing goes by the ".dmg" file name (score 2); the
    whole image is reported as data by ``map``; chunks are limited to 64 MiB.  qemu-img 7.2
    on Debian cannot read bzip2 or LZFSE chunks (modules not shipped); qimg reads bzip2
    with Python's bz2, ADC with a small decoder below, and LZFSE when the optional
    ``pyliblzfse`` package is installed.
"""

from __future__ import annotations

import struct

from ..core.driver import Driver
from ..core.policy import short_read
from ..errors import CorruptImage, OpenError, QimgError, check_limit
from .inflate import inflate_into

KOLY_SIZE = 512
SECTOR = 512
UDIF_ZERO, UDIF_RAW, UDIF_IGNORE = 0x00000000, 0x00000001, 0x00000002
UDIF_ADC, UDIF_ZLIB, UDIF_BZIP2, UDIF_LZFSE = 0x80000004, 0x80000005, 0x80000006, 0x80000007
UDIF_COMMENT, UDIF_TERM = 0x7FFFFFFE, 0xFFFFFFFF
MISH_HEADER = 204
CHUNK = struct.Struct(">IIQQQQ")  # 40 bytes

#: named limits for values read from an image
DMG_LENGTHS_MAX = 64 << 20                  # one chunk, compressed or not
MAX_PLIST_BYTES = 64 << 20
MAX_RSRC_BYTES = 64 << 20
MAX_CHUNKS = 1 << 21                    # 2 TiB of 1 MiB chunks
MAX_MISH_BLOCKS = 1 << 16


def adc_decompress(src: bytes, out_len: int) -> bytes:
    """Apple Data Compression (a small LZ77 variant).

    No maintained Python library decodes ADC, so this loops per token (not per byte: runs
    and back-references are copied as slices); ADC chunks are rare in practice.
    """
    out = bytearray()
    i = 0
    n = len(src)
    while i < n and len(out) < out_len:
        b = src[i]
        if b & 0x80:                      # literal run of 1..128 bytes
            length = (b & 0x7F) + 1
            out += src[i + 1:i + 1 + length]
            i += 1 + length
            continue
        if b & 0x40:                      # three-byte code: 4..67 bytes, 16-bit distance
            if i + 2 >= n:
                raise CorruptImage("ADC stream ends inside a code")
            length = (b & 0x3F) + 4
            dist = ((src[i + 1] << 8) | src[i + 2]) + 1
            i += 3
        else:                             # two-byte code: 3..18 bytes, 10-bit distance
            if i + 1 >= n:
                raise CorruptImage("ADC stream ends inside a code")
            length = ((b & 0x3C) >> 2) + 3
            dist = (((b & 0x03) << 8) | src[i + 1]) + 1
            i += 2
        if dist > len(out):
            raise CorruptImage("ADC back-reference before the start of the chunk")
        start = len(out) - dist
        if dist >= length:
            out += out[start:start + length]
        else:                             # overlapping copy: repeat the period
            period = out[start:]
            reps = length // dist + 1
            out += (period * reps)[:length]
    return bytes(out[:out_len])


def _lzfse_decompress(data: bytes) -> bytes:
    try:
        import lzfse  # type: ignore
    except ImportError:
        try:
            import liblzfse as lzfse  # type: ignore
        except ImportError:
            raise QimgError("LZFSE-compressed dmg chunks need the optional 'pyliblzfse' package") from None
    return lzfse.decompress(data)


def _rsrc_resources(store, begin: int, length: int, what: str) -> list[bytes]:
    """The resources of a classic binary resource fork, read as qemu-img 7.2 reads them: the data area
    (its offset and length from the fork's header, inside the fork's length in the trailer) walked
    resource by resource (a 4-byte length, then the bytes); the resource map is not needed (older
    hdiutil writes forks whose map the trailer leaves out).  Resources that are not mish blocks are
    skipped by the caller."""
    invalid = CorruptImage(f"Could not open '{what}': Invalid argument")
    head = store.pread(begin, 16)
    if len(head) < 16:
        raise invalid
    data_off, _map_off, data_len, _map_len = struct.unpack(">IIII", head)
    if data_off > length or data_len == 0 or data_off + data_len > length:
        raise invalid
    check_limit("dmg resource fork data length", data_len, MAX_RSRC_BYTES, "resource fork header")
    pos, end = begin + data_off, begin + data_off + data_len
    out: list[bytes] = []
    total = 0
    while pos < end:
        raw = store.pread(pos, 4)
        n = struct.unpack(">I", raw)[0] if len(raw) == 4 else 0
        if n == 0:
            raise invalid
        total += n
        check_limit("dmg resource bytes", total, MAX_RSRC_BYTES, "resource fork")
        check_limit("dmg resources", len(out) + 1, MAX_MISH_BLOCKS, "resource fork")
        blob = store.pread(pos + 4, n)
        out.append(blob + bytes(n - len(blob)))  # past the end of the file: zeros, as qemu reads
        pos += 4 + n
    return out


class DmgDriver(Driver):
    """Read-only UDIF images: chunk tables from the plist or the resource fork."""

    format_name = "dmg"

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 2 if len(filename) > 4 and filename.endswith(".dmg") else 0

    def _open(self, options: dict) -> None:
        if self.writable:
            raise OpenError("Driver 'dmg' can only be used for read-only devices")
        size = self.store.size()
        if size < KOLY_SIZE:
            raise OpenError("Image not in dmg format (no koly trailer)")
        koly = self.store.pread_full(size - KOLY_SIZE, KOLY_SIZE)
        if koly[:4] != b"koly":
            raise OpenError("Image not in dmg format (no koly trailer)")
        data_fork = struct.unpack_from(">Q", koly, 24)[0]
        rsrc_off, rsrc_len = struct.unpack_from(">QQ", koly, 40)
        xml_off, xml_len = struct.unpack_from(">QQ", koly, 216)
        blocks: list[bytes]
        koly_off = size - KOLY_SIZE
        if rsrc_off >= koly_off or rsrc_len > koly_off - rsrc_off or xml_off >= koly_off or \
                xml_len > koly_off - xml_off:
            raise CorruptImage(f"Could not open '{self.filename}': Invalid argument")
        if rsrc_len:
            # qemu-img looks for the resource fork first, and reads the plist only without one
            blocks = _rsrc_resources(self.store, rsrc_off, rsrc_len, self.filename)
        elif xml_len:
            check_limit("dmg plist length", xml_len, MAX_PLIST_BYTES, "koly trailer")
            if xml_off + xml_len > size:
                raise CorruptImage("dmg plist lies outside the file")
            blocks = self._plist_blocks(self.store.pread(xml_off, xml_len))
        else:
            raise CorruptImage("dmg has neither a plist nor a resource fork")
        check_limit("dmg blkx blocks", len(blocks), MAX_MISH_BLOCKS)
        rows = []
        total = 0
        for blk in blocks:
            if len(blk) < MISH_HEADER + 40 or blk[:4] != b"mish":
                continue  # as qemu: what is not a mish block with a chunk is skipped
            first_sector, _count, data_off = struct.unpack_from(">QQQ", blk, 8)
            n = (len(blk) - MISH_HEADER) // 40  # qemu counts the chunks the block's length holds
            total += n
            check_limit("dmg chunks", total, MAX_CHUNKS)
            self.charge("dmg chunk table", 40 * n)
            for t, _c, sec, cnt, coff, clen in CHUNK.iter_unpack(blk[MISH_HEADER:MISH_HEADER + 40 * n]):
                if t in (UDIF_TERM, UDIF_COMMENT):
                    continue
                if t not in (UDIF_ZERO, UDIF_RAW, UDIF_IGNORE, UDIF_ADC, UDIF_ZLIB, UDIF_BZIP2, UDIF_LZFSE):
                    raise CorruptImage(f"dmg chunk type 0x{t:08x} is not supported")
                if t not in (UDIF_ZERO, UDIF_IGNORE):
                    if cnt * SECTOR > DMG_LENGTHS_MAX:
                        raise CorruptImage(f"Sector count {cnt} for chunk is larger than max "
                                           f"({DMG_LENGTHS_MAX // SECTOR})")
                    if clen > DMG_LENGTHS_MAX:
                        raise CorruptImage(f"Length {clen} for chunk is larger than max ({DMG_LENGTHS_MAX})")
                    host = data_fork + data_off + coff
                    # qemu-img reads a chunk past the end of the file as zeros; untrusted mode refuses it
                    if self.strict and host + clen > size:
                        raise CorruptImage(f"dmg chunk at host offset {host:#x} lies past the end of the file")
                    # the optional LZFSE decoder inflates a whole stream with no bound on its output
                    if self.strict and t == UDIF_LZFSE:
                        raise CorruptImage(f"dmg chunk at host offset {host:#x} is LZFSE-compressed, whose "
                                           "output cannot be bounded: refused for an untrusted image")
                else:
                    host = 0
                start = first_sector + sec
                if start + cnt > ((1 << 63) - 1) // SECTOR:
                    raise CorruptImage("dmg chunk lies beyond the largest disk size")
                rows.append((start * SECTOR, cnt * SECTOR, t, host, clen))
        rows.sort()
        self.starts = [r[0] for r in rows]
        self.chunks = rows
        # the size is the trailer's SectorCount, as qemu takes it (the chunks normally cover exactly that)
        sectors = struct.unpack_from(">Q", koly, 492)[0]
        if sectors > ((1 << 63) - 1) // SECTOR:
            raise CorruptImage(f"Could not open '{self.filename}': Invalid argument")
        self.virtual_size = sectors * SECTOR
        self._cache = (-1, b"")

    @staticmethod
    def _plist_blocks(raw: bytes) -> list[bytes]:
        import plistlib
        from xml.parsers.expat import ExpatError

        if b"<!DOCTYPE" in raw and b"<!ENTITY" in raw:
            raise CorruptImage("dmg plist declares entities")
        try:
            pl = plistlib.loads(raw)
            blkx = pl["resource-fork"]["blkx"]
            blocks = [b["Data"] for b in blkx]
        except (ValueError, LookupError, TypeError, AttributeError, ExpatError, OverflowError,
                RecursionError, struct.error) as e:  # LookupError: KeyError, IndexError, an unknown XML encoding
            raise CorruptImage(f"dmg plist has no usable blkx table ({type(e).__name__})") from None
        if not all(isinstance(b, bytes) for b in blocks):
            raise CorruptImage("dmg plist blkx entry has no Data bytes")
        return blocks

    def info_extra(self) -> dict:
        return {"dirty-flag": None}

    def _chunk_data(self, i: int) -> bytes:
        if self._cache[0] == i:
            return self._cache[1]
        _start, length, t, host, clen = self.chunks[i]
        import zlib

        # past the end of the file the chunk reads as zeros, as in qemu-img (refused in untrusted mode)
        raw = short_read(self.store.pread(host, clen), clen, self.strict, self.filename, "dmg chunk", host)
        more = False
        try:
            if t == UDIF_RAW:
                out = raw[:length].ljust(length, b"\0")
            elif t == UDIF_ZLIB:
                out, got, ended = inflate_into(zlib.decompressobj(), raw, length)
                more = got == length and not ended  # as qemu-img: the stream ends exactly at the chunk's size
                out = memoryview(out)[:got]
            elif t == UDIF_BZIP2:
                import bz2

                out, got, ended = inflate_into(bz2.BZ2Decompressor(), raw, length)
                more = got == length and not ended
                out = memoryview(out)[:got]
            elif t == UDIF_ADC:
                out = adc_decompress(raw, length)
            else:
                out = _lzfse_decompress(raw)[:length]
        except (OSError, EOFError, ValueError, zlib.error) as e:
            raise CorruptImage(f"dmg chunk at host offset {host} is damaged: {e}") from None
        if len(out) < length:
            raise CorruptImage(f"dmg chunk at host offset {host} inflates to {len(out)} bytes, not {length}")
        if more:  # a stream that goes on past the chunk's size (a bomb) or does not end there
            raise CorruptImage(f"'{self.filename}': dmg chunk at host offset {host:#x} does not inflate to exactly "
                               f"its size {length}")
        self._cache = (i, out)
        return out

    def readinto(self, offset: int, buf) -> None:
        import bisect

        view = memoryview(buf).cast("B")
        pos = 0
        total = len(view)
        while pos < total:
            off = offset + pos
            i = bisect.bisect_right(self.starts, off) - 1
            if i >= 0:
                start, length, t, _host, _clen = self.chunks[i]
            if i < 0 or off >= start + length:
                nxt = int(self.starts[i + 1]) if i + 1 < len(self.starts) else offset + total
                n = min(nxt - off, total - pos)
                view[pos:pos + n] = bytes(n)
                pos += n
                continue
            within = off - start
            n = min(length - within, total - pos)
            if t in (UDIF_ZERO, UDIF_IGNORE):
                view[pos:pos + n] = bytes(n)
            else:
                view[pos:pos + n] = memoryview(self._chunk_data(i))[within:within + n]
            pos += n

