"""qcow (version 1): QEMU's original copy-on-write format.

References:
  - The qcow (version 1) image layout as published with QEMU (docs "qcow" and the historic
    qcow-format description): a 48-byte big-endian header (magic "QFI\\xfb", version 1,
    backing_file_offset/size, mtime, size, cluster_bits, l2_bits, crypt_method,
    l1_table_offset), a one-level L1 table of 64-bit L2 table offsets, L2 tables of 64-bit
    cluster offsets.  Bit 63 of an L2 entry (QCOW_OFLAG_COMPRESSED) marks a raw-deflate
    compressed cluster whose compressed size sits in the bits above bit (62 - cluster_bits).
  - Legacy AES encryption: AES-128-CBC per 512-byte sector, IV = little-endian guest sector
    number ("plain64"), key = the passphrase (UTF-8 text) zero-padded/truncated to 16 bytes; the
    cipher is the one legacy AES of crypto/cipher.py, shared with qcow2.
  - Observed qemu-img 7.2 behaviour: create uses 4 KiB clusters and 512-entry L2 tables, but
    512-byte clusters and 4096-entry L2 tables when a backing file is given; the L1 table
    follows the header and backing name (8-byte aligned) and is written padded to 512 bytes;
    new L2 tables and data clusters are appended at the cluster-aligned end of file;
    compressed clusters are appended at the 512-byte aligned end of file; sizes are rounded
    up to 512 bytes on create and down on open.

Encrypted images open without a key for metadata only (``info``, as in qemu-img); any other open
needs ``encrypt.key-secret`` and fails without it with qemu-img's message.  The key travels with
the open: ``convert -O qcow -o encrypt...`` opens the image it made with the secret it made it with.
"""

from __future__ import annotations

import struct

from ..core.driver import CreateOptions, Driver, c_string
from ..core.extent import Extent, split_at
from ..errors import CorruptImage, OpenError, QimgError, check_limit
from ..options import BACKING_FILE_OPT, NO_IO, SIZE_OPT, OptSpec, parse_bool
from ..units import round_up
from .spans import write_span

QCOW_MAGIC = 0x514649FB
QCOW_VERSION = 1
QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_OFLAG_COMPRESSED = 1 << 63

HEADER = struct.Struct(">IIQIIQBBHIQ")  # 48 bytes
HEADER_SIZE = HEADER.size
SECTOR = 512

#: named limits for fields read from an image
MAX_BACKING_NAME = 1023
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 16
MIN_L2_BITS, MAX_L2_BITS = 6, 13
MAX_L1_ENTRIES = ((1 << 31) - 1) // 8   # qemu's bound: the L1 table size must fit an int
MAX_VIRTUAL_SIZE = (1 << 63) - 1

_ZEROS: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = bytes(n)
    return z


def _zlib_compress(data) -> bytes:
    import zlib

    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


# --------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------

