"""The VMDK driver: a descriptor and its extents seen as one layer.

References:
    VMware, "Virtual Disk Format 1.1" (descriptor file, hosted sparse extents, ESX server
    sparse extents, flat extents); VMware, "Virtual Disk Format 5.0" (stream-optimized
    compressed sparse extents); seSparse as described in sesparse.py.  Behaviour (messages,
    info fields, check) follows qemu-img 7.2.
"""

from __future__ import annotations

import bisect
import os
import re
import stat

from ...core.driver import BackingRef, Driver
from ...core.extent import Extent
from ...errors import CorruptImage, LimitExceeded, OpenError, QimgError, Unsupported
from ...options import BACKING_FILE_OPT, SIZE_OPT, OptSpec
from . import descriptor as dsc

SECTOR = 512
VMDK3_MAGIC = b"COWD"
VMDK4_MAGIC = b"KDMV"
SESPARSE_MAGIC = b"\xbe\xba\xfe\xca\0\0\0\0"
MAX_VIRTUAL_SIZE = 1 << 62
#: extent types stored as hosted sparse files (a KDMV or COWD header of their own)
_SPARSE_TYPES = ("SPARSE", "VMFSSPARSE")
#: grain directory bytes held for all extents of one descriptor
MAX_TABLE_BYTES = 256 << 20


