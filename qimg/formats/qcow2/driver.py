"""The qcow2 driver: open, read, block status, info; writing comes from ``writer.Qcow2Writer``.

References: QEMU docs/interop/qcow2.txt (header, cluster mapping, extended L2, external
data files, snapshots, crypt_method: 1 = AES-128-CBC per 512-byte sector with plain64 IVs
of the guest sector number, 2 = LUKS whose sectors are numbered by host offset);
qemu-img 7.2's observed output for info, map and errors.
"""

from __future__ import annotations

import os
import threading
from array import array
from bisect import bisect_left

from ...core.driver import BackingRef, Driver
from ...core.extent import Extent
from ...core.policy import PolicyError, short_read
from ...errors import CorruptImage, OpenError, QimgError, Unsupported
from ...options import NO_IO
from . import compress as qcompress
from . import strict
from .header import (
    COMPRESSION_NAMES,
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DIRTY,
    QCOW2_MAGIC_BYTES,
    QCOW_CRYPT_AES,
    QCOW_CRYPT_LUKS,
    Header,
    read_bitmap_directory,
)
from .lifecycle_hooks import Qcow2LifecycleMixin
from .snapshot import find_snapshot, read_snapshots
from .tables import (
    COMPRESSED,
    L1E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    UNALLOCATED,
    ZERO_ALLOC,
    ZERO_PLAIN,
    L2Cache,
    LazyNumpy,
    be_u64_array,
    copy_table,
    decode_l2,
    read_table,
    read_table_array,
)
from .writer import Qcow2Writer

np = LazyNumpy(globals())

