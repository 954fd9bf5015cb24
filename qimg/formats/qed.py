"""QED: the QEMU Enhanced Disk format.

References:
  - "QED Image File Format Specification" (QEMU docs/interop/qed_spec.txt, wiki
    Features/QED/Specification): little-endian header in cluster 0 (magic "QED\\0",
    cluster_size, table_size in clusters, header_size in clusters, features,
    compat_features, autoclear_features, l1_table_offset, image_size,
    backing_filename_offset/size), two-level L1/L2 tables of 64-bit cluster offsets
    (0 = unallocated, 1 = zero cluster), feature bits QED_F_BACKING_FILE,
    QED_F_NEED_CHECK, QED_F_BACKING_FORMAT_NO_PROBE.
  - Observed qemu-img 7.2 behaviour: create puts the L1 table right after the header
    cluster; a write that needs a new L2 table appends its data clusters first and the
    table after them; ``-F raw`` sets QED_F_BACKING_FORMAT_NO_PROBE, other backing formats
    are not recorded; the need-check bit is set while allocating writes are in flight;
    check counts leaked clusters and corrupt table entries (repair drops corrupt entries).
    qimg also repairs leaked clusters at the end of the file by truncating them.
"""

from __future__ import annotations

import struct

from ..core.check import CheckResult, check_then_recheck
from ..core.driver import BackingRef, CreateOptions, Driver, c_string
from ..core.extent import Extent, split_at
from ..core.policy import refuse_overlaps
from ..errors import CorruptImage, OpenError, QimgError, check_limit
from ..options import BACKING_FILE_OPT, BACKING_FMT_OPT, SIZE_OPT, OptSpec, parse_opt_size
from ..units import round_up
from .spans import write_span

QED_MAGIC = 0x00444551  # "QED\0" little-endian
QED_F_BACKING_FILE = 0x01
QED_F_NEED_CHECK = 0x02
QED_F_BACKING_FORMAT_NO_PROBE = 0x04
QED_FEATURE_MASK = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE
QED_CLUSTER_ZERO = 1

QED_MIN_CLUSTER_SIZE = 4096
QED_MAX_CLUSTER_SIZE = 64 << 20
QED_DEFAULT_CLUSTER_SIZE = 65536
QED_MIN_TABLE_SIZE = 1
QED_MAX_TABLE_SIZE = 16
QED_DEFAULT_TABLE_SIZE = 4

HEADER = struct.Struct("<IIIIQQQQQII")  # 64 bytes
SECTOR = 512

#: named limits for values read from an image
MAX_TABLE_BYTES = 64 << 20
MAX_HEADER_BYTES = 64 << 20
MAX_BACKING_NAME = 4095
U64 = (1 << 64) - 1


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def max_image_size(cluster_size: int, table_size: int) -> int:
    """qemu's limit: table_entries^2 * cluster_size, computed in 64-bit arithmetic (it wraps)."""
    entries = table_size * cluster_size // 8
    return (entries * entries * cluster_size) & U64