class QcowDriver(Driver):
    """qcow version 1: L1 -> L2 -> clusters, optional zlib clusters and legacy AES."""

    format_name = "qcow"
    supports_backing = True
    supports_compression = True
    create_opts = (
        SIZE_OPT,
        BACKING_FILE_OPT,
        OptSpec("backing_fmt", "string", "Format of the backing image"),
        OptSpec("encryption", "bool",
                "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
        OptSpec("encrypt.format", "string", "Encrypt the image, format choices: 'aes'"),
        OptSpec("encrypt.key-secret", "string", "ID of the secret that provides the AES encryption key"),
    )

    # ----- probing and opening -----
    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) >= 8 and struct.unpack_from(">II", head) == (QCOW_MAGIC, QCOW_VERSION):
            return 100
        return 0

    def _open(self, options: dict) -> None:
        raw = self.store.pread_full(0, HEADER_SIZE)
        (magic, version, backing_off, backing_len, self.mtime, size, cluster_bits, l2_bits, _pad,
         crypt, l1_off) = HEADER.unpack(raw)
        if magic != QCOW_MAGIC:
            raise OpenError("Image not in qcow format")
        if version != QCOW_VERSION:
            raise OpenError(f"Unsupported qcow version {version}")
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise CorruptImage("Cluster size must be between 512 and 64k")
        if not MIN_L2_BITS <= l2_bits <= MAX_L2_BITS:
            raise CorruptImage("L2 table size must be between 512 and 64k")
        if crypt > QCOW_CRYPT_AES:
            raise CorruptImage("invalid encryption method in qcow header")
        if size > MAX_VIRTUAL_SIZE:
            raise CorruptImage("Image too large")
        self.cluster_bits = cluster_bits
        self.l2_bits = l2_bits
        self.cluster_bytes = 1 << cluster_bits
        self.l2_entries = 1 << l2_bits
        self.l2_bytes = self.l2_entries * 8
        shift = cluster_bits + l2_bits
        self.l1_entries = (size + (1 << shift) - 1) >> shift
        check_limit("L1 table entries", self.l1_entries, MAX_L1_ENTRIES, "qcow header")
        self.charge("qcow L1 table", self.l1_entries * 8)
        file_size = self.store.size()
        if l1_off + self.l1_entries * 8 > max(file_size, HEADER_SIZE):
            raise CorruptImage(f"L1 table offset {l1_off} (+{self.l1_entries * 8} bytes) lies outside the file")
        self.header_size_field = size
        self.virtual_size = size // SECTOR * SECTOR
        self.l1_offset = l1_off
        self.crypt_method = crypt
        if backing_off:
            check_limit("backing file name length", backing_len, MAX_BACKING_NAME, "qcow header")
            if backing_off + backing_len > file_size:
                raise CorruptImage("backing file name lies outside the file")
            from ..core.driver import BackingRef

            name = c_string(self.store.pread(backing_off, backing_len))
            self.backing = BackingRef(name, None)
        self._l1 = None  # loaded on first use: info needs no table (and no numpy)
        self._l2_cache: dict[int, object] = {}
        self._zbuf = (None, None)  # (host entry, decompressed cluster)
        self.cipher = None
        if crypt == QCOW_CRYPT_AES:
            secret = options.get("encrypt.key-secret")
            if secret:
                from ..crypto.cipher import legacy_aes_cipher
                from ..objects import get_secret

                self.cipher = legacy_aes_cipher(get_secret(secret), secret)
            elif not options.get(NO_IO):
                self._need_key()  # as qemu-img: everything but info needs the key at open
        self._eof = None

    @property
    def l1(self):
        if self._l1 is None:
            import numpy as np

            raw = self.store.pread_full(self.l1_offset, self.l1_entries * 8)
            self._l1 = np.frombuffer(raw, dtype=">u8").copy()
        return self._l1

    def _need_key(self) -> None:
        if self.crypt_method and self.cipher is None:
            raise OpenError(f"Could not open '{self.filename}': Parameter 'encrypt.key-secret' is required for cipher")

    # ----- metadata -----
    @property
    def cluster_size(self) -> int:
        return self.cluster_bytes

    def info_extra(self) -> dict:
        return {"encrypted": bool(self.crypt_method)}

    @property
    def has_zero_init(self) -> bool:
        return True

    def _l2(self, l1_index: int):
        """The L2 table of an L1 slot (numpy array), or None if unallocated."""
        tbl = self._l2_cache.get(l1_index)
        if tbl is not None:
            return tbl
        off = int(self.l1[l1_index])
        if off == 0:
            return None
        if off + self.l2_bytes > self.store.size():
            raise CorruptImage(f"L2 table offset {off} lies outside the image file")
        import numpy as np

        tbl = np.frombuffer(self.store.pread_full(off, self.l2_bytes), dtype=">u8").copy()
        if len(self._l2_cache) > 256:
            self._l2_cache.clear()
        self._l2_cache[l1_index] = tbl
        return tbl

    # ----- read side -----
    def block_status(self, offset: int, length: int) -> Extent:
        import numpy as np

        self._need_key()
        cs = self.cluster_bytes
        end = min(offset + length, self.virtual_size)
        cluster = offset >> self.cluster_bits
        l1_index = cluster >> self.l2_bits
        l2_index = cluster & (self.l2_entries - 1)
        tbl = self._l2(l1_index)
        span_end = min(end, ((l1_index + 1) << (self.l2_bits + self.cluster_bits)))
        if tbl is None:
            # unallocated L2: extend over following unallocated L1 slots too
            idx = l1_index + 1
            last = (end - 1) >> (self.l2_bits + self.cluster_bits) if end > 0 else l1_index
            while idx <= last and idx < self.l1_entries and int(self.l1[idx]) == 0:
                idx += 1
            span_end = min(end, idx << (self.l2_bits + self.cluster_bits))
            return Extent(offset, span_end - offset, data=False, zero=True, present=False)
        n_clusters = ((span_end - 1) >> self.cluster_bits) - cluster + 1
        ents = tbl[l2_index:l2_index + n_clusters]
        first = int(ents[0])
        if first == 0:
            kinds = ents == 0
        elif first & QCOW_OFLAG_COMPRESSED or self.crypt_method:
            kinds = ((ents & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0) if first & QCOW_OFLAG_COMPRESSED else \
                ((ents != 0) & ((ents & np.uint64(QCOW_OFLAG_COMPRESSED)) == 0))
        else:
            expect = np.arange(len(ents), dtype=np.uint64) * np.uint64(cs) + np.uint64(first)
            kinds = ents == expect
        bad = np.nonzero(~kinds)[0]
        run = int(bad[0]) if len(bad) else len(ents)
        run_end = min(span_end, (cluster + run) << self.cluster_bits)
        n = run_end - offset
        if first == 0:
            return Extent(offset, n, data=False, zero=True, present=False)
        if first & QCOW_OFLAG_COMPRESSED:
            return Extent(offset, n, data=True, zero=False, present=True, compressed=True)
        if self.crypt_method:
            return Extent(offset, n, data=True, zero=False, present=True)
        return Extent(offset, n, data=True, zero=False, present=True, offset=first + (offset & (cs - 1)))

    def _entry(self, cluster: int) -> int:
        tbl = self._l2(cluster >> self.l2_bits)
        return 0 if tbl is None else int(tbl[cluster & (self.l2_entries - 1)])

    def _decompress(self, entry: int) -> bytes:
        if self._zbuf[0] == entry:
            return self._zbuf[1]
        import zlib

        csize = (entry >> (63 - self.cluster_bits)) & (self.cluster_bytes - 1)
        coff = entry & ((1 << (63 - self.cluster_bits)) - 1)
        raw = self.store.pread_full(coff, csize)
        try:
            d = zlib.decompressobj(-12)
            out = d.decompress(raw, self.cluster_bytes)
        except zlib.error as e:
            raise CorruptImage(f"compressed cluster at host offset {coff} is damaged: {e}") from None
        if len(out) != self.cluster_bytes:
            raise CorruptImage(f"compressed cluster at host offset {coff} is damaged (short)")
        self._zbuf = (entry, out)
        return out

    def readinto(self, offset: int, buf) -> None:
        self._need_key()
        view = memoryview(buf).cast("B")
        total = len(view)
        pos = 0
        cs = self.cluster_bytes
        while pos < total:
            off = offset + pos
            ext = self.block_status(off, total - pos)
            n = min(ext.length, total - pos)
            sub = view[pos:pos + n]
            if not ext.present:
                sub[:] = bytes(n)
            elif ext.compressed:
                c = off >> self.cluster_bits
                cur = 0
                while cur < n:
                    o = off + cur
                    within = o & (cs - 1)
                    m = min(cs - within, n - cur)
                    data = self._decompress(self._entry(o >> self.cluster_bits))
                    sub[cur:cur + m] = data[within:within + m]
                    cur += m
                del c
            elif self.crypt_method:
                self._read_encrypted(off, sub)
            else:
                self.read_host(self.store, ext.offset, sub)
            pos += n

    def _read_encrypted(self, off: int, sub) -> None:
        """Decrypt allocated clusters (runs of them) into ``sub``."""
        n = len(sub)
        cs = self.cluster_bytes
        cur = 0
        while cur < n:
            o = off + cur
            c = o >> self.cluster_bits
            within = o & (cs - 1)
            m = min(cs - within, n - cur)
            host = self._entry(c)
            s0 = within // SECTOR * SECTOR
            s1 = round_up(within + m, SECTOR)
            data = self.cipher.decrypt((c * cs + s0) // SECTOR, self.store.pread_full(host + s0, s1 - s0))
            sub[cur:cur + m] = data[within - s0:within - s0 + m]
            cur += m


    # ----- write side -----
    def _file_end(self) -> int:
        if self._eof is None:
            self._eof = self.store.size()
        return self._eof

    def _alloc(self, nbytes: int, align: int) -> int:
        """Append ``nbytes`` at the ``align``-aligned end of file."""
        off = round_up(self._file_end(), align)
        self._eof = off + nbytes
        return off

    def _l2_for_write(self, l1_index: int):
        import numpy as np

        tbl = self._l2(l1_index)
        if tbl is not None:
            return tbl
        off = self._alloc(self.l2_bytes, self.cluster_bytes)
        # zeroed table first, then the L1 entry pointing at it
        self.store.pwrite(off, bytes(self.l2_bytes))
        self.l1[l1_index] = off
        self.store.pwrite(self.l1_offset + 8 * l1_index, struct.pack(">Q", off))
        tbl = np.zeros(self.l2_entries, dtype=">u8")
        self._l2_cache[l1_index] = tbl
        return tbl

    def _old_cluster(self, cluster: int) -> bytes:
        """Current guest content of a cluster (this layer or the backing chain)."""
        cs = self.cluster_bytes
        entry = self._entry(cluster)
        if entry == 0:
            return self.read_below(cluster * cs, cs)
        if entry & QCOW_OFLAG_COMPRESSED:
            return self._decompress(entry)
        return self.pread(cluster * cs, cs)

    def pwrite(self, offset: int, data) -> None:
        if not self.writable:
            raise QimgError("Image is read-only")
        self._need_key()
        data = memoryview(data).cast("B")
        end = offset + len(data)
        if end > self.virtual_size:
            raise QimgError(f"Cannot write beyond the end of the image ({end} > {self.virtual_size})")
        for pos, nxt in split_at(offset, end, 1 << (self.l2_bits + self.cluster_bits)):
            self._write_span(pos, data[pos - offset:nxt - offset])

    def _write_span(self, offset: int, data) -> None:
        """Write inside one L2 table: allocate what is missing, then write host runs."""
        import numpy as np

        cs = self.cluster_bytes
        end = offset + len(data)
        c0 = offset >> self.cluster_bits
        c1 = (end - 1 >> self.cluster_bits) + 1
        l1_index = c0 >> self.l2_bits
        tbl = self._l2_for_write(l1_index)
        i0 = c0 & (self.l2_entries - 1)
        ents = tbl[i0:i0 + (c1 - c0)]
        need = (ents == 0) | ((ents & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0)
        crypt = bool(self.crypt_method)  # encrypted: whole clusters, so whole sectors, are written
        hosts = write_span(self.store, offset, data, cs, np.where(need, 0, ents).astype(np.int64), need,
                           lambda i: self._old_cluster(c0 + i), lambda k: self._alloc(k * cs, cs),
                           whole_clusters=crypt,
                           transform=(lambda off, d: self.cipher.encrypt(off // SECTOR, d)) if crypt else None)
        if hosts is not None:
            # a full new tail cluster makes sure the file covers the cluster
            if self.store.size() < self._eof:
                self.store.truncate(self._eof)
            ents = hosts.astype(np.uint64)
            tbl[i0:i0 + (c1 - c0)] = ents
            self._write_l2_entries(l1_index, i0, ents)

    def _write_l2_entries(self, l1_index: int, i0: int, ents) -> None:
        self.store.pwrite(int(self.l1[l1_index]) + 8 * i0, ents.astype(">u8").tobytes())

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        """qcow has no zero clusters: skip unallocated clusters when nothing lies below."""
        import numpy as np

        end = min(offset + length, self.virtual_size)
        pos = offset
        has_backing = self.backing is not None and bool(self.backing.filename)
        while pos < end:
            ext = self.block_status(pos, end - pos)
            n = ext.length
            if ext.present or has_backing:
                step = 1 << 20
                cur = pos
                while cur < pos + n:
                    m = min(step, pos + n - cur)
                    self.pwrite(cur, np.zeros(m, dtype=np.uint8).data)
                    cur += m
            pos += n

    # compressed writes: compression runs in worker threads, placement in order
    def prepare_compressed(self, offset: int, data):
        cs = self.cluster_bytes
        out = []
        view = memoryview(data).cast("B")
        for pos in range(0, len(view), cs):
            chunk = bytes(view[pos:pos + cs])
            if len(chunk) < cs:
                chunk = chunk + bytes(cs - len(chunk))
            if chunk == _zeros(cs):
                out.append(None)
                continue
            z = _zlib_compress(chunk)
            out.append((chunk, z if len(z) < cs else None))
        return out

    def write_prepared(self, offset: int, prepared) -> None:
        if not self.writable:
            raise QimgError("Image is read-only")
        if self.crypt_method:
            raise QimgError("Compression is not supported with encryption")
        cs = self.cluster_bytes
        if offset % cs:
            raise QimgError("Compressed writes must be cluster aligned")
        for i, item in enumerate(prepared):
            off = offset + i * cs
            if off >= self.virtual_size:
                break
            if item is None:
                continue
            chunk, z = item
            n = min(cs, self.virtual_size - off)
            if z is None:
                self.pwrite(off, chunk[:n])
                continue
            self._write_compressed_cluster(off, z)

    def write_compressed(self, offset: int, data) -> None:
        self.write_prepared(offset, self.prepare_compressed(offset, data))

    def _write_compressed_cluster(self, off: int, z: bytes) -> None:
        cluster = off >> self.cluster_bits
        l1_index = cluster >> self.l2_bits
        tbl = self._l2_for_write(l1_index)
        i = cluster & (self.l2_entries - 1)
        if int(tbl[i]) != 0:
            raise QimgError("Compressed writes need an unallocated cluster")
        host = self._alloc(len(z), SECTOR)
        self.store.pwrite(host, z)
        entry = QCOW_OFLAG_COMPRESSED | (len(z) << (63 - self.cluster_bits)) | host
        tbl[i] = entry
        self.store.pwrite(int(self.l1[l1_index]) + 8 * i, struct.pack(">Q", entry))

    def make_empty(self) -> None:
        """Drop every cluster (commit empties the overlay this way)."""
        l1_bytes = self.l1_entries * 8
        zero = bytes(min(round_up(l1_bytes, SECTOR), 1 << 20))
        for pos in range(0, round_up(l1_bytes, SECTOR), max(len(zero), 1)):
            self.store.pwrite(self.l1_offset + pos, zero[:round_up(l1_bytes, SECTOR) - pos])
        self.l1[:] = 0
        self._l2_cache.clear()
        self._zbuf = (None, None)
        self.store.truncate(self.l1_offset + round_up(l1_bytes, SECTOR))
        self._eof = None

    # ----- create -----
    @classmethod
    def _encryption(cls, opts: CreateOptions):
        o = opts.options
        fmt = o.get("encrypt.format")
        enc = o.get("encryption")
        on = False
        if enc is not None:
            on = parse_bool("encryption", enc)
        if fmt is not None:
            if fmt != "aes":
                raise QimgError(f"Parameter 'encrypt.format' does not accept value '{fmt}'")
            on = True
        if not on:
            return None
        secret = o.get("encrypt.key-secret")
        if not secret:
            raise QimgError("Parameter 'encrypt.key-secret' is required for cipher")
        from ..crypto.cipher import legacy_aes_key
        from ..objects import get_secret

        return legacy_aes_key(get_secret(secret), secret)  # checked before any file is made

    @classmethod
    def create(cls, filename: str, opts: CreateOptions, opener) -> None:
        key = cls._encryption(opts)
        size = round_up(opts.size or 0, SECTOR)
        backing = opts.backing_file
        if backing:
            cluster_bits, l2_bits = 9, 12
            name = backing.encode()
            if len(name) > MAX_BACKING_NAME:
                raise QimgError("Backing file name too long")
        else:
            cluster_bits, l2_bits = 12, 9
            name = b""
        shift = cluster_bits + l2_bits
        l1_entries = (size + (1 << shift) - 1) >> shift
        check_limit("L1 table entries", l1_entries, MAX_L1_ENTRIES)
        l1_off = round_up(HEADER_SIZE + len(name), 8)
        hdr = HEADER.pack(QCOW_MAGIC, QCOW_VERSION, HEADER_SIZE if name else 0, len(name), 0, size,
                          cluster_bits, l2_bits, 0, QCOW_CRYPT_AES if key is not None else QCOW_CRYPT_NONE,
                          l1_off)
        with opener.open_file(filename, writable=True, create=True) as store:
            store.pwrite(0, hdr + name)
            l1_end = l1_off + round_up(l1_entries * 8, SECTOR)
            zero = bytes(min(l1_end - l1_off, 1 << 20))
            for pos in range(l1_off, l1_end, max(len(zero), 1)):
                store.pwrite(pos, zero[:l1_end - pos])

    @classmethod
    def format_line_options(cls, opts: CreateOptions) -> list[tuple[str, str]]:
        out = [("size", str(opts.size or 0))]
        if opts.backing_file:
            out.append(("backing_file", opts.backing_file))
        if opts.backing_fmt:
            out.append(("backing_fmt", opts.backing_fmt))
        for k in ("encryption", "encrypt.format", "encrypt.key-secret"):
            if k in opts.options:
                out.append((k, opts.options[k]))
        return out
