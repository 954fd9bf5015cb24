"""qcow2 metadata read and rewritten as a whole: the base of check, snapshot, resize, amend and backing changes.

References:
  qcow2 specification (qemu docs/interop/qcow2.txt): "Header", "Header extensions", "Host cluster
  management" (refcount table and refcount blocks, refcount_order), "Cluster mapping" (L1/L2 entries,
  the compressed cluster descriptor, extended L2 entries), "Snapshots" (table entries and extra data),
  "Bitmaps" (bitmap directory and bitmap tables, for their cluster references).
  Observed behaviour of qemu-img 7.2 (check, snapshot, resize, amend, rebase, commit).

How a change is made (crash safety): live metadata is never edited in place.  New L1 and L2 tables,
a new snapshot table and a complete new refcount structure go to clusters that are free both in the
old and in the new image; everything is flushed (fdatasync); then ONE write of the header page (the
header, its extensions and the backing file name, at most 4 KiB from offset 0, so a killed process
leaves it all old or all new) switches the image over, and is flushed in turn.  A process killed
before the switch leaves the old image exactly as it was; after it, the new one.  Clusters only the
old image used become free (refcount 0), never leaked.
"""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass, field

import numpy as np

from ...errors import CorruptImage, QimgError, check_limit

QCOW_MAGIC = 0x514649FB
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
QCOW_L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

# limits (qemu's own where it has one)
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
QCOW_MAX_L1_SIZE = 32 << 20            # bytes
QCOW_MAX_REFTABLE_SIZE = 8 << 20       # bytes
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOTS_SIZE = 64 << 20     # bytes of snapshot table
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_BACKING_NAME = 1023
QCOW_MAX_EXTENSIONS_SIZE = 1 << 21
QCOW_MAX_BITMAPS = 65535
QCOW_MAX_BITMAP_DIRECTORY_SIZE = 64 << 20
HEADER_PAGE = 4096
L2_CACHE_BYTES = 64 << 20

_HDR = struct.Struct(">IIQIIQIIQQIIQ")   # version 2 fields, 72 bytes
_HDR3 = struct.Struct(">QQQII")           # version 3 additions, up to header_length 104
_SNAP = struct.Struct(">QIHHIIQII")       # fixed part of a snapshot table entry, 40 bytes


class RefcountOverflow(QimgError):
    """A reference count would not fit in refcount_bits."""


@dataclass
class Header:
    """The qcow2 header and what sits in the header cluster (extensions, backing file name)."""

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
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = 104
    compression_type: int = 0
    header_tail: bytes = b""     # bytes between 104 and header_length, kept as they are
    extensions: list = field(default_factory=list)   # [(type, data)] in file order, backing format excluded
    backing_file: str | None = None
    backing_fmt: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible & INCOMPAT_DATA_FILE)

    def ext(self, etype: int) -> bytes | None:
        for t, data in self.extensions:
            if t == etype:
                return data
        return None

    def to_bytes(self) -> bytes:
        """The header page: header, extensions, end marker, backing file name."""
        out = bytearray(_HDR.pack(
            QCOW_MAGIC, self.version, 0, 0, self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
            self.snapshots_offset))
        if self.version >= 3:
            hlen = max(self.header_length, 104)
            if self.compression_type and hlen < 112:
                hlen = 112
            out += _HDR3.pack(self.incompatible, self.compatible, self.autoclear, self.refcount_order, hlen)
            tail = bytearray(self.header_tail.ljust(hlen - 104, b"\0")[:hlen - 104])
            if hlen > 104:
                tail[0] = self.compression_type
            out += tail
        exts = []
        if self.backing_fmt and self.backing_file:
            exts.append((EXT_BACKING_FORMAT, self.backing_fmt.encode()))
        exts.extend((t, d) for t, d in self.extensions if t != EXT_BACKING_FORMAT
                    and (self.version >= 3 or t != EXT_FEATURE_TABLE))
        for t, d in exts:
            out += struct.pack(">II", t, len(d)) + d + bytes(-len(d) % 8)
        out += bytes(8)  # end of extensions
        if self.backing_file:
            name = self.backing_file.encode()
            if len(name) > QCOW_MAX_BACKING_NAME:
                raise QimgError("Backing file name too long")
            struct.pack_into(">QI", out, 8, len(out), len(name))
            out += name
        if len(out) > self.cluster_size:
            raise QimgError("Cannot fit the header, its extensions and the backing file name into one cluster")
        return bytes(out)


