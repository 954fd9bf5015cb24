"""Block-status failures in each command's own words (qemu-img prefixes them per command)."""

from __future__ import annotations

from ..errors import CorruptImage
from .copy import ChainSource


class RewordedSource(ChainSource):
    """A ChainSource whose corruption errors read as the command reports them: ``reword(offset, error)``
    gives the message (convert: "error while reading block status at offset N: ..."; measure: "Unable to
    get block status: ..."); the diagnostics the driver handed up go along."""

    def __init__(self, chain, reword, base_depth: int | None = None):
        super().__init__(chain, base_depth)
        self.reword = reword

    def extents(self, start, end):
        it = super().extents(start, end)
        pos = start
        while True:
            try:
                ext = next(it)
            except StopIteration:
                return
            except CorruptImage as e:
                if str(e) != "Input/output error":
                    raise  # a driver's own message stands; qemu words only its I/O errors per command
                raise CorruptImage(self.reword(pos, e), e.exit_code, e.diagnostics) from None
            pos = ext.end
            yield ext