class QedDriver(Driver):
    """QED: L1 -> L2 -> clusters, zero clusters, backing files."""

    format_name = "qed"
    supports_backing = True
    create_opts = (
        SIZE_OPT,
        BACKING_FILE_OPT,
        BACKING_FMT_OPT,
        OptSpec("cluster_size", "size", "Cluster size (in bytes)"),
        OptSpec("table_size", "size", "L1/L2 table size (in clusters)"),
    )

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) >= HEADER.size and struct.unpack_from("<I", head)[0] == QED_MAGIC:
            return 100
        return 0

    # ----- opening -----
    def _open(self, options: dict) -> None:
        h = HEADER.unpack(self.store.pread_full(0, HEADER.size))
        (magic, cs, ts, hs, features, compat, autoclear, l1_off, size, bk_off, bk_len) = h
        if magic != QED_MAGIC:
            raise OpenError("Image not in QED format")
        if features & ~QED_FEATURE_MASK:
            raise OpenError(f"Unsupported QED features: {features & ~QED_FEATURE_MASK:x}")
        if not _pow2(cs) or not QED_MIN_CLUSTER_SIZE <= cs <= QED_MAX_CLUSTER_SIZE:
            raise CorruptImage("QED cluster size is invalid")
        if not _pow2(ts) or not QED_MIN_TABLE_SIZE <= ts <= QED_MAX_TABLE_SIZE:
            raise CorruptImage("QED table size is invalid")
        self.cluster_bytes = cs
        self.table_size = ts
        self.header_clusters = hs
        self.features = features
        self.compat = compat
        self.autoclear = autoclear
        self.table_bytes = ts * cs
        check_limit("QED table bytes", self.table_bytes, MAX_TABLE_BYTES, "QED header")
        self.charge("QED L1 table", self.table_bytes)
        check_limit("QED header bytes", hs * cs, MAX_HEADER_BYTES, "QED header")
        self.table_entries = self.table_bytes // 8
        if size % SECTOR or size > max_image_size(cs, ts):
            raise CorruptImage("QED image size is invalid")
        file_size = self.store.size()
        if not self._table_offset_ok(l1_off, file_size):
            raise CorruptImage("QED table offset is invalid")
        self.l1_offset = l1_off
        self.virtual_size = size
        self.cluster_bits = cs.bit_length() - 1
        self.l2_bits = self.table_entries.bit_length() - 1
        if features & QED_F_BACKING_FILE:
            if bk_off + bk_len > hs * cs or bk_off < HEADER.size and bk_len:
                raise CorruptImage("QED backing filename offset is invalid")
            check_limit("backing file name length", bk_len, MAX_BACKING_NAME, "QED header")
            name = c_string(self.store.pread_full(bk_off, bk_len))
            fmt = "raw" if features & QED_F_BACKING_FORMAT_NO_PROBE else None
            self.backing = BackingRef(name, fmt)
        self._l1 = None  # loaded on first use: info needs no table (and no numpy)
        self._l2_cache: dict[int, object] = {}
        self._eof = None
        self._need_check_set = False
        if self.writable:
            if features & QED_F_NEED_CHECK:
                # a crash left allocating writes unfinished: repair before writing
                self.check("all")
            if autoclear:
                self.autoclear = 0
                self._write_header()

    @property
    def l1(self):
        if self._l1 is None:
            import numpy as np

            self._l1 = np.frombuffer(self.store.pread_full(self.l1_offset, self.table_bytes), dtype="<u8").copy()
        return self._l1

    def _table_offset_ok(self, off: int, file_size: int) -> bool:
        cs = self.cluster_bytes
        # qemu finds a table's last cluster at off + (table_size - 1) clusters and takes a last cluster
        # not past the first as an overflow: a one-cluster table never opens (qemu-img creates such
        # images, and refuses them)
        return (off > 0 and off % cs == 0 and off >= self.header_clusters * cs and self.table_size > 1
                and off + self.table_bytes <= file_size)

    def _refuse_overlap(self, what: str, off: int, length: int) -> None:
        """Untrusted mode: a table or data cluster must not overlap the header or the L1 table."""
        refuse_overlaps(self.filename, [("header", 0, self.header_clusters * self.cluster_bytes),
                                        ("L1 table", self.l1_offset, self.table_bytes), (what, off, length)])

    def _write_header(self) -> None:
        raw = self.store.pread_full(0, HEADER.size)
        h = list(HEADER.unpack(raw))
        h[4] = self.features
        h[6] = self.autoclear
        h[8] = self.virtual_size
        self.store.pwrite(0, HEADER.pack(*h))

    # ----- metadata -----
    @property
    def cluster_size(self) -> int:
        return self.cluster_bytes

    @property
    def has_zero_init(self) -> bool:
        return True

    def _l2(self, l1_index: int):
        tbl = self._l2_cache.get(l1_index)
        if tbl is not None:
            return tbl
        off = int(self.l1[l1_index])
        if off == 0:
            return None
        if not self._table_offset_ok(off, self.store.size()):
            raise CorruptImage(f"QED L2 table offset {off} is invalid")
        import numpy as np

        if self.strict:
            self._refuse_overlap("L2 table", off, self.table_bytes)
        tbl = np.frombuffer(self.store.pread_full(off, self.table_bytes), dtype="<u8").copy()
        if len(self._l2_cache) > 64:
            self._l2_cache.clear()
        self._l2_cache[l1_index] = tbl
        return tbl

    # ----- read side -----
    def block_status(self, offset: int, length: int) -> Extent:
        import numpy as np

        cs = self.cluster_bytes
        end = min(offset + length, self.virtual_size)
        shift = self.l2_bits + self.cluster_bits
        cluster = offset >> self.cluster_bits
        l1_index = cluster >> self.l2_bits
        tbl = self._l2(l1_index)
        span_end = min(end, (l1_index + 1) << shift)
        if tbl is None:
            idx = l1_index + 1
            last = (end - 1) >> shift
            while idx <= last and int(self.l1[idx]) == 0:
                idx += 1
            return Extent(offset, min(end, idx << shift) - offset, data=False, zero=True, present=False)
        i0 = cluster & (self.table_entries - 1)
        n_clusters = ((span_end - 1) >> self.cluster_bits) - cluster + 1
        ents = tbl[i0:i0 + n_clusters]
        first = int(ents[0])
        if first in (0, QED_CLUSTER_ZERO):
            same = ents == np.uint64(first)
        else:
            if first % cs or first + cs > round_up(self.store.size(), cs):
                raise CorruptImage(f"QED cluster offset {first} is invalid")
            if self.strict:
                self._refuse_overlap("data cluster", first, cs)
            expect = np.arange(len(ents), dtype=np.uint64) * np.uint64(cs) + np.uint64(first)
            same = ents == expect
        bad = np.nonzero(~same)[0]
        run = int(bad[0]) if len(bad) else len(ents)
        n = min(span_end, (cluster + run) << self.cluster_bits) - offset
        if first == 0:
            return Extent(offset, n, data=False, zero=True, present=False)
        if first == QED_CLUSTER_ZERO:
            return Extent(offset, n, data=False, zero=True, present=True)
        return Extent(offset, n, data=True, zero=False, present=True, offset=first + (offset & (cs - 1)))


    # ----- write side -----
    def _alloc(self, nbytes: int) -> int:
        if self._eof is None:
            self._eof = self.store.size()
        off = round_up(self._eof, self.cluster_bytes)
        self._eof = off + nbytes
        return off

    def _mark_need_check(self) -> None:
        if not self._need_check_set:
            self.features |= QED_F_NEED_CHECK
            self._write_header()
            self.store.flush()
            self._need_check_set = True

    def _entry(self, cluster: int) -> int:
        tbl = self._l2(cluster >> self.l2_bits)
        return 0 if tbl is None else int(tbl[cluster & (self.table_entries - 1)])

    def _old_cluster(self, cluster: int) -> bytes:
        cs = self.cluster_bytes
        e = self._entry(cluster)
        if e == 0:
            return self.read_below(cluster * cs, cs)
        if e == QED_CLUSTER_ZERO:
            return bytes(cs)
        return self.store.pread_full(e, cs)

    def pwrite(self, offset: int, data) -> None:
        if not self.writable:
            raise QimgError("Image is read-only")
        data = memoryview(data).cast("B")
        end = offset + len(data)
        if end > self.virtual_size:
            raise QimgError(f"Cannot write beyond the end of the image ({end} > {self.virtual_size})")
        for pos, nxt in split_at(offset, end, 1 << (self.l2_bits + self.cluster_bits)):
            self._write_span(pos, data[pos - offset:nxt - offset])

    def _write_span(self, offset: int, data) -> None:
        import numpy as np

        cs = self.cluster_bytes
        end = offset + len(data)
        c0 = offset >> self.cluster_bits
        c1 = ((end - 1) >> self.cluster_bits) + 1
        l1_index = c0 >> self.l2_bits
        tbl = self._l2(l1_index)
        i0 = c0 & (self.table_entries - 1)
        if tbl is None:
            ents = np.zeros(c1 - c0, dtype="<u8")
        else:
            ents = tbl[i0:i0 + (c1 - c0)].copy()
        need = (ents == 0) | (ents == QED_CLUSTER_ZERO)

        def alloc(k: int) -> int:
            self._mark_need_check()  # on disk before any new cluster is used
            return self._alloc(k * cs)

        hosts = write_span(self.store, offset, data, cs, np.where(need, 0, ents).astype(np.int64), need,
                           lambda i: self._old_cluster(c0 + i), alloc)
        if hosts is not None:
            if self.store.size() < self._eof:
                self.store.truncate(self._eof)
            self._set_entries(l1_index, i0, hosts.astype(np.uint64))

    def _set_entries(self, l1_index: int, i0: int, ents) -> None:
        """Store L2 entries; a missing L2 table is appended (after the data) and then linked."""
        import numpy as np

        tbl = self._l2(l1_index)
        if tbl is None:
            tbl = np.zeros(self.table_entries, dtype="<u8")
            tbl[i0:i0 + len(ents)] = ents
            off = self._alloc(self.table_bytes)
            self.store.pwrite(off, tbl.tobytes())
            self.l1[l1_index] = off
            self.store.pwrite(self.l1_offset + 8 * l1_index, struct.pack("<Q", off))
            self._l2_cache[l1_index] = tbl
            return
        tbl[i0:i0 + len(ents)] = ents
        self.store.pwrite(int(self.l1[l1_index]) + 8 * i0, ents.astype("<u8").tobytes())

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        """Whole clusters become zero clusters (in place if allocated); partial ones get zeros written."""
        import numpy as np

        cs = self.cluster_bytes
        end = min(offset + length, self.virtual_size)
        has_backing = self.backing is not None and bool(self.backing.filename)
        pos = offset
        while pos < end:
            c = pos >> self.cluster_bits
            cend = min((c + 1) * cs, end)
            if pos % cs or cend - pos < cs and cend != self.virtual_size:
                self.pwrite(pos, bytes(cend - pos))
                pos = cend
                continue
            # a run of whole clusters inside one L2 table
            span = 1 << (self.l2_bits + self.cluster_bits)
            run_end = min(end // cs * cs if end != self.virtual_size else end, (pos // span + 1) * span)
            if run_end <= pos:
                run_end = cend
            n_cl = (run_end - pos + cs - 1) // cs
            l1_index = c >> self.l2_bits
            i0 = c & (self.table_entries - 1)
            tbl = self._l2(l1_index)
            ents = np.zeros(n_cl, dtype="<u8") if tbl is None else tbl[i0:i0 + n_cl].copy()
            alloc = (ents != 0) & (ents != QED_CLUSTER_ZERO)
            for idx in np.nonzero(alloc)[0].tolist():
                # allocated clusters keep their place (dropping them would leak)
                self.store.pwrite(int(ents[idx]), bytes(cs))
            unalloc = ents == 0
            if has_backing and unalloc.any():
                ents[unalloc] = QED_CLUSTER_ZERO
                self._mark_need_check()
                self._set_entries(l1_index, i0, ents)
            pos = run_end

    def truncate(self, size: int, shrink: bool = False, prealloc: str = "off") -> None:
        if size < self.virtual_size:
            raise QimgError("Shrinking images is currently not supported")
        if prealloc != "off":
            raise QimgError(f"Unsupported preallocation mode '{prealloc}'")
        if size % SECTOR or size > max_image_size(self.cluster_bytes, self.table_size):
            raise QimgError("Invalid argument")
        self.virtual_size = size
        self._write_header()

    def set_backing(self, filename: str | None, fmt: str | None) -> None:
        """Rewrite the header with a new backing name (it must fit in the header clusters)."""
        raw = bytearray(self.store.pread_full(0, HEADER.size))
        h = list(HEADER.unpack(raw))
        features = self.features & ~(QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE)
        name = (filename or "").encode()
        if name:
            features |= QED_F_BACKING_FILE
            if fmt == "raw":
                features |= QED_F_BACKING_FORMAT_NO_PROBE
            if HEADER.size + len(name) > self.header_clusters * self.cluster_bytes:
                raise QimgError("No space left on device")
        h[4] = features
        h[9], h[10] = (HEADER.size, len(name)) if name else (0, 0)
        self.store.pwrite(0, HEADER.pack(*h) + name)
        self.features = features
        self.backing = BackingRef(filename, "raw" if fmt == "raw" else None) if name else None

    def flush(self) -> None:
        super().flush()
        if self._need_check_set and self.writable:
            self.features &= ~QED_F_NEED_CHECK
            self._write_header()
            self._need_check_set = False
            self.store.flush()

    def close(self) -> None:
        if self.store is not None and self.writable and self._need_check_set:
            self.store.flush()
            self.features &= ~QED_F_NEED_CHECK
            self._write_header()
            self._need_check_set = False
        super().close()

    # ----- check -----
    def check(self, repair: str | None = None) -> CheckResult:
        """Check, and after a repair check again (qemu-img reports the second pass with the fixed counts)."""
        return check_then_recheck(self._check, repair)

    def _check(self, repair: str | None) -> CheckResult:
        """Table entries in range and aligned, clusters used once; leaks are unreferenced clusters."""
        import numpy as np

        cs = self.cluster_bytes
        file_size = self.store.size()
        n_file = (file_size + cs - 1) // cs
        used = np.zeros(n_file + 1, dtype=bool)
        hc = max(self.header_clusters, 1)
        used[:min(hc, n_file)] = True
        tc = self.table_bytes // cs

        def mark(off):
            i = off // cs
            used[i:min(i + tc, n_file)] = True

        mark(self.l1_offset)
        corruptions = 0
        allocated = 0
        fragmented = 0
        messages = []
        l1_fix = []
        l2_fixes = {}
        for l1_index in np.nonzero(self.l1)[0].tolist():
            off = int(self.l1[l1_index])
            if not self._table_offset_ok(off, file_size):
                corruptions += 1
                l1_fix.append(l1_index)
                continue
            mark(off)
            tbl = np.frombuffer(self.store.pread_full(off, self.table_bytes), dtype="<u8")
            live = (tbl != 0) & (tbl != QED_CLUSTER_ZERO)
            offs = tbl[live].astype(np.int64)
            allocated += len(offs)
            if len(offs) > 1:
                fragmented += int((offs[1:] != offs[:-1] + cs).sum())
            bad = (offs % cs != 0) | (offs + cs > file_size) | (offs <= 0)
            if bad.any():
                corruptions += int(bad.sum())
                l2_fixes[l1_index] = np.nonzero(live)[0][bad]
            good = offs[~bad] // cs
            used[good] = True
        leaked_mask = ~used[:n_file]
        leaks = int(leaked_mask.sum())
        total = (self.virtual_size + cs - 1) // cs
        result = CheckResult(corruptions=corruptions, leaks=leaks, allocated_clusters=allocated,
                             total_clusters=total, fragmented_clusters=fragmented, messages=messages)
        if repair and not self.writable:
            raise QimgError("Cannot repair an image opened read-only")
        if repair == "all" and corruptions:
            for l1_index in l1_fix:
                self.l1[l1_index] = 0
                self.store.pwrite(self.l1_offset + 8 * l1_index, bytes(8))
            for l1_index, idxs in l2_fixes.items():
                off = int(self.l1[l1_index])
                tbl = np.frombuffer(self.store.pread_full(off, self.table_bytes), dtype="<u8").copy()
                tbl[idxs] = 0
                self.store.pwrite(off, tbl.tobytes())
            self._l2_cache.clear()
            result.corruptions_fixed = corruptions
            result.corruptions = 0
        if repair in ("leaks", "all") and leaks:
            # leaked clusters at the end of the file can simply be cut off
            used_idx = np.nonzero(~leaked_mask)[0]
            keep = (int(used_idx[-1]) + 1) if len(used_idx) else hc
            trailing = n_file - keep
            if trailing > 0:
                self.store.truncate(keep * cs)
                self._eof = None
                result.leaks_fixed = trailing
                result.leaks = leaks - trailing
        if repair and self.features & QED_F_NEED_CHECK and result.corruptions == 0:
            self.features &= ~QED_F_NEED_CHECK
            self._write_header()
        return result

    # ----- create -----
    @classmethod
    def _geometry(cls, opts: CreateOptions):
        o = opts.options
        cs = parse_opt_size("cluster_size", o["cluster_size"]) if "cluster_size" in o else QED_DEFAULT_CLUSTER_SIZE
        ts = parse_opt_size("table_size", o["table_size"]) if "table_size" in o else QED_DEFAULT_TABLE_SIZE
        if not _pow2(cs) or not QED_MIN_CLUSTER_SIZE <= cs <= QED_MAX_CLUSTER_SIZE:
            raise QimgError(f"QED cluster size must be within range [{QED_MIN_CLUSTER_SIZE}, "
                            f"{QED_MAX_CLUSTER_SIZE}] and power of 2")
        if not _pow2(ts) or not QED_MIN_TABLE_SIZE <= ts <= QED_MAX_TABLE_SIZE:
            raise QimgError(f"QED table size must be within range [{QED_MIN_TABLE_SIZE}, {QED_MAX_TABLE_SIZE}] "
                            "and power of 2")
        return cs, ts

    @classmethod
    def create(cls, filename: str, opts: CreateOptions, opener) -> None:
        cs, ts = cls._geometry(opts)
        size = round_up(opts.size or 0, SECTOR)
        limit = max_image_size(cs, ts)
        if size > limit:
            raise QimgError(f"QED image size must be a non-zero multiple of cluster size and less than {limit} bytes")
        features = 0
        name = b""
        if opts.backing_file:
            name = opts.backing_file.encode()
            features |= QED_F_BACKING_FILE
            if opts.backing_fmt == "raw":
                features |= QED_F_BACKING_FORMAT_NO_PROBE
            if HEADER.size + len(name) > cs:
                raise QimgError("Backing file name too long")
        hdr = HEADER.pack(QED_MAGIC, cs, ts, 1, features, 0, 0, cs, size,
                          HEADER.size if name else 0, len(name))
        with opener.open_file(filename, writable=True, create=True) as store:
            store.pwrite(0, hdr + name)
            store.truncate(cs)
            # the L1 table is written out (qemu-img's disk usage is the same)
            zero = bytes(min(ts * cs, 1 << 20))
            for pos in range(cs, cs + ts * cs, len(zero)):
                store.pwrite(pos, zero[:cs + ts * cs - pos])

    @classmethod
    def format_line_options(cls, opts: CreateOptions) -> list[tuple[str, str]]:
        out = [("size", str(opts.size or 0))]
        if opts.backing_file:
            out.append(("backing_file", opts.backing_file))
        if opts.backing_fmt:
            out.append(("backing_fmt", opts.backing_fmt))
        o = opts.options
        cs = parse_opt_size("cluster_size", o["cluster_size"]) if "cluster_size" in o else QED_DEFAULT_CLUSTER_SIZE
        out.append(("cluster_size", str(cs)))
        if "table_size" in o:
            out.append(("table_size", str(parse_opt_size("table_size", o["table_size"]))))
        return out
