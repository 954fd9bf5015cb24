"""vhdx: Microsoft VHDX (Hyper-V virtual hard disk v2), dynamic and fixed.

References:
  - [MS-VHDX] "VHDX Format Specification" v1.00 (Microsoft, 2012) and the Open Specifications
    document [MS-VHDX]: 2.1 layout (file type identifier at 0, headers at 64 KiB and 128 KiB,
    region tables at 192 KiB and 256 KiB), 2.2.2 header (signature "head", CRC-32C checksum,
    sequence number, file/data write GUIDs, log GUID, log version, version 1, log length and
    offset), 2.2.3 region table ("regi", entries: GUID, file offset, length, required),
    2.3 log (entries "loge", zero descriptors "zero", data descriptors "desc", data sectors
    "data"; 2.3.3 log replay), 2.4 BAT (payload block states, sector bitmap block states,
    chunk ratio = 2^23 * logical sector size / block size, one sector bitmap entry after
    every chunk ratio payload entries), 2.6 metadata region ("metadata" table; file
    parameters, virtual disk size, virtual disk id, logical and physical sector size,
    parent locator).
  - CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), RFC 3720 appendix B.4.
  - qemu-img 7.2's observed behaviour: create options block_size (0 = auto: 8/16/32/64 MiB
    by size, clamped to 1..256 MiB, power of two), log_size (1 MiB multiple), subformat
    dynamic|fixed, block_state_zero; layout 1 MiB header area, log at 1 MiB, BAT and metadata
    regions after it; images whose log must be replayed are refused read-only (replayed by a
    writable open, e.g. ``check -r all``); no block status (``map`` shows one data extent);
    differencing images are refused.

Writes allocate blocks at the end of the file (1 MiB aligned, in write order, as qemu-img does);
dirty BAT pages are written back on flush/close/finalize.  The log is only replayed, never
written (so a crash while writing can leave BAT updates unwritten; the data blocks themselves
are never moved).  Open option ``check=True`` keeps qemu's open-time BAT errors (block beyond
the end of the file, block over a metadata region) for ``check`` to report instead of refusing.
"""

from __future__ import annotations

import struct
import uuid

from ..core.driver import CreateOptions, Driver
from ..core.extent import Extent, split_at
from ..errors import CorruptImage, OpenError, QimgError, Unsupported, check_limit
from ..options import OptSpec, parse_bool, parse_opt_size

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

VHDX_FILE_ID_OFFSET = 0
VHDX_HEADER1_OFFSET = 64 * KiB
VHDX_HEADER2_OFFSET = 128 * KiB
VHDX_REGION_TABLE_OFFSET = 192 * KiB
VHDX_REGION_TABLE2_OFFSET = 256 * KiB
VHDX_HEADER_SIZE = 4 * KiB
VHDX_REGION_TABLE_SIZE = 64 * KiB
VHDX_METADATA_TABLE_MAX_SIZE = 64 * KiB
VHDX_MAX_ENTRIES = 2047
VHDX_LOG_SECTOR_SIZE = 4 * KiB
VHDX_MIN_BLOCK_SIZE = 1 * MiB
VHDX_MAX_BLOCK_SIZE = 256 * MiB
VHDX_MAX_IMAGE_SIZE = 64 * TiB
DEFAULT_LOG_SIZE = 1 * MiB
#: the log region is read entry by entry; more than 4 GiB is not a valid VHDX log
VHDX_MAX_LOG_SIZE = 4 * GiB - MiB
#: one log entry is read whole into memory
VHDX_MAX_LOG_ENTRY = 256 * MiB

# payload block states (BAT entry bits 0..2)
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6
VHDX_BAT_STATE_BIT_MASK = 0x07
VHDX_BAT_FILE_OFF_MASK = 0xFFFFFFFFFFF00000


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_GUID = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA_GUID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
ZERO_GUID = bytes(16)

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
_REGION_HDR = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")
_META_HDR = struct.Struct("<8sHH20s")
_META_ENTRY = struct.Struct("<16sIIII")
_LOG_HDR = struct.Struct("<4sIIIQII16sQQ")
_LOG_DESC = struct.Struct("<4s4s8sQQ")

# ----- CRC-32C -----
_CRC_TABLE = None


def _crc_table():
    global _CRC_TABLE
    if _CRC_TABLE is None:
        table = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            table.append(c)
        _CRC_TABLE = table
    return _CRC_TABLE