class VmdkDriver(Driver):
    """VMware virtual disks: monolithic/split sparse and flat, streamOptimized, vmfs, seSparse, VMDK3."""

    format_name = "vmdk"
    supports_backing = True
    #: -c is accepted: stream extents are always deflated, the others store grains plainly (as qemu-img)
    supports_compression = True
    create_opts = (
        SIZE_OPT,
        OptSpec("adapter_type", "string",
                "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX"),
        BACKING_FILE_OPT,
        OptSpec("backing_fmt", "string", "Must be 'vmdk' if present"),
        OptSpec("compat6", "bool", "VMDK version 6 image"),
        OptSpec("hwversion", "string", "VMDK hardware version"),
        OptSpec("toolsversion", "string", "VMware guest tools version"),
        OptSpec("subformat", "string",
                "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | "
                "twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} "),
        OptSpec("zeroed_grain", "bool", "Enable efficient zero writes using the zeroed-grain GTE feature"),
    )
    #: the file protocol's options: accepted, not listed by -o help (as in qemu-img)

    # ----- probing and opening -----
    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) >= 4 and head[:4] in (VMDK3_MAGIC, VMDK4_MAGIC):
            return 100
        return 100 if dsc.looks_like_descriptor(head[:2048]) else 0

    def _open(self, options: dict) -> None:
        self.extents = []
        self.starts = []
        self.desc = None
        self.stream_writer = None
        self._desc_area = None  # (offset, bytes available or None for a whole descriptor file)
        self._cid_updated = False
        self.monolithic = True
        head = self.store.pread_full(0, 512)
        if head[:4] == VMDK4_MAGIC:
            self._open_sparse_file()
        elif head[:4] == VMDK3_MAGIC:
            from .cowd import CowdExtent

            self.extents.append(CowdExtent(self.store, self.filename, kind_name=""))
            # qemu-img reads the CIDs of a bare VMDK3 file from text at offset 512 (inside the header)
            self.desc = dsc.parse(self.store.pread_full(512, 20 * 512), extents_required=False)
            self.create_type = ""
            self.cid, self.parent_cid = self.desc.cid, self.desc.parent_cid
            if self.desc.parent_hint is None:
                self.desc = None
        else:
            self._open_descriptor_file()
        pos = 0
        for ext in self.extents:
            ext.strict = self.strict  # untrusted mode: extents refuse what qemu-img reads as zeros
            self.starts.append(pos)
            pos += ext.size
        if pos > MAX_VIRTUAL_SIZE:
            raise LimitExceeded(f"virtual size {pos} exceeds the limit {MAX_VIRTUAL_SIZE}")
        self.virtual_size = pos
        if self.desc is not None and self.parent_cid != dsc.CID_NONE and self.desc.parent_hint:
            self.backing = BackingRef(self.desc.parent_hint, "vmdk")

    def check_backing(self, parent, parent_name: str) -> None:
        """Like qemu-img, read through to the parent only while its CID is still the parentCID this
        overlay recorded: a parent written since then no longer holds what the overlay was made over."""
        cid = parent.cid if isinstance(parent, VmdkDriver) else None
        if cid is not None and cid != self.parent_cid:
            raise QimgError(f"Invalid argument: the parent '{parent_name}' has changed (its CID is {cid:08x}, "
                            f"'{self.filename}' was made over CID {self.parent_cid:08x})")

    def _open_sparse_file(self) -> None:
        from . import sparse

        h = self.store.pread_full(0, 512)
        hdr = sparse.SparseHeader.unpack(h)
        fresh_stream = (self.writable and hdr.gd_offset == sparse.GD_AT_END
                        and (hdr.flags & sparse.FLAG_MARKER) and self._stream_is_empty(hdr))
        if fresh_stream:
            ext = _FreshStream(self.store, self.filename, hdr)
        else:
            # the header (and its tables) are validated before the descriptor is looked at, as qemu-img does
            ext = sparse.SparseExtent(self.store, self.filename, kind_name="", writable=self.writable)
        raw_desc = sparse.embedded_descriptor(self.store, hdr)
        self.desc = dsc.parse(raw_desc, extents_required=False) if raw_desc else None
        if raw_desc:
            self._desc_area = (hdr.desc_offset * SECTOR, len(raw_desc))
        self.cid = self.desc.cid if self.desc else dsc.CID_NONE
        self.parent_cid = self.desc.parent_cid if self.desc else dsc.CID_NONE
        self.create_type = (self.desc.create_type if self.desc else None) or "monolithicSparse"
        if fresh_stream:
            from .stream import StreamWriter

            self.stream_writer = StreamWriter(self.store, hdr, hdr.overhead)
            self.store.truncate(hdr.overhead * SECTOR)
        l1 = getattr(ext, "l1", None)
        self.charge("VMDK grain directory", 0 if l1 is None else l1.nbytes)
        self.extents.append(ext)

    def _stream_is_empty(self, hdr) -> bool:
        """A stream image as create writes it: the overhead, an all-zero grain directory, footer, EOS."""
        from . import sparse

        size = self.store.size()
        base = hdr.overhead * SECTOR
        try:
            foot = sparse.read_header(self.store, self.filename)
        except QimgError:
            return False
        if foot.gd_offset * SECTOR != base + SECTOR or foot.num_gtes_per_gt * foot.grain_size == 0:
            return False
        gd_entries = -(-foot.capacity // (foot.num_gtes_per_gt * foot.grain_size))
        gd_bytes = max(1, -(-gd_entries * 4 // SECTOR)) * SECTOR
        if size != base + SECTOR + gd_bytes + 3 * SECTOR or gd_bytes > (64 << 20):
            return False
        return not self.store.pread_full(base + SECTOR, gd_bytes).rstrip(b"\0")

    def _open_descriptor_file(self) -> None:
        size = self.store.size()
        raw = self.store.pread_full(0, min(size, dsc.MAX_DESCRIPTOR_BYTES))
        if b"\0" in raw[:size] and not dsc.looks_like_descriptor(raw[:2048]):
            raise CorruptImage("invalid VMDK image descriptor")
        self.desc = dsc.parse(raw, extents_required=True)
        self._desc_area = (0, None)
        self.cid, self.parent_cid = self.desc.cid, self.desc.parent_cid
        self.create_type = self.desc.create_type
        self.monolithic = False
        table_bytes = 0
        for line in self.desc.extents:
            ext = self._open_extent(line)
            self.extents.append(ext)
            # many extent lines naming one big sparse file must not multiply its tables in memory
            l1 = getattr(ext, "l1", None)
            table_bytes += 0 if l1 is None else l1.nbytes
            self.charge("VMDK grain directory", 0 if l1 is None else l1.nbytes)
            if table_bytes > MAX_TABLE_BYTES:
                raise LimitExceeded(f"grain directories of all extents ({table_bytes} bytes) exceed the limit "
                                    f"{MAX_TABLE_BYTES}")

    def _open_extent(self, line: dsc.ExtentLine):
        from .flat import FlatExtent, ZeroExtent

        if line.type == "ZERO":
            return ZeroExtent(line.sectors * SECTOR)
        if self.opener is None:
            raise OpenError("cannot open VMDK extents here")
        path = self.opener.check(line.filename, "extent")  # the policy first: not even a stat outside it
        if os.path.abspath(path) == os.path.abspath(self.filename):
            raise CorruptImage(f"extent '{line.filename}' is the descriptor itself")
        try:
            st = os.stat(path)
        except OSError as e:
            # a plain QimgError: the registry prefixes the descriptor's name, as qemu-img does
            raise QimgError(f"Could not open '{path}': {e.strerror}") from None
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode) or stat.S_ISCHR(st.st_mode):
            raise CorruptImage(f"extent '{path}' is not a regular file or block device")
        try:
            # a hosted sparse extent has metadata of its own: it is locked as an image
            store = self.opener.open_file(line.filename, self.writable, metadata=line.type in _SPARSE_TYPES,
                                          kind="extent")
        except QimgError as e:
            msg = str(e)
            raise QimgError(msg if msg.startswith("Could not open") else f"Could not open '{path}': {msg}") from None
        try:
            if line.type in ("FLAT", "VMFS", "VMFSRDM", "VMFSRAW"):
                return FlatExtent(store, path, line.sectors * SECTOR, line.offset_sectors * SECTOR,
                                  "VMFS" if line.type != "FLAT" else "FLAT")
            if line.type == "SESPARSE":
                from .sesparse import SeSparseExtent

                if self.writable:
                    raise Unsupported("No write support for seSparse images available")

                return SeSparseExtent(store, path, line.sectors)
            magic = store.pread_full(0, 4)
            if magic == VMDK4_MAGIC:
                from .sparse import SparseExtent

                return SparseExtent(store, path, kind_name=line.type, writable=self.writable)
            if magic == VMDK3_MAGIC:
                from .cowd import CowdExtent

                return CowdExtent(store, path, kind_name=line.type)
            raise CorruptImage(f"Invalid VMDK magic in extent '{path}'")
        except BaseException:
            store.close()
            raise

    # ----- the read side -----
    @property
    def cluster_size(self):
        ext = self.extents[0] if self.extents else None
        if ext is None or ext.flat:
            return None
        return ext.grain_bytes

    def _find(self, offset: int):
        i = bisect.bisect_right(self.starts, offset) - 1
        return i, self.extents[i], self.starts[i]

    def block_status(self, offset: int, length: int) -> Extent:
        from .flat import FLAT_DATA, FLAT_HOLE
        from .grains import COMPRESSED, DATA, ZERO

        i, ext, start = self._find(offset)
        rel = offset - start
        length = min(length, ext.size - rel)
        kind, n, host = ext.status(rel, length)
        fname = None if ext.store is self.store else ext.filename
        if kind == DATA or kind == FLAT_DATA:
            return Extent(offset, n, data=True, zero=False, present=True, offset=host, filename=fname)
        if kind == FLAT_HOLE:
            return Extent(offset, n, data=True, zero=True, present=True, offset=host, filename=fname)
        if kind == COMPRESSED:
            return Extent(offset, n, data=True, zero=False, present=True, compressed=True)
        if kind == ZERO:
            return Extent(offset, n, data=False, zero=True, present=True)
        if kind >= 10:  # a ZERO extent
            return Extent(offset, n, data=False, zero=True, present=True)
        return Extent(offset, n, data=False, zero=True, present=False)

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        pos, total = 0, len(view)
        while pos < total:
            off = offset + pos
            if off >= self.virtual_size:
                view[pos:] = bytes(total - pos)
                return
            i, ext, start = self._find(off)
            n = min(total - pos, start + ext.size - off)
            ext.readinto(off - start, view[pos:pos + n])
            pos += n


    # ----- info -----
    def info_specific(self) -> dict:
        exts = []
        for ext in self.extents:
            e = {"filename": ext.filename or "", "format": ext.kind_name, "virtual-size": ext.size}
            if not ext.flat:
                e["cluster-size"] = ext.grain_bytes
            if ext.compressed:
                e["compressed"] = True
            exts.append(e)
        data = {"create-type": self.create_type, "cid": self.cid, "parent-cid": self.parent_cid, "extents": exts}
        return {"type": "vmdk", "data": data}

    def allocated_file_size(self) -> int:
        seen = set()
        total = 0
        for store in [self.store] + [e.store for e in self.extents]:
            if store is None:
                continue
            ident = getattr(store, "dev_ino", id(store))
            if ident in seen:
                continue
            seen.add(ident)
            total += store.allocated_size()
        return total

    # ----- the write side -----
    @property
    def has_zero_init(self) -> bool:
        return True

    def _base_reader(self, base: int):
        if self.backing is None:
            return None

        def read(off, n):
            return self.read_below(base + off, n)  # the chain this image was opened in hands it the parent
        return read

    def _check_writable(self):
        if not self.writable:
            raise QimgError("Image is read-only")
        if not self._cid_updated:
            self._cid_updated = True
            self._update_cid()

    def _update_cid(self) -> None:
        """A new content ID on the first write, as VMware and qemu-img do (children note their parent's CID)."""
        if self.stream_writer is not None or self._desc_area is None or self.desc is None:
            return
        from .create import new_cid

        cid = new_cid()
        text, n = re.subn(r"(?m)^([ \t]*CID[ \t]*=[ \t]*)[0-9a-fA-Fx]+", lambda m: m.group(1) + "%x" % cid,
                          self.desc.text, count=1)
        if not n:
            return
        raw = text.encode()
        off, room = self._desc_area
        if room is not None:
            if len(raw) > room:
                return
            raw += bytes(room - len(raw))
        self.store.pwrite(off, raw)
        if room is None:
            self.store.truncate(len(raw))
        self.desc.text = text
        self.cid = self.desc.cid = cid

    def pwrite(self, offset: int, data) -> None:
        self._check_writable()
        if self.stream_writer is not None:
            self.stream_writer.pwrite(offset, data)
            return
        view = memoryview(data).cast("B")
        pos, total = 0, len(view)
        while pos < total:
            off = offset + pos
            if off >= self.virtual_size:
                raise QimgError(f"Could not write at offset {off}: beyond the end of the image")
            i, ext, start = self._find(off)
            n = min(total - pos, start + ext.size - off)
            ext.pwrite(off - start, view[pos:pos + n], self._base_reader(start))
            pos += n

    def plain_host_file(self, start: int, end: int):
        """(fd, host offset of ``start``) when [start, end) lies in one flat extent file (for copy offload)."""
        if not self.extents or self.stream_writer is not None:
            return None
        i, ext, base = self._find(start)
        if not ext.flat or ext.store is None or end > base + ext.size:
            return None
        fd = getattr(ext.store, "fd", -1)
        if fd is None or fd < 0 or getattr(ext.store, "is_block", True):
            return None
        return fd, ext.offset + (start - base)

    def write_compressed(self, offset: int, data) -> None:
        self.pwrite(offset, data)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        self._check_writable()
        if self.stream_writer is not None:
            return  # grains never written read as zeros
        pos, end = offset, min(offset + length, self.virtual_size)
        while pos < end:
            i, ext, start = self._find(pos)
            n = min(end - pos, start + ext.size - pos)
            ext.write_zeroes(pos - start, n, self.backing is not None, self._base_reader(start))
            pos += n

    def finalize(self) -> None:
        """Write the stream footer (grain directory, footer, end-of-stream marker)."""
        if self.stream_writer is not None:
            self.stream_writer.finish()

    def flush(self) -> None:
        for store in {id(s): s for s in [self.store] + [e.store for e in self.extents] if s is not None}.values():
            store.flush()

    def check(self, repair: str | None = None):
        from .check import check_image

        return check_image(self, repair)

    def close(self) -> None:
        try:
            if self.stream_writer is not None:
                try:
                    self.stream_writer.finish()
                finally:
                    self.stream_writer.close()
                    self.stream_writer = None
        finally:
            for ext in getattr(self, "extents", []):
                if ext.store is not None and ext.store is not self.store:
                    ext.close()
            super().close()

    # ----- create -----
    @classmethod
    def create(cls, filename, opts, opener) -> None:
        from .create import create

        create(filename, opts, opener)

    @classmethod
    def format_line_options(cls, opts) -> list[tuple[str, str]]:
        from .create import format_line_options

        return format_line_options(opts)

    @classmethod
    def creates_single_file(cls, options) -> bool:
        return options.get("subformat", "monolithicSparse") in ("monolithicSparse", "streamOptimized")

    @classmethod
    def created_files(cls, filename, options) -> list[str]:
        from .create import created_files

        return created_files(filename, options)


class _FreshStream:
    """The extent of a stream image being written: reads as zeros until it is finished."""

    flat = False
    compressed = True
    kind_name = ""

    def __init__(self, store, filename, hdr):
        self.store = store
        self.filename = filename
        self.size = hdr.capacity * SECTOR
        self.grain_bytes = hdr.grain_size * SECTOR

    def status(self, offset, length):
        return 0, length, None

    def readinto(self, offset, buf):
        memoryview(buf).cast("B")[:] = bytes(len(buf))

    def close(self):
        pass