@dataclass
class Snapshot:
    """One snapshot table entry (extra data kept as raw bytes)."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    extra: bytes = b""
    unknown_extra_ok: bool = True
    #: a new L1 table for this snapshot (written at commit); None keeps l1_table_offset
    new_l1: object = None

    @property
    def vm_state_size_large(self) -> int:
        if len(self.extra) >= 8:
            return struct.unpack_from(">Q", self.extra, 0)[0]
        return self.vm_state_size

    @property
    def disk_size(self) -> int | None:
        if len(self.extra) >= 16:
            return struct.unpack_from(">Q", self.extra, 8)[0]
        return None

    @property
    def icount(self) -> int | None:
        if len(self.extra) >= 24:
            v = struct.unpack_from(">Q", self.extra, 16)[0]
            return None if v == (1 << 64) - 1 else v
        return None

    def to_bytes(self) -> bytes:
        ident = self.id.encode()
        name = self.name.encode()
        vm32 = self.vm_state_size if self.vm_state_size < (1 << 32) else 0
        out = _SNAP.pack(self.l1_table_offset, self.l1_size, len(ident), len(name), self.date_sec, self.date_nsec,
                         self.vm_clock_nsec, vm32, len(self.extra)) + self.extra + ident + name
        return out + bytes(-len(out) % 8)

    def info(self) -> dict:
        """qemu's SnapshotInfo dict (info / snapshot -l)."""
        d = {
            "icount": self.icount,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
            "name": self.name,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "id": self.id,
            "vm-state-size": self.vm_state_size_large,
        }
        if d["icount"] is None:
            del d["icount"]
        return d


def parse_header(head: bytes, file_size: int) -> Header:
    """Decode the header cluster (``head`` holds at least its first cluster, or the whole file if shorter)."""
    if len(head) < 72:
        raise CorruptImage("Image is not in qcow2 format")
    f = _HDR.unpack_from(head, 0)
    if f[0] != QCOW_MAGIC:
        raise CorruptImage("Image is not in qcow2 format")
    h = Header(version=f[1], backing_file_offset=f[2], backing_file_size=f[3], cluster_bits=f[4], size=f[5],
               crypt_method=f[6], l1_size=f[7], l1_table_offset=f[8], refcount_table_offset=f[9],
               refcount_table_clusters=f[10], nb_snapshots=f[11], snapshots_offset=f[12])
    if h.version not in (2, 3):
        raise QimgError(f"Unsupported qcow2 version {h.version}")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImage(f"Unsupported cluster size: 2^{h.cluster_bits}")
    if h.version == 3:
        if len(head) < 104:
            raise CorruptImage("qcow2 header exceeds cluster size")
        h.incompatible, h.compatible, h.autoclear, h.refcount_order, h.header_length = _HDR3.unpack_from(head, 72)
        check_limit("qcow2 header_length", h.header_length, h.cluster_size)
        if h.header_length < 104:
            raise CorruptImage("qcow2 header too short")
        h.header_tail = bytes(head[104:h.header_length])
        if h.header_length > 104:
            h.compression_type = head[104]
        if h.refcount_order > 6:
            raise CorruptImage("Reference count entry width too large; may not exceed 64 bits")
    else:
        h.header_length = 72
        h.refcount_order = 4
    cs = h.cluster_size
    ext_end = h.backing_file_offset if h.backing_file_offset else cs
    ext_end = min(ext_end, cs, len(head))
    pos = h.header_length
    while pos + 8 <= ext_end:
        etype, elen = struct.unpack_from(">II", head, pos)
        pos += 8
        if etype == EXT_END:
            break
        if elen > ext_end - pos:
            raise CorruptImage("Invalid extension length in qcow2 header")
        data = bytes(head[pos:pos + elen])
        pos += (elen + 7) & ~7
        if etype == EXT_BACKING_FORMAT:
            h.backing_fmt = data.decode("utf-8", "replace")
        else:
            h.extensions.append((etype, data))
    if h.backing_file_offset:
        check_limit("qcow2 backing file name length", h.backing_file_size, QCOW_MAX_BACKING_NAME)
        if h.backing_file_offset + h.backing_file_size > min(cs, len(head)):
            raise CorruptImage("Invalid backing file offset")
        h.backing_file = bytes(head[h.backing_file_offset:h.backing_file_offset + h.backing_file_size]).decode(
            "utf-8", "replace")
    return h


