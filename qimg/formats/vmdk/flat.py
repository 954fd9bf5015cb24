"""Flat extents (FLAT, VMFS, VMFSRDM/VMFSRAW) and zero extents.

References:
    VMware, "Virtual Disk Format 1.1", section "The Descriptor File", extent types FLAT
    (a plain file holding the guest sectors from the given offset), VMFS, VMFSRDM, VMFSRAW,
    ZERO (reads as zeros, no file).
"""

from __future__ import annotations

from ...core.policy import read_host

#: extent-local kinds beyond the grain kinds: a flat range whose host bytes are a hole
FLAT_DATA, FLAT_HOLE, ZERO_EXTENT = 10, 11, 12


class FlatExtent:
    """Guest sectors stored plainly in a host file from ``offset`` on."""

    flat = True
    compressed = False
    grain_bytes = None
    #: untrusted mode (set by the driver): bytes past the end of the file are refused, not zeros
    strict = False

    def __init__(self, store, filename: str, size: int, offset: int, kind_name: str = "FLAT"):
        self.store = store
        self.filename = filename
        self.size = size
        self.offset = offset
        self.kind_name = kind_name

    def status(self, offset: int, length: int):
        host = self.offset + offset
        store = self.store
        nxt = store.next_data(host)
        if nxt is None:
            return FLAT_HOLE, length, host
        if nxt > host:
            return FLAT_HOLE, min(nxt - host, length), host
        hole = store.next_hole(host)
        return FLAT_DATA, max(1, min(hole - host, length)), host

    def readinto(self, offset: int, buf) -> None:
        read_host(self.store, self.offset + offset, memoryview(buf).cast("B"), self.strict, self.filename)

    def pwrite(self, offset: int, data, base_reader=None) -> None:
        self.store.pwrite(self.offset + offset, data)

    def write_zeroes(self, offset: int, length: int, has_base: bool, base_reader=None) -> None:
        host = self.offset + offset
        size = self.store.size()
        if host >= size:
            return
        length = min(length, size - host)
        if hasattr(self.store, "punch_hole") and self.store.punch_hole(host, length):
            return
        chunk = bytes(min(length, 1 << 20))
        pos = 0
        while pos < length:
            n = min(len(chunk), length - pos)
            self.store.pwrite(host + pos, chunk[:n])
            pos += n

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


class ZeroExtent:
    """A ZERO extent: no file, reads as zeros."""

    flat = True
    compressed = False
    grain_bytes = None
    kind_name = "ZERO"
    store = None

    def __init__(self, size: int):
        self.size = size
        self.filename = None

    def status(self, offset, length):
        return ZERO_EXTENT, length, None

    def readinto(self, offset, buf) -> None:
        memoryview(buf).cast("B")[:] = bytes(len(buf))

    def pwrite(self, offset, data, base_reader=None) -> None:
        from ...errors import QimgError

        raise QimgError("Cannot write to a ZERO extent")

    def write_zeroes(self, offset, length, has_base, base_reader=None) -> None:
        pass

    def close(self) -> None:
        pass


