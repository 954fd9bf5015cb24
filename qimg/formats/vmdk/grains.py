"""Grain-table extents: the lookup machinery shared by VMDK4 sparse, VMDK3 (COWD) and seSparse.

References:
    VMware, "Virtual Disk Format 1.1", section "Sparse Extents": a grain directory (GD)
    points to grain tables (GT) whose entries point to grains; an entry of 0 means the
    grain is not allocated (read from the parent, or zeros).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from ...core.policy import check_host, read_host
from ...errors import CorruptImage, Unsupported

if TYPE_CHECKING:
    import numpy as np  # annotations only: numpy is imported where it is used

SECTOR = 512
#: decoded grain kinds
UNALLOC, ZERO, DATA, COMPRESSED = 0, 1, 2, 3
#: grain tables kept decoded in memory before the cache is dropped
GT_CACHE_ENTRIES = 4096


class GrainExtent:
    """An extent addressed through a grain directory and grain tables.

    Subclasses set ``l1`` (numpy array of GD entries), ``l2_entries``, ``grain_bytes``,
    ``size`` (guest bytes) and implement ``_gt_location`` and ``_decode``.
    """

    kind_name = "SPARSE"
    compressed = False
    flat = False
    #: untrusted mode (set by the driver): grains past the end of the file and inexact inflation refused
    strict = False

    def __init__(self, store, filename: str):
        self.store = store
        self.filename = filename
        self.file_size = store.size()
        self._gt_cache: dict[int, tuple] = {}
        self._grain_cache = (None, None)

    # --- to be provided ---
    def _gt_location(self, gt_index: int):
        """(host byte offset, entries) of a grain table, or None when not allocated."""
        raise NotImplementedError

    def _decode(self, raw: np.ndarray, gt_index: int):
        """(kinds uint8 array, host byte offsets int64 array) for raw GT entries."""
        raise NotImplementedError

    def _read_gt_raw(self, gt_index: int):
        import numpy as np

        loc = self._gt_location(gt_index)
        if loc is None:
            return None
        off, dtype = loc
        nbytes = self.l2_entries * np.dtype(dtype).itemsize
        if off + nbytes > self.file_size:
            raise CorruptImage(f"grain table {gt_index} at offset {off} lies beyond the end of '{self.filename}'")
        return np.frombuffer(self.store.pread_full(off, nbytes), dtype).copy()

    def table(self, gt_index: int):
        """Decoded grain table ``gt_index``: (kinds, host offsets)."""
        import numpy as np

        got = self._gt_cache.get(gt_index)
        if got is None:
            raw = self._read_gt_raw(gt_index)
            if raw is None:
                kinds = np.zeros(self.l2_entries, np.uint8)
                offs = np.zeros(self.l2_entries, np.int64)
            else:
                kinds, offs = self._decode(raw, gt_index)
            if len(self._gt_cache) >= GT_CACHE_ENTRIES:
                self._gt_cache.clear()
            got = self._gt_cache[gt_index] = (kinds, offs)
        return got

    def invalidate(self, gt_index: int) -> None:
        self._gt_cache.pop(gt_index, None)

    # --- the read side ---
    def status(self, offset: int, length: int):
        """(kind, run length, host offset or None) of the first run at ``offset`` (extent-relative)."""
        import numpy as np

        gb = self.grain_bytes
        grain = offset // gb
        gt_index, first = divmod(grain, self.l2_entries)
        kinds, offs = self.table(gt_index)
        kind = int(kinds[first])
        in_grain = offset - grain * gb
        max_grains = min(self.l2_entries - first, (in_grain + length + gb - 1) // gb)
        ks = kinds[first:first + max_grains]
        diff = np.flatnonzero(ks != kind)
        count = int(diff[0]) if diff.size else max_grains
        host = None
        if kind == DATA:
            o = offs[first:first + count]
            steps = np.flatnonzero(np.diff(o) != gb)
            if steps.size:
                count = int(steps[0]) + 1
            host = int(offs[first]) + in_grain
            if self.strict:
                check_host(self.store, int(offs[first]), 1, offset, self.filename, "grain at host offset")
        n = min(count * gb - in_grain, length)
        return kind, n, host

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        pos, total = 0, len(view)
        while pos < total:
            kind, n, host = self.status(offset + pos, total - pos)
            sub = view[pos:pos + n]
            if kind == DATA:
                read_host(self.store, host, sub, self.strict, self.filename)
            elif kind == COMPRESSED:
                self._read_compressed(offset + pos, sub)
            else:
                sub[:] = bytes(n)
            pos += n

    def _read_compressed(self, offset: int, view) -> None:
        gb = self.grain_bytes
        pos = 0
        while pos < len(view):
            off = offset + pos
            grain = off // gb
            in_grain = off - grain * gb
            n = min(gb - in_grain, len(view) - pos)
            data = self.grain_data(grain)
            view[pos:pos + n] = data[in_grain:in_grain + n]
            pos += n

    def grain_data(self, grain: int) -> bytes:
        """Decompressed bytes of a compressed grain (the last one is cached)."""
        if self._grain_cache[0] == grain:
            return self._grain_cache[1]
        kinds, offs = self.table(grain // self.l2_entries)
        host = int(offs[grain % self.l2_entries])
        data = self._inflate(host, grain)
        self._grain_cache = (grain, data)
        return data

    def _inflate(self, host: int, grain: int) -> bytes:
        raise CorruptImage("compressed grains are not supported in this extent")

    def inflate(self, data, gb: int, where: str, grain: int = 0) -> bytes:
        """A compressed grain inflated to at most ``gb`` bytes (a shorter one zero-padded, as qemu-img reads
        it); a stream going on past the grain fails as in qemu-img (a bomb stops there).  In untrusted mode
        it must inflate to exactly the grain (or to the extent's last, shorter part)."""
        try:
            d = zlib.decompressobj()
            out = d.decompress(data, gb)
            more = not d.eof and bool(d.decompress(d.unconsumed_tail, 1))
        except zlib.error as e:
            raise CorruptImage(f"compressed grain at {where} cannot be inflated: {e}") from None
        if more or self.strict and (not d.eof or len(out) not in (gb, min(gb, self.size - grain * gb))):
            raise CorruptImage(f"compressed grain at {where} does not inflate to exactly the grain size {gb}")
        if len(out) < gb:
            out += bytes(gb - len(out))
        return out

    def pwrite(self, offset: int, data, base_reader=None) -> None:
        """Write guest bytes; read-only kinds (COWD, seSparse) refuse."""
        raise Unsupported(f"Writing to {self.kind_name or 'this'} extents is not supported")

    def write_zeroes(self, offset: int, length: int, has_base: bool, base_reader=None) -> None:
        raise Unsupported(f"Writing to {self.kind_name or 'this'} extents is not supported")

    def iter_allocated(self):
        """(grain index, kind, host offset) arrays over all allocated grain tables (for check)."""
        for gt_index in range(len(self.l1)):
            if self._gt_location(gt_index) is None:
                continue
            kinds, offs = self.table(gt_index)
            yield gt_index, kinds, offs

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
