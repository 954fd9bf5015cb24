"""The qcow2 header and its extensions: parse, validate against named limits, serialise.

References: QEMU docs/interop/qcow2.txt, sections "Header", "Header extensions",
"Feature name table", "Bitmaps extension", "Full disk encryption header pointer",
"External data file name".  Field names follow the spec.

One reader and two writers: ``Header.parse`` serves the driver and the in-place edits alike;
``pack`` lays out the header of a new image, ``repack`` writes an existing one back with its
extensions in file order and the bytes past the known fields kept as they were.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...core.driver import c_string
from ...errors import CorruptImage, OpenError, QimgError, check_limit

QCOW_MAGIC = 0x514649FB
QCOW2_MAGIC_BYTES = b"QFI\xfb"

# header extension types
QCOW2_EXT_MAGIC_END = 0
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441

# incompatible features
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_MASK = 0x1F
# compatible / autoclear features
QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0
QCOW2_AUTOCLEAR_BITMAPS = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1

QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_CRYPT_LUKS = 2

COMPRESSION_TYPE_ZLIB = 0
COMPRESSION_TYPE_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_TYPE_ZLIB: "zlib", COMPRESSION_TYPE_ZSTD: "zstd"}

V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104  # without the compression type byte
V3_HEADER_LENGTH_COMPRESSION = 112  # what qemu writes: 104 + compression type + padding

# ---- named limits (every field read from disk is checked against one) ----
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_SIZE_BYTES = 32 << 20            # L1 table: at most 32 MiB (4 Mi entries)
MAX_REFTABLE_SIZE_BYTES = 8 << 20       # refcount table: at most 8 MiB
MAX_SNAPSHOTS = 65536                   # snapshot count
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20     # whole snapshot table
MAX_SNAPSHOT_EXTRA_BYTES = 1024         # extra data per snapshot entry
MAX_BACKING_NAME = 1023                 # backing file name length
MAX_EXTENSION_BYTES = 1 << 21           # one header extension (bounded by the cluster too)
MAX_VIRTUAL_SIZE = 1 << 61              # guest size (qemu: 2 EiB L1 reach with 2 MiB clusters is far larger)
MAX_BITMAPS = 65535                     # bitmaps in the bitmap directory
MAX_BITMAP_DIRECTORY_BYTES = 64 << 20

FEATURE_NAMES = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)

#: a bitmap directory entry: table offset, table size, flags, type, granularity bits, name size, extra size
BITMAP_ENTRY = struct.Struct(">QIIBBHI")

_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")


@dataclass
class BitmapInfo:
    """One entry of the bitmap directory (what ``info`` shows)."""

    name: str
    flags: int
    granularity_bits: int
    table_offset: int = 0
    table_size: int = 0
    btype: int = 1
    extra: bytes = b""
    entry_pos: int = 0      # where the entry starts in the directory


@dataclass
class Header:
    """A decoded qcow2 header plus its extensions."""

    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_TYPE_ZLIB
    header_tail: bytes = b""  # the bytes from 104 to header_length (compression type first), kept for rewriting
    # extensions
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_table: list = field(default_factory=list)  # [(type, bit, name)]
    crypto_header: tuple | None = None  # (offset, length)
    bitmaps_ext: tuple | None = None  # (nb_bitmaps, directory_size, directory_offset)
    extensions: list = field(default_factory=list)  # [(type, bytes)] in file order, backing format excluded

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    def ext(self, etype: int) -> bytes | None:
        """The raw data of the first extension of type ``etype`` as stored (None if absent)."""
        for t, data in self.extensions:
            if t == etype:
                return data
        return None

    def replace_extension(self, etype: int, data: bytes) -> None:
        """Drop every extension of type ``etype`` and append one with ``data`` (written by ``repack``)."""
        self.extensions = [(t, d) for t, d in self.extensions if t != etype]
        self.extensions.append((etype, data))
        if etype == QCOW2_EXT_MAGIC_DATA_FILE:
            self.data_file = c_string(data)

    # ------------------------------------------------------------------ parse
    @classmethod
    def parse(cls, store, file_size: int | None = None) -> Header:
        """Read and validate the header (and its extensions) from ``store``."""
        head = store.pread(0, V2_HEADER_LENGTH)
        if len(head) < V2_HEADER_LENGTH:
            raise OpenError("Image is not in qcow2 format" if head[:4] != QCOW2_MAGIC_BYTES
                            else "Could not read qcow2 header: file is truncated")
        (magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method, l1_size,
         l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
         snapshots_offset) = _V2.unpack(head)
        if magic != QCOW_MAGIC:
            raise OpenError("Image is not in qcow2 format")
        if version < 2 or version > 3:
            raise OpenError(f"Unsupported qcow2 version {version}")
        h = cls(version=version, backing_file_offset=backing_file_offset, backing_file_size=backing_file_size,
                cluster_bits=cluster_bits, size=size, crypt_method=crypt_method, l1_size=l1_size,
                l1_table_offset=l1_table_offset, refcount_table_offset=refcount_table_offset,
                refcount_table_clusters=refcount_table_clusters, nb_snapshots=nb_snapshots,
                snapshots_offset=snapshots_offset)
        if cluster_bits < MIN_CLUSTER_BITS or cluster_bits > MAX_CLUSTER_BITS:
            raise CorruptImage(f"Unsupported cluster size: 2^{cluster_bits} "
                               f"(cluster_bits must be in {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})")
        cs = 1 << cluster_bits
        if version == 3:
            ext = store.pread(V2_HEADER_LENGTH, V3_HEADER_LENGTH - V2_HEADER_LENGTH)
            if len(ext) < V3_HEADER_LENGTH - V2_HEADER_LENGTH:
                raise CorruptImage("qcow2 header is truncated")
            (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
             h.header_length) = _V3.unpack(ext)
            if h.header_length < V3_HEADER_LENGTH:
                raise CorruptImage(f"qcow2 header too short ({h.header_length} bytes, need at least 104)")
            check_limit("qcow2 header length", h.header_length, cs, "the header (cluster size)")
            if h.header_length > V3_HEADER_LENGTH:
                h.header_tail = bytes(store.pread(V3_HEADER_LENGTH, h.header_length - V3_HEADER_LENGTH))
                h.compression_type = h.header_tail[0] if h.header_tail else 0
        else:
            h.refcount_order = 4
            h.header_length = V2_HEADER_LENGTH
        if h.refcount_order > 6:
            raise CorruptImage(f"Reference count entry width too large; may not exceed 64 bits "
                               f"(refcount_order {h.refcount_order} exceeds the limit 6)")
        unknown = h.incompatible_features & ~QCOW2_INCOMPAT_MASK
        if h.incompatible_features & QCOW2_INCOMPAT_COMPRESSION:
            if h.compression_type not in COMPRESSION_NAMES:
                raise OpenError(f"qcow2: unknown compression type: {h.compression_type}")
        elif h.compression_type != COMPRESSION_TYPE_ZLIB:
            raise OpenError(f"qcow2: Compression type incompatible feature bit must be set if compression "
                            f"type is not zlib (type {h.compression_type})")
        if h.extended_l2 and cs < 16384:
            raise OpenError(f"Unsupported subcluster size: {cs // 32}")
        # the size and table limits
        check_limit("qcow2 virtual size", size, MAX_VIRTUAL_SIZE)
        check_limit("qcow2 L1 table size (bytes)", l1_size * 8, MAX_L1_SIZE_BYTES)
        check_limit("qcow2 refcount table size (bytes)", refcount_table_clusters * cs, MAX_REFTABLE_SIZE_BYTES)
        check_limit("qcow2 snapshot count", nb_snapshots, MAX_SNAPSHOTS)
        check_limit("qcow2 backing file name length", backing_file_size, MAX_BACKING_NAME)
        # the L1 must reach the whole disk
        l2_bits = cluster_bits - (4 if h.extended_l2 else 3)
        need_l1 = -(-size // (1 << (cluster_bits + l2_bits)))
        if l1_size < need_l1:
            raise CorruptImage(f"L1 table is too small ({l1_size} entries for a disk needing {need_l1})")
        file_size = store.size() if file_size is None else file_size
        h._check_table("L1 table", l1_table_offset, l1_size * 8, file_size, cs, l1_size > 0)
        h._check_table("Reference count table", refcount_table_offset, refcount_table_clusters * cs,
                       file_size, cs, True)
        h._check_table("Snapshot table", snapshots_offset, 1, file_size, cs, nb_snapshots > 0)
        if version == 3 or h.header_length < cs:
            h._read_extensions(store, cs)
        if backing_file_offset:
            if backing_file_offset > cs or backing_file_offset + backing_file_size > cs:
                raise CorruptImage("Invalid backing file offset (the name must lie inside the first cluster)")
            raw = store.pread(backing_file_offset, backing_file_size)
            if len(raw) < backing_file_size:
                raise CorruptImage("Could not read backing file name: file is truncated")
            h.backing_file = c_string(raw)
        if unknown:
            raise OpenError("Unsupported qcow2 feature(s): " + h._feature_names(unknown))
        if h.crypt_method not in (QCOW_CRYPT_NONE, QCOW_CRYPT_AES, QCOW_CRYPT_LUKS):
            raise OpenError(f"Unsupported encryption method: {h.crypt_method}")
        return h

    def _feature_names(self, bits: int) -> str:
        names = []
        table = {(t, b): n for t, b, n in self.feature_table if t == 0}
        for bit in range(64):
            if bits & (1 << bit):
                if (0, bit) in table:
                    names.append(table[(0, bit)])
                    bits &= ~(1 << bit)
        parts = list(names)
        if bits:
            parts.append(f"Unknown incompatible feature: {bits:x}")
        return ", ".join(parts)

    @staticmethod
    def _check_table(name: str, offset: int, length: int, file_size: int, cs: int, required: bool) -> None:
        if not required:
            return
        if offset % cs:
            raise CorruptImage(f"{name} offset {offset:#x} is not aligned to the cluster size {cs}")
        if offset == 0:
            raise CorruptImage(f"{name} offset is 0 (points at the header)")
        # a table past the end of the file is not refused: qemu reads it as zeros (and check counts it)

    def _read_extensions(self, store, cs: int) -> None:
        """Walk the extensions between the header and the backing file name (or the end of the first cluster)."""
        start = self.header_length
        end = min(cs, self.backing_file_offset) if self.backing_file_offset else cs
        if end <= start:
            return  # as qemu: a name right after the header leaves no room for extensions
        area = store.pread(start, end - start)
        pos = 0
        while pos + 8 <= len(area):
            etype, elen = struct.unpack_from(">II", area, pos)
            pos += 8
            if etype == QCOW2_EXT_MAGIC_END:
                return
            check_limit("qcow2 header extension length", elen, min(MAX_EXTENSION_BYTES, len(area) - pos),
                        f"extension {etype:#x}")
            data = bytes(area[pos:pos + elen])
            pos += (elen + 7) & ~7
            if etype == QCOW2_EXT_MAGIC_BACKING_FORMAT:
                self.backing_format = c_string(data)
                continue
            self.extensions.append((etype, data))
            if etype == QCOW2_EXT_MAGIC_FEATURE_TABLE:
                n = elen // 48
                for i in range(n):
                    t, b = data[i * 48], data[i * 48 + 1]
                    name = c_string(data[i * 48 + 2:i * 48 + 48])
                    self.feature_table.append((t, b, name))
            elif etype == QCOW2_EXT_MAGIC_DATA_FILE:
                self.data_file = c_string(data)
            elif etype == QCOW2_EXT_MAGIC_CRYPTO_HEADER:
                if elen < 16:
                    raise CorruptImage("Invalid encryption header extension length")
                self.crypto_header = struct.unpack_from(">QQ", data)
            elif etype == QCOW2_EXT_MAGIC_BITMAPS:
                if elen < 24:
                    raise CorruptImage("Invalid bitmaps extension length")
                nb, _res, dsize, doff = struct.unpack_from(">IIQQ", data)
                check_limit("qcow2 bitmap count", nb, MAX_BITMAPS)
                check_limit("qcow2 bitmap directory size", dsize, MAX_BITMAP_DIRECTORY_BYTES)
                self.bitmaps_ext = (nb, dsize, doff)
        # running off the end of the cluster without an end marker is tolerated, like qemu

    # ------------------------------------------------------------------ serialise
    def pack(self) -> bytes:
        """A new image's header, extensions and backing file name, laid out as qemu-img creates them."""
        if self.version >= 3:
            self.header_length = V3_HEADER_LENGTH_COMPRESSION
            self.header_tail = bytes(V3_HEADER_LENGTH_COMPRESSION - V3_HEADER_LENGTH)
        else:
            self.header_length = V2_HEADER_LENGTH
        exts = []
        if self.backing_format:
            exts.append((QCOW2_EXT_MAGIC_BACKING_FORMAT, self.backing_format.encode()))
        if self.data_file:
            exts.append((QCOW2_EXT_MAGIC_DATA_FILE, self.data_file.encode()))
        if self.crypto_header:
            exts.append((QCOW2_EXT_MAGIC_CRYPTO_HEADER, struct.pack(">QQ", *self.crypto_header)))
        if self.version >= 3 and self.cluster_size >= 8192:
            # qemu-img leaves the feature name table out of small clusters
            exts.append((QCOW2_EXT_MAGIC_FEATURE_TABLE, feature_table_bytes()))
        if self.bitmaps_ext:
            nb, dsize, doff = self.bitmaps_ext
            exts.append((QCOW2_EXT_MAGIC_BITMAPS, struct.pack(">IIQQ", nb, 0, dsize, doff)))
        out = self._page(exts)
        self.backing_file_offset, self.backing_file_size = struct.unpack_from(">QI", out, 8)
        if len(out) > self.cluster_size:
            raise CorruptImage("qcow2 header and extensions do not fit in one cluster")
        return out

    def repack(self) -> bytes:
        """This (parsed, then edited) header written back: extensions in file order, the bytes past the
        known header fields as they were, the backing format only with a backing file, no feature name
        table on version 2."""
        exts = []
        if self.backing_format and self.backing_file:
            exts.append((QCOW2_EXT_MAGIC_BACKING_FORMAT, self.backing_format.encode()))
        exts.extend((t, d) for t, d in self.extensions if t != QCOW2_EXT_MAGIC_BACKING_FORMAT
                    and (self.version >= 3 or t != QCOW2_EXT_MAGIC_FEATURE_TABLE))
        if self.backing_file and len(self.backing_file.encode()) > MAX_BACKING_NAME:
            raise QimgError("Invalid argument")  # (qemu-img: EINVAL, a name longer than 1023 bytes)
        out = self._page(exts)
        if len(out) > self.cluster_size:
            raise QimgError("Cannot fit the header, its extensions and the backing file name into one cluster")
        return out

    def _page(self, exts: list) -> bytes:
        """Header fields, ``header_tail`` (v3), the extensions, the end marker and the backing file name."""
        out = bytearray(_V2.pack(QCOW_MAGIC, self.version, 0, 0, self.cluster_bits, self.size, self.crypt_method,
                                 self.l1_size, self.l1_table_offset, self.refcount_table_offset,
                                 self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset))
        if self.version >= 3:
            hlen = max(self.header_length, V3_HEADER_LENGTH)
            if self.compression_type and hlen < V3_HEADER_LENGTH_COMPRESSION:
                hlen = V3_HEADER_LENGTH_COMPRESSION
            out += _V3.pack(self.incompatible_features, self.compatible_features, self.autoclear_features,
                            self.refcount_order, hlen)
            tail = bytearray(self.header_tail.ljust(hlen - V3_HEADER_LENGTH, b"\0")[:hlen - V3_HEADER_LENGTH])
            if tail:
                tail[0] = self.compression_type
            out += tail
        for etype, data in exts:
            out += _ext(etype, data)
        out += struct.pack(">II", QCOW2_EXT_MAGIC_END, 0)
        if self.backing_file:
            name = self.backing_file.encode()
            struct.pack_into(">QI", out, 8, len(out), len(name))
            out += name
        return bytes(out)