class Qcow2Driver(Qcow2LifecycleMixin, Qcow2Writer, Driver):
    """qcow2 versions 2 and 3: one layer of a chain."""

    format_name = "qcow2"
    supports_backing = True
    supports_compression = True

    from .create import CREATE_OPTS as create_opts

    # ------------------------------------------------------------------ creating
    @classmethod
    def create(cls, filename: str, opts, opener) -> None:
        from .create import create

        create(cls, filename, opts, opener)

    @classmethod
    def format_line_options(cls, opts) -> list:
        from .create import format_line_options

        return format_line_options(opts)

    @classmethod
    def creates_single_file(cls, options: dict) -> bool:
        return not options.get("data_file")

    @classmethod
    def created_files(cls, filename: str, options: dict) -> list:

        files = [filename]
        if options.get("data_file"):
            files.append(options["data_file"])  # created from the current directory, like qemu-img
        return files

    @classmethod
    def measure(cls, options: dict, size: int, src=None) -> dict:
        """qemu-img measure for qcow2 output (see measure.py)."""
        from .measure import measure

        return measure(options, size, src)

    # ------------------------------------------------------------------ probing and opening
    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) >= 8 and head[:4] == QCOW2_MAGIC_BYTES and int.from_bytes(head[4:8], "big") >= 2:
            return 100
        return 0

    def _open(self, options: dict) -> None:
        store = self.store
        cipher = getattr(self, "_cipher", None)  # a reopen after a metadata change keeps the unlocked key
        self.file_size = store.size()
        h = Header.parse(store, self.file_size)
        self.h = h
        if self.writable and h.incompatible_features & QCOW2_INCOMPAT_CORRUPT and not options.get("check"):
            raise OpenError("qcow2: Image is corrupt; cannot be opened read/write")
        self.cluster_bits = h.cluster_bits
        self.cs = h.cluster_size
        self.extended = h.extended_l2
        self.l2_entries = h.l2_entries
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.l2_span_bits = self.cluster_bits + self.l2_bits
        self.unit_bits = self.cluster_bits - 5 if self.extended else self.cluster_bits
        self.virtual_size = h.size
        if h.version >= 3 and h.bitmaps_ext and h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
            from .bitmaps import bitmaps_of, check_constraints

            check_constraints(bitmaps_of(store, h, self.file_size), h.size, self.cs)
        if h.refcount_table_clusters == 0 and not options.get("check"):
            raise OpenError("Image does not contain a reference count table")
        self._l1 = None  # read on first use: info needs the header, extensions and snapshots only
        self._l1_nonzero = None
        self.cache = L2Cache(budget=self.opener)
        strict.open_checks(self)  # the metadata budget; in untrusted mode, overlapping tables
        self._ccache: dict = {}
        self._clock = threading.Lock()
        self._cipher = cipher
        self._key_secret = (options or {}).get("encrypt.key-secret")
        self.snapshot_list = read_snapshots(store, h.snapshots_offset, h.nb_snapshots, self.cs, self.file_size)
        self.snapshot_view = None
        snap = options.get("snapshot") if options else None
        if snap:
            if self.writable:
                raise OpenError("Cannot open a snapshot read/write")
            self.load_snapshot(snap)
        if h.backing_file:
            self.backing = BackingRef(h.backing_file, h.backing_format)
        old_ds = getattr(self, "data_store", None)
        if old_ds is not None and old_ds is not store:
            old_ds.close()  # reopening after a metadata change
        self.data_store = store
        self.data_filename = None
        self._data_error = None
        if h.has_data_file:
            name = (options or {}).get("data-file") or h.data_file
            if not name:
                raise OpenError("'data-file' is required for this image")
            path = self._data_file_path(name)
            if (options or {}).get(NO_IO):
                # as qemu-img info: metadata only, the data file is neither opened nor locked (but the policy,
                # which refuses what it would refuse to open, still sees the reference)
                if self.opener is not None:
                    self.opener.check(name, "data file", path)
                self.data_store = None
                self._data_error = "qcow2: the external data file was not opened (metadata only)"
            else:
                if self.opener is None:
                    raise OpenError("qcow2: the external data file can only be opened through the core")
                try:
                    self.data_store = self.opener.open_file(name, self.writable, kind="data file", resolved=path)
                except PolicyError:
                    raise
                except QimgError as e:
                    raise OpenError(str(e)) from None
            self.data_filename = path
        self._meta_prealloc = None
        self._init_writer(options)
        if self.encrypted and self._cipher is None and not (options or {}).get(NO_IO):
            self._crypto()  # as qemu-img: everything but info needs the key, and says so at open

    def _data_file_path(self, name: str) -> str:
        """qemu-img opens a relative data file name from the current directory; fall back to the image's."""
        if os.path.isabs(name) or os.path.exists(name) or self.opener is None:
            return name
        beside = self.opener.resolve(name)
        return beside if os.path.exists(beside) else name

    def _data(self):
        if self.data_store is None:
            raise OpenError(self._data_error or "qcow2: the external data file is not open")
        return self.data_store

    def load_snapshot(self, spec: dict) -> None:
        """Show the guest view of an internal snapshot ({"id"|"name"|"id_or_name": ...}), read-only."""
        sn = find_snapshot(self.snapshot_list, spec)
        err = sn.l1_error(self.cs)
        if err:
            raise QimgError(err)
        self.snapshot_view = sn
        self.l1 = read_table(self.store, sn.l1_table_offset, sn.l1_size, f"L1 table of snapshot '{sn.name}'",
                             self.file_size)
        self._l1_nonzero = None
        self.cache.clear()
        # like qemu-img, the image keeps its current size: past a smaller snapshot's end it reads as zeros
        need = -(-(self.virtual_size if sn.disk_size is None else min(sn.disk_size, self.virtual_size))
                 // (1 << self.l2_span_bits))
        if len(self.l1) < need:
            raise CorruptImage(f"Snapshot '{sn.name}' L1 table is too small for its disk size")

    def close(self) -> None:
        try:
            if self.writable and self.store is not None:
                self.finalize()
                self._store_bitmaps()
        finally:
            if getattr(self, "data_store", None) is not None and self.data_store is not self.store:
                self.data_store.close()
            self.data_store = None
            super().close()

    # ------------------------------------------------------------------ properties
    @property
    def l1(self):
        """The active L1 table (uint64 array), read on first use."""
        if self._l1 is None:
            # standard L2 entries: tables are plain ``array('Q')`` (no numpy); extended L2 uses numpy
            rd = read_table if self.extended else read_table_array
            self._l1 = rd(self.store, self.h.l1_table_offset, self.h.l1_size, "L1 table", self.file_size, self.strict,
                          self.filename)
        return self._l1

    @l1.setter
    def l1(self, value) -> None:
        self._l1 = value

    @property
    def cluster_size(self) -> int:
        return self.cs

    @property
    def encrypted(self) -> bool:
        return self.h.crypt_method != 0

    def snapshots(self) -> list:
        return list(self.snapshot_list)

    # ------------------------------------------------------------------ L2 lookup
    def _l1_next_nonzero(self, index: int) -> int:
        """The first L1 index >= index whose entry points at an L2 table (len(l1) if none)."""
        if self._l1_nonzero is None:
            # only entries mapping guest offsets count, scanned a slice at a time (a crafted l1_size of millions)
            count = min(len(self.l1), (self.virtual_size + (1 << self.l2_span_bits) - 1) >> self.l2_span_bits)
            if isinstance(self.l1, array):
                self._l1_nonzero = [b + i for b in range(0, count, 4096) if any(part := self.l1[b:min(b + 4096, count)])
                                    for i, e in enumerate(part) if e & L1E_OFFSET_MASK]
            else:
                self._l1_nonzero = np.flatnonzero(self.l1[:count] & np.uint64(L1E_OFFSET_MASK)).tolist()
        nz = self._l1_nonzero
        pos = bisect_left(nz, index)
        return nz[pos] if pos < len(nz) else len(self.l1)

    def _decoded(self, l2_offset: int):
        d = self._live_l2(l2_offset) or self.cache.get(l2_offset)
        if d is None:
            raw = self._read_l2_raw(l2_offset)
            d = decode_l2(raw, self.cluster_bits, self.extended, self.h.has_data_file)
            self.cache.put(l2_offset, d)
        return d

    def _read_l2_raw(self, l2_offset: int) -> np.ndarray:
        pending = self._dirty_l2_get(l2_offset)
        if pending is not None:
            return copy_table(pending)
        if l2_offset % self.cs:
            raise CorruptImage(f"L2 table offset {l2_offset:#x} is not aligned to the cluster size")
        # an L2 table past the end of the file reads as zeros, as in qemu
        n = self.l2_entries * (2 if self.extended else 1)
        raw = short_read(self.store.pread(l2_offset, n * 8), n * 8, self.strict, self.filename, "L2 table", l2_offset)
        if not self.extended:
            return be_u64_array(raw)  # decoded in plain Python (tables.decode_l2)
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    # ------------------------------------------------------------------ block status
    def block_status(self, offset: int, length: int) -> Extent:
        if self.encrypted and self._cipher is None:
            self._crypto()  # like qemu-img, anything but info needs the key
        end = min(offset + length, self.virtual_size) if offset < self.virtual_size else offset + length
        span = 1 << self.l2_span_bits
        l1i = offset >> self.l2_span_bits
        l2_off = int(self.l1[l1i]) & L1E_OFFSET_MASK if l1i < len(self.l1) else 0
        if l2_off == 0:
            nxt = self._l1_next_nonzero(l1i + 1) if l1i < len(self.l1) else l1i + 1
            stop = min(end, nxt * span)
            return Extent(offset, max(stop - offset, 1), data=False, zero=True, present=False)
        d = self._decoded(l2_off)
        base = l1i * span
        u = (offset - base) >> self.unit_bits
        kind, uend = d.run_at(u, -(-(end - base) >> self.unit_bits))
        stop = min(end, base + (uend << self.unit_bits))
        n = max(stop - offset, 1)
        if kind not in (ZERO_PLAIN, COMPRESSED):
            self._check_aligned(d, u, l2_off, offset - base)
        if kind == UNALLOCATED:
            ext = Extent(offset, n, data=False, zero=True, present=False)
            host = d.host(u)
            if self.extended and host and not self.encrypted and not (int(d.raw[(u >> 5) * 2]) & QCOW_OFLAG_COMPRESSED):
                ext.offset = host + (offset - base - (u << self.unit_bits))
            return ext
        if kind == ZERO_PLAIN:
            return Extent(offset, n, data=False, zero=True, present=True)
        if kind == COMPRESSED:
            return Extent(offset, n, data=True, zero=False, present=True, compressed=True)
        host = d.host(u) + (offset - base - (u << self.unit_bits))
        if self.strict and not self.encrypted:
            strict.check_host(self, d.host(u), 1 << self.unit_bits, offset)
        if kind == ZERO_ALLOC:
            if self.encrypted:  # qemu reports no host offset for encrypted images
                return Extent(offset, n, data=False, zero=True, present=True)
            return Extent(offset, n, data=False, zero=True, present=True, offset=host,
                          filename=self.data_filename)
        ext = Extent(offset, n, data=True, zero=False, present=True, offset=host, filename=self.data_filename)
        if self.encrypted:
            ext.offset = None
            ext.filename = None
            return ext
        if self._metadata_preallocated():
            self._recurse_host(ext)
        return ext

    def _check_aligned(self, d, u: int, l2_off: int, in_table: int) -> None:
        """A cluster's host offset must be cluster-aligned: qemu reports the corruption and fails the request."""
        c = int(d.chosts[u >> d.shift])
        if c > 0 and c & (self.cs - 1):
            l2_index = in_table >> self.cluster_bits
            index = f"{l2_index:#x}" if l2_index else "0"  # C's %#x
            raise CorruptImage("Input/output error", diagnostics=(
                f"qcow2: Image is corrupt: Cluster allocation offset {c:#x} unaligned (L2 offset: {l2_off:#x}, "
                f"L2 index: {index}); further non-fatal corruption events will be suppressed",))

    def _metadata_preallocated(self) -> bool:
        """qemu's heuristic: more clusters referenced than the host file really allocates."""
        if self._meta_prealloc is None:
            self._meta_prealloc = False
            try:
                real = self.store.allocated_size() // self.cs
                threshold = max(real * 10 // 9, real + 2)
                end_cluster = -(-self.store.size() // self.cs)
                count = 0
                rc = self._refcounts()
                for i in range(0, min(end_cluster, len(rc.table) << rc.block_shift), rc.block_entries):
                    blk = rc.block(i >> rc.block_shift)
                    if blk is not None:
                        part = blk[:max(0, end_cluster - i)]
                        if isinstance(part, array):
                            count += len(part) - part.count(0)
                        else:
                            count += int(np.count_nonzero(part))
                    if count >= threshold:
                        break
                self._meta_prealloc = count >= threshold
            except QimgError:
                self._meta_prealloc = False
        return self._meta_prealloc

    def _recurse_host(self, ext: Extent) -> None:
        """For metadata-preallocated images: holes in the host file read as zeros (data stays true)."""
        st = self.data_store
        if st is None:
            return
        host = ext.offset
        size = st.size()
        if host >= size:
            ext.zero = True
            return
        nd = st.next_data(host)
        if nd is None or nd > host:
            ext.zero = True
            if nd is not None:
                ext.length = min(ext.length, nd - host)
            return
        hole = st.next_hole(host)
        ext.length = min(ext.length, max(hole - host, 1))

    def plain_host_file(self, start: int, end: int):
        """(fd, host offset) when guest bytes [start, end) lie plainly and contiguously in one host
        file (unencrypted, uncompressed data): the copy engine may then use copy_file_range."""
        st = self.data_store
        if self.encrypted or st is None or end <= start:
            return None
        fd = getattr(st, "fd", -1)
        if fd is None or fd < 0 or getattr(st, "is_block", True):
            return None
        ext = self.block_status(start, end - start)
        if (not ext.present or not ext.data or ext.zero or ext.compressed or ext.offset is None
                or ext.length < end - start):
            return None
        return fd, ext.offset

    # ------------------------------------------------------------------ reading
    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        total = len(view)
        pos = 0
        while pos < total:
            off = offset + pos
            if off >= self.virtual_size:
                view[pos:] = bytes(total - pos)
                return
            ext = self.block_status(off, total - pos)
            n = min(ext.length, total - pos)
            sub = view[pos:pos + n]
            if ext.present and ext.data and ext.compressed:
                self._read_compressed(off, sub)
            elif ext.present and ext.data:
                if self.encrypted:
                    self._read_encrypted(off, sub)
                    pos += n
                    continue
                host = ext.offset
                self.read_host(self._data(), host, sub)
            else:
                sub[:] = bytes(n)
            pos += n

    def _read_encrypted(self, offset: int, out) -> None:
        """Decrypt guest bytes of normal clusters: whole 512-byte sectors at their host offsets."""
        cipher = self._crypto()
        pos = 0
        total = len(out)
        while pos < total:
            off = offset + pos
            host = self._host_offset(off)
            cend = (off | (self.cs - 1)) + 1
            n = min(total - pos, cend - off)
            first = host - (off % 512)
            nbytes = -(-(host + n - first) // 512) * 512
            raw = self._data().pread_full(first, nbytes)
            plain = cipher.decrypt(self._iv_sector(first, off - (host - first)), raw)
            out[pos:pos + n] = plain[host - first:host - first + n]
            pos += n

    def _iv_sector(self, host: int, guest: int) -> int:
        """The sector number of the IV: LUKS in qcow2 counts host sectors, legacy AES guest sectors."""
        return (guest if self.h.crypt_method == QCOW_CRYPT_AES else host) // 512

    def _host_offset(self, offset: int) -> int:
        l1i = offset >> self.l2_span_bits
        d = self._decoded(int(self.l1[l1i]) & L1E_OFFSET_MASK)
        base = l1i * (1 << self.l2_span_bits)
        u = (offset - base) >> self.unit_bits
        return d.host(u) + (offset - base - (u << self.unit_bits))

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def _compressed_entry(self, offset: int) -> int:
        l1i = offset >> self.l2_span_bits
        l2_off = int(self.l1[l1i]) & L1E_OFFSET_MASK
        d = self._decoded(l2_off)
        idx = (offset >> self.cluster_bits) & (self.l2_entries - 1)
        return int(d.raw[idx * 2 if self.extended else idx])

    def _read_compressed(self, offset: int, out) -> None:
        """Copy guest bytes [offset, offset+len(out)) of compressed clusters into ``out``."""
        pos = 0
        total = len(out)
        while pos < total:
            off = offset + pos
            cstart = off & ~(self.cs - 1)
            n = min(total - pos, cstart + self.cs - off)
            data = self._cluster_plain(self._compressed_entry(off))
            out[pos:pos + n] = data[off - cstart:off - cstart + n]
            pos += n

    def _cluster_plain(self, entry: int) -> bytes:
        with self._clock:
            hit = self._ccache.get(entry)
        if hit is not None:
            return hit
        host, length = qcompress.decode_descriptor(entry & ~(3 << 62), self.cluster_bits)
        size = self.store.size()
        if host >= size:
            raise CorruptImage(f"Compressed cluster at host offset {host:#x} lies outside the image file")
        raw = self.store.pread(host, min(length, size - host))
        data = qcompress.decompress(raw, self.cs, self.h.compression_type, exact=self.strict)
        with self._clock:
            if len(self._ccache) >= 8:
                self._ccache.pop(next(iter(self._ccache)))
            self._ccache[entry] = data
        return data

    # ------------------------------------------------------------------ info
    def info_specific(self) -> dict:
        h = self.h
        if h.version < 3:
            data = {"compat": "0.10", "compression-type": COMPRESSION_NAMES.get(h.compression_type, "zlib"),
                    "refcount-bits": h.refcount_bits}
            enc = self._encrypt_info()
            if enc is not None:
                data["encrypt"] = enc
            return {"type": "qcow2", "data": data}
        data: dict = {"compat": "1.1"}
        if h.has_data_file:
            if h.data_file:
                data["data-file"] = h.data_file
            data["data-file-raw"] = h.data_file_raw
        data["extended-l2"] = h.extended_l2
        data["lazy-refcounts"] = bool(h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS)
        data["corrupt"] = bool(h.incompatible_features & QCOW2_INCOMPAT_CORRUPT)
        data["refcount-bits"] = h.refcount_bits
        enc = self._encrypt_info()
        if enc is not None:
            data["encrypt"] = enc
        bitmaps = self._bitmaps_info()
        if bitmaps is not None:
            data["bitmaps"] = bitmaps
        data["compression-type"] = COMPRESSION_NAMES.get(h.compression_type, "zlib")
        return {"type": "qcow2", "data": data}

    def _bitmaps_info(self):
        h = self.h
        if not h.bitmaps_ext or not (h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS):
            return None
        out = []
        for bm in read_bitmap_directory(self.store, h, self.file_size):
            flags = []
            if bm.flags & 1:
                flags.append("in-use")
            if bm.flags & 2:
                flags.append("auto")
            out.append({"flags": flags, "name": bm.name, "granularity": 1 << bm.granularity_bits})
        return out

    def _encrypt_info(self):
        h = self.h
        if h.crypt_method == QCOW_CRYPT_AES:
            return {"format": "aes"}
        if h.crypt_method == QCOW_CRYPT_LUKS:
            out = {"format": "luks"}
            try:
                out.update(self._luks_header().info())
            except QimgError:
                pass
            return out
        return None

    def _luks_region(self):
        from ...crypto.luks1 import RegionStore

        if not self.h.crypto_header:
            raise CorruptImage("qcow2 LUKS encryption without a full disk encryption header extension")
        off, length = self.h.crypto_header
        if off % self.cs or off + length > self.file_size or length > (64 << 20):
            raise CorruptImage("Invalid full disk encryption header offset or length")
        return RegionStore(self.store, off, length)

    def _luks_header(self):
        from ...crypto import luks1

        region = self._luks_region()
        return luks1.parse_header(region.pread_full(0, luks1.LUKS_HEADER_SIZE), region.size())

    def _crypto(self):
        """The payload cipher (see ``_iv_sector`` for its sector numbers), unlocked on first use."""
        if self._cipher is None:
            secret = self._key_secret
            if self.h.crypt_method not in (QCOW_CRYPT_LUKS, QCOW_CRYPT_AES):
                raise Unsupported(f"Unsupported encryption method: {self.h.crypt_method}")
            # unlocked at open (info opens without the key: NO_IO), reported as qemu-img reports it
            prefix = f"Could not open '{self.filename}': "
            if secret is None:
                raise OpenError(prefix + "Parameter 'encrypt.key-secret' is required for cipher")
            from ...objects import get_secret

            try:
                key = get_secret(secret)
                if self.h.crypt_method == QCOW_CRYPT_AES:
                    from ...crypto.cipher import legacy_aes_cipher

                    self._cipher = legacy_aes_cipher(key, secret)
                    return self._cipher
                from ...crypto import luks1

                _hdr, self._cipher = luks1.open_volume(self._luks_region(), key)
            except QimgError as e:
                if str(e).startswith("Could not open"):
                    raise
                raise OpenError(prefix + str(e), e.exit_code) from None
        return self._cipher

    def info_extra(self) -> dict:
        extra = {"dirty-flag": bool(self.h.incompatible_features & QCOW2_INCOMPAT_DIRTY)}
        if self.encrypted:
            extra["encrypted"] = True
        if self.snapshot_list:
            extra["snapshots"] = [s.info() for s in self.snapshot_list]
        return extra

    def allocated_file_size(self) -> int:
        # qemu-img 7.2 counts the qcow2 file only, not an external data file
        return self.store.allocated_size()