#: from this many bytes on, the CRC runs in numpy lanes: a crafted 256 MiB log entry costs about a
#: second instead of the ~20 s of the byte loop
CRC_LANES_FROM = 256 << 10


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of ``data`` (used on headers, tables and log entries).

    Short inputs are table driven, with long runs of zero bytes (most of a 64 KiB region or
    metadata table) skipped in O(log n) with the CRC's zero-byte operator; long ones (log
    entries) go through ``_crc_lanes``.
    """
    global _ZERO_RUN
    table = _crc_table()
    c = crc ^ 0xFFFFFFFF
    data = bytes(data)
    if len(data) >= CRC_LANES_FROM:
        c, done = _crc_lanes(c, data)
        data = data[done:]
    if _ZERO_RUN is None:
        import re

        _ZERO_RUN = re.compile(rb"\0{256,}")
    pos = 0
    for m in _ZERO_RUN.finditer(data):
        for b in data[pos:m.start()]:
            c = table[(c ^ b) & 0xFF] ^ (c >> 8)
        c = _crc_zeros(c, m.end() - m.start())
        pos = m.end()
    for b in data[pos:]:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


_ZERO_RUN = None
#: _ZERO_OPS[i]: the CRC register's linear map over GF(2) for 2**i zero bytes (images of the 32 bits)
_ZERO_OPS: list = []


def _gf2_apply(mat, vec: int) -> int:
    out = 0
    i = 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _crc_zeros(c: int, n: int) -> int:
    """The CRC register after ``n`` zero bytes (zlib's crc32_combine idea)."""
    i = 0
    while n:
        while len(_ZERO_OPS) <= i:
            if not _ZERO_OPS:
                t = _crc_table()  # one zero byte: c -> table[c & 0xff] ^ (c >> 8), linear in c
                _ZERO_OPS.append([t[(1 << j) & 0xFF] ^ ((1 << j) >> 8) for j in range(32)])
            else:
                sq = _ZERO_OPS[-1]
                _ZERO_OPS.append([_gf2_apply(sq, col) for col in sq])
        if n & 1:
            c = _gf2_apply(_ZERO_OPS[i], c)
        n >>= 1
        i += 1
    return c


def _crc_lanes(c: int, data: bytes) -> tuple[int, int]:
    """Advance the CRC register ``c`` over the first ``k * step`` bytes of ``data`` (returned too).

    The CRC register is linear in its input: the register after A+B is Z(A's register) ^ (B's
    register from 0), Z being the map of len(B) zero bytes; and four bytes from register c give
    Z4(c ^ word), Z4 split into two 65536-entry tables by the word's halves.  So the data is cut
    into ``k`` lanes (a power of two) that numpy advances side by side, a 32-bit word of each per
    step, and neighbouring lanes are then merged pairwise with the zero operator, log2(k) rounds.
    """
    import numpy as np

    k = 1 << min(16, (len(data) // 64).bit_length() - 1)
    step = len(data) // k // 4 * 4
    words = np.frombuffer(data, dtype="<u4", count=k * step // 4).reshape(k, step // 4)
    rows = words.T.copy()  # row t: word t of every lane
    low, high = _zero_word_tables()
    regs = np.zeros(k, dtype=np.uint32)
    regs[0] = c
    for row in rows:
        regs ^= row
        regs = low[regs & 0xFFFF] ^ high[regs >> 16]
    span = step
    while len(regs) > 1:
        a, b = regs[0::2], regs[1::2]
        regs = _gf2_apply_array(_zero_columns(span), a) ^ b
        span *= 2
    return int(regs[0]), k * step


def _zero_columns(n: int) -> list[int]:
    """The images of the 32 register bits after ``n`` zero bytes."""
    return [_crc_zeros(1 << j, n) for j in range(32)]


def _gf2_apply_array(cols, vals):
    """``_gf2_apply`` over a numpy array of registers."""
    import numpy as np

    out = np.zeros_like(vals)
    for j, col in enumerate(cols):
        if col:
            out ^= ((vals >> j) & 1) * np.uint32(col)
    return out


_ZERO_WORD_TABLES: list = []


def _zero_word_tables():
    """(low, high): the register after four zero bytes from each 16-bit low half and high half."""
    if not _ZERO_WORD_TABLES:
        import numpy as np

        cols = _zero_columns(4)
        vals = np.arange(65536, dtype=np.uint32)
        _ZERO_WORD_TABLES.extend((_gf2_apply_array(cols[:16], vals), _gf2_apply_array(cols[16:], vals)))
    return _ZERO_WORD_TABLES


def _checksum_ok(buf: bytes, off: int = 4) -> bool:
    stored = struct.unpack_from("<I", buf, off)[0]
    return crc32c(buf[:off] + bytes(4) + buf[off + 4:]) == stored


def _with_checksum(buf: bytearray, off: int = 4) -> bytearray:
    buf[off:off + 4] = bytes(4)
    struct.pack_into("<I", buf, off, crc32c(buf))
    return buf


# ----- headers -----
def _parse_header(buf: bytes) -> dict | None:
    if len(buf) < VHDX_HEADER_SIZE or buf[:4] != b"head" or not _checksum_ok(buf[:VHDX_HEADER_SIZE]):
        return None
    (_sig, _csum, seq, fwg, dwg, log_guid, log_version, version, log_length, log_offset) = _HEADER.unpack_from(buf)
    if version != 1:
        return None
    return dict(seq=seq, file_write_guid=fwg, data_write_guid=dwg, log_guid=log_guid, log_version=log_version,
                version=version, log_length=log_length, log_offset=log_offset)


def _pack_header(h: dict) -> bytes:
    buf = bytearray(VHDX_HEADER_SIZE)
    _HEADER.pack_into(buf, 0, b"head", 0, h["seq"], h["file_write_guid"], h["data_write_guid"], h["log_guid"],
                      h["log_version"], h["version"], h["log_length"], h["log_offset"])
    return bytes(_with_checksum(buf))


_ZEROS = memoryview(bytes(4 << 20))


def _u64_table(raw: bytes):
    """An ``array('Q')`` of the little-endian u64 entries in ``raw``."""
    import sys
    from array import array

    tab = array("Q")
    if tab.itemsize != 8:  # pragma: no cover - exotic platforms
        raise QimgError("unsupported platform: 64-bit unsigned array items are not 8 bytes")
    tab.frombytes(raw)
    if sys.byteorder != "little":
        tab.byteswap()
    return tab


def _u64_bytes(tab) -> bytes:
    """Little-endian bytes of a u64 table (an ``array('Q')`` or a numpy array)."""
    import sys
    from array import array

    if not isinstance(tab, array):
        return tab.astype("<u8").tobytes()
    if sys.byteorder != "little":
        tab = array("Q", tab)
        tab.byteswap()
    return tab.tobytes()


def _fill_zero(view) -> None:
    """Zero a memoryview without allocating a new buffer for every call."""
    pos = 0
    n = len(view)
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        view[pos:pos + k] = _ZEROS[:k]
        pos += k


def _default_block_size(size: int) -> int:
    if size > 32 * TiB:
        return 64 * MiB
    if size > 100 * GiB:
        return 32 * MiB
    if size > 1 * GiB:
        return 16 * MiB
    return 8 * MiB


class VhdxDriver(Driver):
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
        self.bat_errors = self._validate_bat()
        if self.bat_errors and not options.get("check"):
            raise CorruptImage(self.bat_errors[0])

    @property
    def replayed(self) -> bool:
        return getattr(self, "replayed_log", False)

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
        _sig, _csum, count, _res = _REGION_HDR.unpack_from(buf)
        check_limit("VHDX region table entry count", count, VHDX_MAX_ENTRIES)
        bat = meta = None
        seen = []
        for i in range(count):
            guid, off, length, required = _REGION_ENTRY.unpack_from(buf, 16 + 32 * i)
            if off % MiB or length % MiB or off < MiB:
                raise CorruptImage("VHDX region %d (offset %u, length %u) is not 1 MiB aligned" % (i, off, length))
            if off + length > self.file_size:
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
        sig, _r, count, _r2 = _META_HDR.unpack_from(buf)
        if sig != b"metadata":
            raise CorruptImage("Invalid VHDX metadata table signature")
        check_limit("VHDX metadata entry count", count, VHDX_MAX_ENTRIES)
        items = {}
        for i in range(count):
            item, off, length, flags, _res = _META_ENTRY.unpack_from(buf, 32 + 32 * i)
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
        block_size, fflags = struct.unpack_from("<II", items[FILE_PARAMETERS_GUID])
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

            bat = _u64_table(raw)
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
    SMALL_BAT_ENTRIES = 1 << 16

    def _present_blocks(self):
        """(payload block index, BAT index, host offset) of every allocated block."""
        if self.bat_entries > self.SMALL_BAT_ENTRIES:
            import numpy as np

            self._load_bat()
            present = np.flatnonzero(self._block_off >= 0)
            return zip(present.tolist(), self._pidx[present].tolist(), self._block_off[present].tolist())
        from array import array

        bat = array("Q")
        bat.frombytes(self.store.pread_full(self.bat_offset, self.bat_entries * 8))
        if struct.pack("=Q", 1) != struct.pack("<Q", 1):
            bat.byteswap()
        out = []
        ratio = self.chunk_ratio
        for i in range(self.data_blocks):
            b = i + i // ratio
            e = bat[b]
            if e & VHDX_BAT_STATE_BIT_MASK in (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT):
                out.append((i, b, e & VHDX_BAT_FILE_OFF_MASK))
        return out

    def _validate_bat(self) -> list:
        """Messages for allocated blocks beyond the end of the file or over a metadata region (as qemu at open)."""
        bs = self.block_size
        size = self.file_size
        regions = [(self.meta_offset, self.meta_length), (self.bat_offset, self.bat_length)]
        if self.header["log_length"]:
            regions.append((self.header["log_offset"], self.header["log_length"]))
        regions.append((0, MiB))
        errors = []
        for i, b, st in self._present_blocks():
            en = st + min(bs, self.virtual_size - i * bs) - 1
            if st >= size:
                errors.append("VHDX BAT entry %d start offset %d points after end of file (%d). "
                              "Image has probably been truncated." % (b, st, size))
            elif en >= size:
                errors.append("VHDX BAT entry %d end offset %d points after end of file (%d). "
                              "Image has probably been truncated." % (b, en, size))
            else:
                for o, n in regions:
                    if st < o + n and st + bs > o:
                        errors.append("VHDX region %d-%d overlaps with region %d-%d" % (st, st + bs, o, o + n))
                        break
            if len(errors) >= 100:
                break
        return errors

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
                got = self.store.readinto(host + in_block, sub)
                if got < n:
                    sub[got:] = bytes(n - got)
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
            self.store.pwrite(self.bat_offset + a * 8, _u64_bytes(self._bat[a:b]))
            start = stop + 1

    # ----- log -----
    def _log_read(self, pos: int, n: int) -> bytes:
        """Read ``n`` bytes of the circular log starting at log position ``pos``."""
        h = self.header
        L = h["log_length"]
        out = []
        while n > 0:
            p = pos % L
            k = min(n, L - p)
            out.append(self.store.pread_full(h["log_offset"] + p, k))
            n -= k
            pos += k
        return b"".join(out)

    def _log_in_file(self, pos: int, n: int) -> bool:
        """Whether log bytes [pos, pos + n) (circular) all lie inside the file (never zero padding)."""
        h = self.header
        L = h["log_length"]
        size = self.store.size()
        while n > 0:
            p = pos % L
            k = min(n, L - p)
            if h["log_offset"] + p + k > size:
                return False
            n -= k
            pos += k
        return True

    def _log_entry(self, pos: int):
        """A valid log entry at log position ``pos`` (dict) or None.

        The cheap structure checks (descriptor and data sector signatures, an entry length of exactly
        its descriptor and data sectors, all inside the file) run sector by sector before the checksum,
        so a crafted log full of entry headers costs time in proportion to the file, not its square.
        """
        h = self.header
        L = h["log_length"]
        head = self._log_read(pos, VHDX_LOG_SECTOR_SIZE)
        if head[:4] != b"loge":
            return None
        (_sig, csum, length, tail, seq, count, _res, guid, flushed, last) = _LOG_HDR.unpack_from(head)
        if guid != h["log_guid"] or length < VHDX_LOG_SECTOR_SIZE or length % VHDX_LOG_SECTOR_SIZE or length > L:
            return None
        check_limit("VHDX log entry length", length, VHDX_MAX_LOG_ENTRY)
        if tail % VHDX_LOG_SECTOR_SIZE or tail >= L:
            return None
        desc_sectors = (64 + 32 * count + VHDX_LOG_SECTOR_SIZE - 1) // VHDX_LOG_SECTOR_SIZE
        if desc_sectors * VHDX_LOG_SECTOR_SIZE > length or not self._log_in_file(pos, length):
            return None
        descs = []
        sector = head
        n_data = 0
        for i in range(count):
            at = 64 + 32 * i
            if at // VHDX_LOG_SECTOR_SIZE != (at - 32) // VHDX_LOG_SECTOR_SIZE and i:
                sector = self._log_read(pos + at // VHDX_LOG_SECTOR_SIZE * VHDX_LOG_SECTOR_SIZE,
                                        VHDX_LOG_SECTOR_SIZE)
            sig, trail, lead, file_off, dseq = _LOG_DESC.unpack_from(sector, at % VHDX_LOG_SECTOR_SIZE)
            if dseq != seq or file_off % VHDX_LOG_SECTOR_SIZE:
                return None
            if sig == b"zero":
                zlen = struct.unpack_from("<Q", lead)[0]
                if zlen % VHDX_LOG_SECTOR_SIZE:
                    return None
                descs.append(["zero", file_off, zlen])
            elif sig == b"desc":
                if (desc_sectors + n_data + 1) * VHDX_LOG_SECTOR_SIZE > length:
                    return None
                s = self._log_read(pos + (desc_sectors + n_data) * VHDX_LOG_SECTOR_SIZE, VHDX_LOG_SECTOR_SIZE)
                shigh, slow = struct.unpack_from("<I", s, 4)[0], struct.unpack_from("<I", s, 4092)[0]
                if s[:4] != b"data" or (shigh << 32 | slow) != seq:
                    return None
                descs.append(["data", file_off, lead + s[8:4092] + trail])
                n_data += 1
            else:
                return None
        if (desc_sectors + n_data) * VHDX_LOG_SECTOR_SIZE != length:
            return None
        buf = self._log_read(pos, length)
        if crc32c(buf[:4] + bytes(4) + buf[8:]) != csum:
            return None
        return dict(pos=pos % L, length=length, tail=tail, seq=seq, flushed=flushed, last=last,
                    descs=[tuple(d) for d in descs])

    def _find_log_sequence(self) -> list:
        """The active log sequence (entries oldest first), or [] when there is nothing to replay."""
        h = self.header
        L = h["log_length"]
        if L == 0:
            return []
        entries = {}
        # look for entry signatures a window at a time; only the candidates are parsed
        window = 4 * MiB
        base = 0
        while base < L:
            n = min(window, L - base)
            data = self.store.pread(h["log_offset"] + base, n)
            p = data.find(b"loge")
            while p >= 0:
                if p % VHDX_LOG_SECTOR_SIZE == 0:
                    e = self._log_entry(base + p)
                    if e is not None:
                        entries[base + p] = e
                    p = data.find(b"loge", p + VHDX_LOG_SECTOR_SIZE)
                else:
                    p = data.find(b"loge", (p // VHDX_LOG_SECTOR_SIZE + 1) * VHDX_LOG_SECTOR_SIZE)
            base += n
        if not entries:
            return []
        succ = {}
        for pos, e in entries.items():
            nxt = entries.get((pos + e["length"]) % L)
            if nxt is not None and nxt["seq"] == e["seq"] + 1:
                succ[pos] = nxt["pos"]
        # a sequence is valid when walking from its head's tail reaches the head
        for head in sorted(entries.values(), key=lambda e: e["seq"], reverse=True):
            if head["pos"] in succ:
                continue  # not the newest entry of its chain
            cur = entries.get(head["tail"])
            seq = []
            steps = 0
            while cur is not None and steps <= len(entries):
                seq.append(cur)
                if cur is head:
                    return seq
                nxt = succ.get(cur["pos"])
                cur = entries.get(nxt) if nxt is not None else None
                steps += 1
        return []

    def _replay_log(self, seq: list) -> None:
        """Apply the log entries to the file (MS-VHDX 2.3.3), then clear the log GUID in the headers."""
        last = seq[-1]
        if last["flushed"] > self.file_size:
            raise CorruptImage("VHDX log replay: the file is shorter (%u) than the log's flushed file offset %u"
                               % (self.file_size, last["flushed"]))
        limit = VHDX_MAX_IMAGE_SIZE * 2
        for e in seq:
            for kind, off, payload in e["descs"]:
                if kind == "data":
                    check_limit("VHDX log data file offset", off, limit)
                    self.store.pwrite(off, payload)
                else:
                    check_limit("VHDX log zero range end", off + payload, limit)
                    # past the end of the file everything reads as zeros already
                    pos, end = off, min(off + payload, self.store.size())
                    chunk = bytes(min(payload, 1 << 20))
                    while pos < end:
                        n = min(len(chunk), end - pos)
                        self.store.pwrite(pos, chunk[:n])
                        pos += n
        if self.store.size() < last["last"]:
            check_limit("VHDX log last file offset", last["last"], limit)
            self.store.truncate(last["last"])
        self.store.flush()
        self.file_size = self.store.size()
        self.header = dict(self.header, log_guid=ZERO_GUID)
        self._update_headers()
        self.store.flush()

    # ----- check -----
    def check(self, repair: str | None = None):
        """qemu's vhdx check: allocated blocks inside the file and off the metadata regions;
        a log replayed by this (writable) open counts as a repaired corruption."""

        self._load_bat()
        errors = list(self.bat_errors)
        from ..core.check import CheckResult

        # qemu reports these through error_report, with the program name in front
        return CheckResult(corruptions=len(errors), corruptions_fixed=1 if self.replayed else 0,
                           messages=["qimg: " + m for m in errors])

    # ----- create -----
    @classmethod
    def _create_params(cls, opts: CreateOptions):
        o = opts.options
        size = opts.size or 0
        if size > VHDX_MAX_IMAGE_SIZE:
            raise QimgError("Image size too large; max of 64TB")
        sub = o.get("subformat", "dynamic")
        if sub not in ("dynamic", "fixed"):
            raise QimgError(f"Parameter 'subformat' does not accept value '{sub}'")
        log_size = parse_opt_size("log_size", o["log_size"]) if "log_size" in o else DEFAULT_LOG_SIZE
        block_size = parse_opt_size("block_size", o["block_size"]) if "block_size" in o else 0
        zero = parse_bool("block_state_zero", o.get("block_state_zero", "on"))
        if log_size == 0:
            raise QimgError("Log size must be a multiple of 1 MB")
        if log_size >= 4 * GiB:
            raise QimgError("Log size must be smaller than 4 GB")
        log_size = (log_size + MiB - 1) // MiB * MiB
        if block_size == 0:
            block_size = _default_block_size(size)
        block_size = max(VHDX_MIN_BLOCK_SIZE, min(block_size, VHDX_MAX_BLOCK_SIZE))
        if block_size & (block_size - 1):
            raise QimgError("Block size must be a power of two")
        size = (size + 511) // 512 * 512
        return size, sub == "fixed", log_size, block_size, zero

    @classmethod
    def create(cls, filename: str, opts: CreateOptions, opener) -> None:
        prealloc = opts.options.get("preallocation", "off")
        if prealloc not in ("off", "falloc", "full"):
            if prealloc == "metadata":
                raise QimgError("Unsupported preallocation mode: metadata")
            raise QimgError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
        size, fixed, log_size, block_size, use_zero = cls._create_params(opts)

        from .. import __version__

        lss = 512
        chunk_ratio = (1 << 23) * lss // block_size
        data_blocks = (size + block_size - 1) // block_size
        bat_entries = data_blocks + (data_blocks - 1) // chunk_ratio if data_blocks else 0
        # qemu sizes the BAT region of an empty disk with an unsigned wrap: (2^32 - 1) / chunk ratio entries
        region_entries = bat_entries if data_blocks else 0xFFFFFFFF // chunk_ratio
        # qemu's layout: log at 1 MiB, then the BAT, then 1 MiB of metadata; payload 4 MiB later
        log_offset = MiB
        bat_offset = log_offset + log_size
        bat_length = max(MiB, (region_entries * 8 + MiB - 1) // MiB * MiB)
        meta_offset = bat_offset + bat_length
        meta_length = MiB
        data_start = meta_offset + meta_length + 4 * MiB

        ident = bytearray(64 * KiB)
        ident[:8] = b"vhdxfile"
        # the creator field is free text (UTF-16); qemu writes its own name and version there
        creator = f"qimg v{__version__}".encode("utf-16-le")
        ident[8:8 + len(creator)] = creator

        seq0 = int.from_bytes(uuid.uuid4().bytes[:4], "little")
        fwg = uuid.uuid4().bytes_le
        dwg = uuid.uuid4().bytes_le
        h = dict(seq=seq0, file_write_guid=fwg, data_write_guid=dwg, log_guid=ZERO_GUID, log_version=0, version=1,
                 log_length=log_size, log_offset=log_offset)

        region = bytearray(VHDX_REGION_TABLE_SIZE)
        _REGION_HDR.pack_into(region, 0, b"regi", 0, 2, 0)
        _REGION_ENTRY.pack_into(region, 16, BAT_GUID, bat_offset, bat_length, 0)
        _REGION_ENTRY.pack_into(region, 48, METADATA_GUID, meta_offset, meta_length, 0)
        _with_checksum(region)

        meta = bytearray(VHDX_METADATA_TABLE_MAX_SIZE + 4 * KiB)
        _META_HDR.pack_into(meta, 0, b"metadata", 0, 5, bytes(20))
        items = [
            (FILE_PARAMETERS_GUID, struct.pack("<II", block_size, 1 if fixed else 0), 4),
            (VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", size), 2 | 4),
            (PAGE83_DATA_GUID, uuid.uuid4().bytes_le, 2 | 4),
            (LOGICAL_SECTOR_SIZE_GUID, struct.pack("<I", lss), 2 | 4),
            (PHYSICAL_SECTOR_SIZE_GUID, struct.pack("<I", 512), 2 | 4),
        ]
        pos = VHDX_METADATA_TABLE_MAX_SIZE
        for i, (guid, payload, flags) in enumerate(items):
            _META_ENTRY.pack_into(meta, 32 + 32 * i, guid, pos, len(payload), flags, 0)
            meta[pos:pos + len(payload)] = payload
            pos += len(payload)

        # qemu 7.2: block_state_zero wins even for fixed images (ZERO blocks, space reserved);
        # a fixed file ends right after the guest size, not after the last whole block
        if bat_entries <= cls.SMALL_BAT_ENTRIES:
            from array import array

            bat = array("Q", bytes(8 * bat_entries))
            for i in range(data_blocks) if use_zero or fixed else ():
                bat[i + i // chunk_ratio] = (PAYLOAD_BLOCK_ZERO if use_zero else
                                             (data_start + i * block_size) | PAYLOAD_BLOCK_FULLY_PRESENT)
        else:
            import numpy as np

            bat = np.zeros(bat_entries, dtype="<u8")
            idx = np.arange(data_blocks, dtype=np.int64)
            pidx = idx + idx // chunk_ratio
            if use_zero:
                bat[pidx] = PAYLOAD_BLOCK_ZERO
            elif fixed:
                bat[pidx] = (data_start + idx * block_size).astype(np.uint64) | np.uint64(PAYLOAD_BLOCK_FULLY_PRESENT)
        file_end = data_start + size if fixed else data_start

        with opener.open_file(filename, writable=True, create=True) as store:
            store.pwrite(0, bytes(ident))
            h1 = dict(h)
            store.pwrite(VHDX_HEADER1_OFFSET, _pack_header(h1))
            store.pwrite(VHDX_HEADER2_OFFSET, _pack_header(dict(h, seq=seq0 + 1)))
            store.pwrite(VHDX_REGION_TABLE_OFFSET, bytes(region))
            store.pwrite(VHDX_REGION_TABLE2_OFFSET, bytes(region))
            store.pwrite(meta_offset, bytes(meta[:pos]))
            store.pwrite(bat_offset, _u64_bytes(bat))
            store.truncate(max(file_end, data_start))
            if fixed and prealloc == "falloc":
                store.fallocate(data_start, file_end - data_start)
            elif fixed and prealloc == "full":
                chunk = bytes(1 << 20)
                p = data_start
                while p < file_end:
                    store.pwrite(p, chunk[:min(len(chunk), file_end - p)])
                    p += len(chunk)

    @classmethod
    def format_line_options(cls, opts: CreateOptions) -> list[tuple[str, str]]:
        o = opts.options
        log_size = parse_opt_size("log_size", o["log_size"]) if "log_size" in o else DEFAULT_LOG_SIZE
        block_size = parse_opt_size("block_size", o["block_size"]) if "block_size" in o else 0
        out = [("size", str(opts.size or 0)), ("log_size", str(log_size)), ("block_size", str(block_size))]
        if "subformat" in o:
            out.append(("subformat", o["subformat"]))
        if "block_state_zero" in o:
            out.append(("block_state_zero", "on" if parse_bool("block_state_zero", o["block_state_zero"]) else "off"))
        if "preallocation" in o:
            out.append(("preallocation", o["preallocation"]))
        return out
