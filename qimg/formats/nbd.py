"""nbd: the raw view of an image served by an NBD server (qemu-nbd, nbdkit, nbd-server), as source or target.

References:
  - The NBD protocol specification (doc/proto.md): "base:allocation" block status (NBD_STATE_HOLE,
    NBD_STATE_ZERO); the client itself is ``io.nbd``.
  - Observed qemu-img 7.2 behaviour: an export is a raw image ("disk size: unavailable", no dirty-flag),
    creating on an export only checks its size ("Cannot grow NBD nodes").

The registry opens any format on an export through ``NbdDriver.open_store`` (a protocol that provides a
store); a plain ``nbd://`` name opens this raw view.
"""

from __future__ import annotations

from ..core.extent import Extent
from ..errors import QimgError
from ..io.nbd import NBD_STATE_HOLE, NBD_STATE_ZERO, NbdStore
from .raw import RawDriver


class NbdDriver(RawDriver):
    """The raw view of an NBD export (qemu-img shows such images as format raw)."""

    format_name = "raw"
    provides_store = True

    @classmethod
    def open_store(cls, filename: str, writable: bool = False, options: dict | None = None) -> NbdStore:
        """A store over the export (the registry may open another format on top of it)."""
        return NbdStore(filename, writable)

    @classmethod
    def open_protocol(cls, filename: str, writable: bool = False, options: dict | None = None):
        store = NbdStore(filename, writable)
        try:
            return cls.open(store, filename, writable=writable, opener=None, options=options or {})
        except BaseException:
            store.close()
            raise

    def _open(self, options: dict) -> None:
        self.offset = 0
        self.virtual_size = self.store.size()

    def block_status(self, offset: int, length: int) -> Extent:
        end = min(offset + length, self.virtual_size)
        n, fl = self.store.client.block_status(offset, end - offset)
        hole = bool(fl & NBD_STATE_HOLE)
        zero = bool(fl & NBD_STATE_ZERO)
        return Extent(offset, n, data=not hole, zero=zero, present=True, offset=offset)

    def allocated_file_size(self):
        return None

    def info_extra(self) -> dict:
        return {"dirty-flag": None}

    def truncate(self, size: int, shrink: bool = False, prealloc: str = "off") -> None:
        raise QimgError("Cannot grow NBD nodes" if size > self.virtual_size else
                        "Image format driver does not support resize")

    @property
    def has_zero_init(self) -> bool:
        return False


__all__ = ["NbdDriver"]