def feature_table_bytes() -> bytes:
    """The feature name table extension's data (every feature this implementation knows)."""
    return b"".join(struct.pack(">BB46s", t, b, n.encode()) for t, b, n in FEATURE_NAMES)


def _ext(etype: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return struct.pack(">II", etype, len(data)) + data + bytes(pad)


def read_bitmap_directory(store, h: Header, file_size: int) -> list[BitmapInfo]:
    """The bitmap directory entries named by the bitmaps extension (validated)."""
    if not h.bitmaps_ext:
        return []
    nb, dsize, doff = h.bitmaps_ext
    if nb == 0:
        return []
    if doff % h.cluster_size or doff + dsize > file_size:
        raise CorruptImage("Bitmap directory offset is invalid (misaligned or past the end of the file)")
    raw = store.pread(doff, dsize)
    if len(raw) < dsize:
        raise CorruptImage("Bitmap directory is truncated")
    out = []
    pos = 0
    for _ in range(nb):
        if pos + 24 > dsize:
            raise CorruptImage("Bitmap directory is truncated")
        toff, tsize, flags, btype, gbits, nsize, xsize = BITMAP_ENTRY.unpack_from(raw, pos)
        check_limit("qcow2 bitmap extra data size", xsize, 1 << 16)
        p = pos + 24 + xsize
        if p + nsize > dsize:
            raise CorruptImage("Bitmap directory entry is truncated")
        name = c_string(raw[p:p + nsize])
        out.append(BitmapInfo(name, flags, gbits, toff, tsize, btype, bytes(raw[pos + 24:pos + 24 + xsize]), pos))
        pos = (p + nsize + 7) & ~7
    return out