def _be64(buf) -> np.ndarray:
    return np.frombuffer(buf, ">u8").astype(np.uint64)


class Qcow2Meta:
    """All metadata of one qcow2 file, read through a store; nothing is cached across changes."""

    def __init__(self, store):
        self.store = store
        self.file_size = store.size()
        head = store.pread_full(0, min(HEADER_PAGE, max(self.file_size, 72)))
        h = parse_header(head, self.file_size)
        if h.cluster_size > len(head):
            head = store.pread_full(0, min(h.cluster_size, max(self.file_size, 72)))
            h = parse_header(head, self.file_size)
        self.header = h
        cs = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.cluster_size = cs
        self.l2_entry_words = 2 if h.extended_l2 else 1
        self.l2_entries = cs // (8 * self.l2_entry_words)
        self.csize_shift = 62 - (h.cluster_bits - 8)
        self.csize_mask = (1 << (h.cluster_bits - 8)) - 1
        self.cluster_offset_mask = (1 << self.csize_shift) - 1
        self.rc_per_block = cs * 8 // h.refcount_bits
        self.file_clusters = -(-self.file_size // cs)
        self._l2_cache: dict[int, np.ndarray] = {}
        # the tables, checked against their limits before anything is read
        check_limit("qcow2 L1 table entries", h.l1_size, QCOW_MAX_L1_SIZE // 8)
        check_limit("qcow2 refcount table clusters", h.refcount_table_clusters, QCOW_MAX_REFTABLE_SIZE // cs + 1)
        check_limit("qcow2 snapshot count", h.nb_snapshots, QCOW_MAX_SNAPSHOTS)
        if h.l1_size and (h.l1_table_offset % cs or h.l1_table_offset + h.l1_size * 8 > self.file_size):
            raise CorruptImage("Invalid L1 table offset")
        if h.refcount_table_offset % cs or h.refcount_table_offset + h.refcount_table_clusters * cs > max(
                self.file_size, cs):
            raise CorruptImage("Invalid reference count table offset")
        if h.size > (1 << 63) - 1:
            raise CorruptImage("Image size too large")
        need_l1 = -(-h.size // (cs * self.l2_entries))
        if h.l1_size < need_l1:
            raise CorruptImage("L1 table is too small")
        self.l1 = self.read_table(h.l1_table_offset, h.l1_size)
        self.reftable = self.read_table(h.refcount_table_offset, h.refcount_table_clusters * cs // 8)
        self.snapshots = self._read_snapshots()

    # ----- reading -----
    def read_table(self, offset: int, entries: int) -> np.ndarray:
        if entries == 0:
            return np.zeros(0, np.uint64)
        return _be64(self.store.pread_full(offset, entries * 8))

    def snapshot_table_size(self) -> int:
        return sum(len(s.to_bytes()) for s in self.snapshots)

    def _read_snapshots(self) -> list[Snapshot]:
        h = self.header
        if h.nb_snapshots == 0:
            return []
        if h.snapshots_offset % self.cluster_size or h.snapshots_offset >= self.file_size:
            raise CorruptImage("Snapshot table offset invalid")
        limit = min(QCOW_MAX_SNAPSHOTS_SIZE, self.file_size - h.snapshots_offset)
        want = min(limit, h.nb_snapshots * 1104 + 8)
        while True:
            data = self.store.pread_full(h.snapshots_offset, want)
            try:
                return self._parse_snapshots(data)
            except CorruptImage:
                if want >= limit:
                    raise
                want = min(limit, want * 4)   # long names or extra data: read more, up to the limit

    def _parse_snapshots(self, data: bytes) -> list[Snapshot]:
        h = self.header
        snaps = []
        pos = 0
        for _ in range(h.nb_snapshots):
            if pos + _SNAP.size > len(data):
                raise CorruptImage("Snapshot table exceeds the limit or the end of the file")
            (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize, extra_len) = _SNAP.unpack_from(data, pos)
            pos += _SNAP.size
            check_limit("qcow2 snapshot extra data size", extra_len, QCOW_MAX_SNAPSHOT_EXTRA_DATA)
            end = pos + extra_len + id_len + name_len
            if end > len(data):
                raise CorruptImage("Snapshot table exceeds the limit or the end of the file")
            extra = bytes(data[pos:pos + extra_len])
            pos += extra_len
            ident = bytes(data[pos:pos + id_len]).decode("utf-8", "replace")
            pos += id_len
            name = bytes(data[pos:pos + name_len]).decode("utf-8", "replace")
            pos += name_len
            pos = (pos + 7) & ~7
            snaps.append(Snapshot(l1_off, l1_size, ident, name, dsec, dnsec, clock, vmsize, extra))
        self.snapshot_table_bytes = pos
        return snaps

    def read_l2(self, offset: int) -> np.ndarray:
        """An L2 table as uint64 entries ((n, 2) with the subcluster bitmaps for extended L2)."""
        arr = self._l2_cache.get(offset)
        if arr is None:
            arr = _be64(self.store.pread_full(offset, self.cluster_size))
            if self.l2_entry_words == 2:
                arr = arr.reshape(-1, 2)
            if len(self._l2_cache) * self.cluster_size >= L2_CACHE_BYTES:
                self._l2_cache.clear()   # bounded memory on huge images; tables are re-read when needed
            self._l2_cache[offset] = arr
        return arr

    def read_refcounts(self, nb_clusters: int | None = None) -> np.ndarray:
        """The refcounts stored on disk, one per host cluster (int64)."""
        n = self.file_clusters if nb_clusters is None else nb_clusters
        rpb = self.rc_per_block
        out = np.zeros(max(n, len(self.reftable) * 0), np.int64)
        for i, ent in enumerate(self.reftable.tolist()):
            off = ent & REFT_OFFSET_MASK
            if not off or ent & REFT_RESERVED_MASK or off % self.cluster_size or off >= self.file_size:
                continue
            first = i * rpb
            if first >= n:
                break
            vals = decode_refblock(self.store.pread_full(off, self.cluster_size), self.header.refcount_order)
            k = min(rpb, n - first)
            out[first:first + k] = vals[:k]
        return out

    def refcount_of(self, cluster: int) -> int:
        rpb = self.rc_per_block
        i = cluster // rpb
        if i >= len(self.reftable):
            return 0
        ent = int(self.reftable[i])
        off = ent & REFT_OFFSET_MASK
        if not off or off % self.cluster_size or off >= self.file_size:
            return 0
        vals = decode_refblock(self.store.pread_full(off, self.cluster_size), self.header.refcount_order)
        return int(vals[cluster % rpb])

    # ----- mapping helpers -----
    def l2_words(self, l2) -> np.ndarray:
        return l2[:, 0] if l2.ndim == 2 else l2

    def data_refs(self, l2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(standard cluster indices, compressed first clusters, compressed last clusters) of one L2 table."""
        e = self.l2_words(l2)
        comp = (e & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
        off = e & np.uint64(L2E_OFFSET_MASK)
        std = off[~comp & (off != 0)] >> np.uint64(self.cluster_bits)
        ce = e[comp]
        coff = (ce & np.uint64(self.cluster_offset_mask)) & ~np.uint64(511)
        nsec = ((ce >> np.uint64(self.csize_shift)) & np.uint64(self.csize_mask)) + np.uint64(1)
        first = coff >> np.uint64(self.cluster_bits)
        last = (coff + nsec * np.uint64(512) - np.uint64(1)) >> np.uint64(self.cluster_bits)
        return std.astype(np.int64), first.astype(np.int64), last.astype(np.int64)

    def static_refs(self) -> list[tuple[int, int]]:
        """Byte ranges referenced by the header's extensions (crypto header, bitmaps) besides cluster 0."""
        h = self.header
        out = []
        crypto = h.ext(EXT_CRYPTO_HEADER)
        if crypto is not None and len(crypto) >= 16:
            off, length = struct.unpack_from(">QQ", crypto, 0)
            out.append((off, length))
        bm = h.ext(EXT_BITMAPS)
        if bm is not None and len(bm) >= 24 and h.autoclear & AUTOCLEAR_BITMAPS:
            out.extend(self._bitmap_refs(bm))
        return out

    def _bitmap_refs(self, ext: bytes) -> list[tuple[int, int]]:
        nb, _res, dir_size, dir_off = struct.unpack_from(">IIQQ", ext, 0)
        check_limit("qcow2 bitmap count", nb, QCOW_MAX_BITMAPS)
        check_limit("qcow2 bitmap directory size", dir_size, QCOW_MAX_BITMAP_DIRECTORY_SIZE)
        out = [(dir_off, dir_size)]
        data = self.store.pread_full(dir_off, dir_size)
        pos = 0
        for _ in range(nb):
            if pos + 24 > len(data):
                break
            tab_off, tab_size, _flags, _type, _gran, name_len, extra_len = struct.unpack_from(">QIIBBHI", data, pos)
            out.append((tab_off, tab_size * 8))
            check_limit("qcow2 bitmap table size", tab_size, QCOW_MAX_L1_SIZE)
            tab = self.read_table(tab_off, tab_size) & np.uint64(0x00FFFFFFFFFFFE00)
            for o in tab[tab > 1].tolist():
                out.append((o, self.cluster_size))
            pos += (24 + extra_len + name_len + 7) & ~7
        return out


def decode_refblock(buf: bytes, order: int) -> np.ndarray:
    """Refcount block bytes -> int64 values (sub-byte widths are packed low bits first)."""
    bits = 1 << order
    if bits >= 8:
        dt = {8: ">u1", 16: ">u2", 32: ">u4", 64: ">u8"}[bits]
        return np.frombuffer(buf, dt).astype(np.int64)
    raw = np.frombuffer(buf, np.uint8)
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1).astype(np.int64)


def encode_refblock(vals: np.ndarray, order: int, cluster_size: int) -> bytes:
    bits = 1 << order
    per = cluster_size * 8 // bits
    v = np.zeros(per, np.uint64)
    v[:len(vals)] = vals
    if bits >= 8:
        dt = {8: ">u1", 16: ">u2", 32: ">u4", 64: ">u8"}[bits]
        return v.astype(dt).tobytes()
    shifts = np.arange(0, 8, bits, dtype=np.uint64)
    packed = (v.reshape(-1, 8 // bits) << shifts).sum(axis=1)
    return packed.astype(np.uint8).tobytes()


# --------------------------------------------------------------------------------------------
# References of a whole image state, and the copy-on-write commit
# --------------------------------------------------------------------------------------------

class RefCollector:
    """Collects referenced cluster indices; counts them with one bincount."""

    def __init__(self, cluster_bits: int):
        self.bits = cluster_bits
        self.parts: list[np.ndarray] = []

    def add_range(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = offset >> self.bits
        last = (offset + length - 1) >> self.bits
        self.parts.append(np.arange(first, last + 1, dtype=np.int64))

    def add_indices(self, idx: np.ndarray) -> None:
        if len(idx):
            self.parts.append(np.asarray(idx, np.int64))

    def add_spans(self, first: np.ndarray, last: np.ndarray) -> None:
        if not len(first):
            return
        self.parts.append(first)
        span = last - first
        k = 1
        while True:
            sel = span >= k
            if not sel.any():
                break
            self.parts.append(first[sel] + k)
            k += 1

    def counts(self, minlength: int = 0) -> np.ndarray:
        if not self.parts:
            return np.zeros(minlength, np.int64)
        allidx = np.concatenate(self.parts)
        return np.bincount(allidx, minlength=minlength).astype(np.int64)

    def max_index(self) -> int:
        return max((int(p.max()) for p in self.parts if len(p)), default=-1)


@dataclass
class L1Plan:
    """An L1 table of the new image: entries (L2 offsets) plus L2 tables to write afresh."""

    entries: np.ndarray
    l2_new: dict = field(default_factory=dict)   # l1 index -> L2 array to write to a new cluster
    location: int | None = None                  # existing on-disk L1 offset to keep, or None: write anew


@dataclass
class Change:
    """The new image: header (copy), active L1 plan, snapshots (each with its plan), extra data ranges."""

    header: Header
    active: L1Plan
    snapshots: list
    snapshot_plans: list
    extra_refs: list = field(default_factory=list)    # (offset, length) of new data clusters
    zero_fill: list = field(default_factory=list)     # (offset, length) to zero before the switch
    truncate_file: bool = False


def current_plan(meta: Qcow2Meta) -> Change:
    """A Change describing the image as it is (ops edit it, then commit)."""
    h = copy.deepcopy(meta.header)
    snaps = [copy.copy(s) for s in meta.snapshots]
    for s in snaps:
        check_limit("qcow2 snapshot L1 table entries", s.l1_size, QCOW_MAX_L1_SIZE // 8, f"snapshot '{s.name}'")
    plans = [L1Plan(meta.read_table(s.l1_table_offset, s.l1_size) & np.uint64(L1E_OFFSET_MASK),
                    location=s.l1_table_offset) for s in snaps]
    active = L1Plan(meta.l1 & np.uint64(L1E_OFFSET_MASK))
    return Change(h, active, snaps, plans)


def _plan_refs(meta: Qcow2Meta, plan: L1Plan, rc: RefCollector, table_refs: bool = True) -> None:
    data_file = meta.header.has_data_file
    ents = plan.entries
    if plan.location is not None and table_refs:
        rc.add_range(plan.location, len(ents) * 8)
    for i in np.nonzero(ents)[0].tolist():
        if i in plan.l2_new:
            l2 = plan.l2_new[i]
        else:
            off = int(ents[i])
            if table_refs:
                rc.add_range(off, meta.cluster_size)
            l2 = meta.read_l2(off)
        std, cf, cl = meta.data_refs(l2)
        if not data_file:
            rc.add_indices(std)
        rc.add_spans(cf, cl)


def set_copied_flags(meta: Qcow2Meta, l2: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """L2 entries with OFLAG_COPIED set exactly where the data cluster's refcount is 1."""
    if meta.header.has_data_file:
        # external data file: no refcounts for data, and OFLAG_COPIED on an offset-0 entry is what
        # marks it allocated; the flags stay as they are
        return l2.copy()
    l2 = l2.copy()
    e = meta.l2_words(l2)
    comp = (e & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
    off = e & np.uint64(L2E_OFFSET_MASK)
    idx = (off >> np.uint64(meta.cluster_bits)).astype(np.int64)
    std = ~comp & (off != 0)
    one = np.zeros(len(e), bool)
    if meta.header.has_data_file:
        one[std] = True
    else:
        inrange = std & (idx < len(ref))
        one[inrange] = ref[idx[inrange]] == 1
    e &= ~np.uint64(QCOW_OFLAG_COPIED)
    e[one] |= np.uint64(QCOW_OFLAG_COPIED)
    if l2.ndim == 2:
        l2[:, 0] = e
    else:
        l2 = e
    return l2


class _Allocator:
    """First fit over clusters free in the old and the new image; grows past the end."""

    def __init__(self, used: np.ndarray):
        self.used = used.copy()

    def alloc(self, n: int) -> int:
        if n <= 0:
            return 0
        used = self.used
        free = ~used
        # first run of n free clusters (cluster 0 is never free)
        if n == 1:
            cand = np.nonzero(free)[0]
            start = int(cand[0]) if len(cand) else len(used)
        else:
            start = len(used)
            if free.any():
                f = np.concatenate(([0], free.astype(np.int8), [0]))
                d = np.diff(f)
                starts = np.nonzero(d == 1)[0]
                ends = np.nonzero(d == -1)[0]
                ok = np.nonzero(ends - starts >= n)[0]
                if len(ok):
                    start = int(starts[ok[0]])
            if start == len(used):
                # extend from the last used cluster
                tail = np.nonzero(used)[0]
                start = int(tail[-1]) + 1 if len(tail) else 1
        end = start + n
        if end > len(self.used):
            self.used = np.concatenate((self.used, np.zeros(end - len(self.used) + 64, bool)))
        self.used[start:end] = True
        return start


def commit(meta: Qcow2Meta, change: Change, old_refs: np.ndarray | None = None, flush: bool = True,
           progress=None) -> dict:
    """Write ``change`` copy-on-write and switch the header to it; returns the final refcounts info."""
    store = meta.store
    cs = meta.cluster_size
    bits = meta.cluster_bits
    h = change.header
    # 1. references of the new image, except the tables written afresh
    rc = RefCollector(bits)
    rc.add_range(0, cs)
    for off, length in meta.static_refs():
        rc.add_range(off, length)
    for off, length in change.extra_refs:
        rc.add_range(off, length)
    plans = [change.active] + list(change.snapshot_plans)
    for p in plans:
        _plan_refs(meta, p, rc)
    ref = rc.counts(meta.file_clusters)
    # 2. active L2 tables whose COPIED flags would be wrong are rewritten (copy-on-write)
    act = change.active
    for i in np.nonzero(act.entries)[0].tolist():
        if i in act.l2_new:
            continue
        off = int(act.entries[i])
        l2 = meta.read_l2(off)
        fixed = set_copied_flags(meta, l2, ref)
        if not np.array_equal(fixed, l2):
            act.l2_new[i] = fixed
            ref[off >> bits] -= 1
    for i in list(act.l2_new):
        act.l2_new[i] = set_copied_flags(meta, act.l2_new[i], ref)
    act.location = None
    # 3. clusters in use by the old image or the new one are off limits
    n = max(len(ref), meta.file_clusters)
    used = np.zeros(n + 1, bool)
    used[:len(ref)] |= ref > 0
    ondisk = meta.read_refcounts(meta.file_clusters)
    used[:len(ondisk)] |= ondisk > 0
    if old_refs is not None:
        k = min(len(old_refs), len(used))
        used[:k] |= old_refs[:k] > 0
        if len(old_refs) > len(used):
            used = np.concatenate((used, old_refs[len(used):] > 0))
    used[0] = True
    alloc = _Allocator(used)
    new_clusters: list[tuple[int, int]] = []   # (first cluster, count)

    def take(count):
        first = alloc.alloc(count)
        new_clusters.append((first, count))
        return first * cs

    l2_where = {}
    for pi, p in enumerate(plans):
        for i in sorted(p.l2_new):
            l2_where[(pi, i)] = take(1)
    l1_where = {}
    for pi, p in enumerate(plans):
        if p.location is None:
            l1_where[pi] = take(max(1, -(-len(p.entries) * 8 // cs))) if len(p.entries) else 0
    snap_bytes = b""
    # snapshot entries carry their L1 offsets: fill them before sizing the table
    for si, s in enumerate(change.snapshots):
        p = change.snapshot_plans[si]
        s.l1_table_offset = p.location if p.location is not None else l1_where[si + 1]
        s.l1_size = len(p.entries)
    for s in change.snapshots:
        if len(s.extra) < 24:
            # qemu writes the full extra data (vm_state_size_large, disk_size, icount) for every entry
            vm = s.vm_state_size_large
            ds = s.disk_size if s.disk_size is not None else h.size
            s.extra = struct.pack(">QQQ", vm, ds, (1 << 64) - 1)
    snap_bytes = b"".join(s.to_bytes() for s in change.snapshots)
    check_limit("qcow2 snapshot table size", len(snap_bytes), QCOW_MAX_SNAPSHOTS_SIZE)
    snap_off = take(-(-len(snap_bytes) // cs)) if change.snapshots else 0
    # 4. the refcount structure, sized for everything above plus itself
    final = np.zeros(len(alloc.used), np.int64)
    final[:len(ref)] = ref
    for first, count in new_clusters:
        final = _grow(final, first + count)
        final[first:first + count] += 1
    rpb = cs * 8 // h.refcount_bits
    while True:
        top = int(np.nonzero(final)[0][-1]) + 1
        nblocks = -(-top // rpb)
        rt_clusters = max(1, -(-nblocks * 8 // cs))
        # room for growth caused by the structure itself
        nblocks_try = -(-(top + nblocks + rt_clusters + 2) // rpb)
        rt_clusters = max(1, -(-nblocks_try * 8 // cs))
        check_limit("qcow2 refcount table size", rt_clusters * cs, QCOW_MAX_REFTABLE_SIZE)
        saved = alloc.used.copy()
        rt_first = alloc.alloc(rt_clusters)
        blocks = [alloc.alloc(1) for _ in range(nblocks_try)]
        trial = _grow(final.copy(), max([rt_first + rt_clusters] + [b + 1 for b in blocks]))
        trial[rt_first:rt_first + rt_clusters] += 1
        for b in blocks:
            trial[b] += 1
        top2 = int(np.nonzero(trial)[0][-1]) + 1
        if -(-top2 // rpb) <= nblocks_try and nblocks_try * 8 <= rt_clusters * cs:
            final = trial
            break
        alloc.used = saved
    maxrc = (1 << h.refcount_bits) - 1
    if int(final.max()) > maxrc:
        raise RefcountOverflow(f"Cannot update refcounts: a refcount exceeds the {h.refcount_bits}-bit limit")
    # 5. write everything that the new header points to, then flush
    for (pi, i), where in l2_where.items():
        arr = plans[pi].l2_new[i]
        store.pwrite(where, arr.reshape(-1).astype(">u8").tobytes())
        plans[pi].entries = plans[pi].entries.copy()
        plans[pi].entries[i] = where
    for pi, where in l1_where.items():
        p = plans[pi]
        ents = p.entries.copy()
        if pi == 0:
            l2idx = (ents >> np.uint64(bits)).astype(np.int64)
            nz = ents != 0
            one = np.zeros(len(ents), bool)
            one[nz] = final[l2idx[nz]] == 1
            ents[one] |= np.uint64(QCOW_OFLAG_COPIED)
        if len(ents):
            nbytes = -(-len(ents) * 8 // cs) * cs
            store.pwrite(where, ents.astype(">u8").tobytes().ljust(nbytes, b"\0"))
    for off, length in change.zero_fill:
        _write_zeros(store, off, length)
    if change.snapshots:
        store.pwrite(snap_off, snap_bytes.ljust(-(-len(snap_bytes) // cs) * cs, b"\0"))
    reft = np.zeros(rt_clusters * cs // 8, np.uint64)
    for bi, b in enumerate(blocks):
        vals = final[bi * rpb:(bi + 1) * rpb]
        store.pwrite(b * cs, encode_refblock(vals, h.refcount_order, cs))
        reft[bi] = b * cs
    store.pwrite(rt_first * cs, reft.astype(">u8").tobytes())
    if flush:
        store.flush()
    # 6. the switch
    h.l1_size = len(change.active.entries)
    h.l1_table_offset = l1_where[0] if h.l1_size else 0
    h.refcount_table_offset = rt_first * cs
    h.refcount_table_clusters = rt_clusters
    h.nb_snapshots = len(change.snapshots)
    h.snapshots_offset = snap_off
    h.incompatible &= ~INCOMPAT_DIRTY
    page = h.to_bytes()
    store.pwrite(0, page)
    if flush:
        store.flush()
    image_end = int(np.nonzero(final)[0][-1] + 1) * cs
    if change.truncate_file and store.size() > image_end:
        store.truncate(image_end)
        if flush:
            store.flush()
    return {"refcounts": final, "image_end": image_end}


def _grow(arr: np.ndarray, n: int) -> np.ndarray:
    if n <= len(arr):
        return arr
    return np.concatenate((arr, np.zeros(n - len(arr), arr.dtype)))


def _write_zeros(store, off: int, length: int) -> None:
    chunk = 1 << 20
    zero = bytes(min(chunk, length))
    pos = off
    while pos < off + length:
        n = min(chunk, off + length - pos)
        store.pwrite(pos, zero[:n])
        pos += n


def compute_refs(meta: Qcow2Meta) -> np.ndarray:
    """Reference counts of the image as it is (quietly; check.py reports the details)."""
    ch = current_plan(meta)
    rc = RefCollector(meta.cluster_bits)
    rc.add_range(0, meta.cluster_size)
    for off, length in meta.static_refs():
        rc.add_range(off, length)
    h = meta.header
    _plan_refs(meta, L1Plan(ch.active.entries, location=h.l1_table_offset if h.l1_size else None), rc)
    for p in ch.snapshot_plans:
        _plan_refs(meta, p, rc)
    if h.nb_snapshots:
        rc.add_range(h.snapshots_offset, meta.snapshot_table_bytes)
    rc.add_range(h.refcount_table_offset, h.refcount_table_clusters * meta.cluster_size)
    for ent in meta.reftable.tolist():
        off = ent & REFT_OFFSET_MASK
        if off:
            rc.add_range(off, meta.cluster_size)
    return rc.counts(meta.file_clusters)


def write_header_only(meta: Qcow2Meta, header: Header, flush: bool = True) -> None:
    """Switch header fields that need no new clusters (backing file, feature bits) in one page write."""
    if flush:
        meta.store.flush()
    meta.store.pwrite(0, header.to_bytes())
    if flush:
        meta.store.flush()
