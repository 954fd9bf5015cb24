"""cloop: compressed loopback images (Knoppix cloop v2), read-only.

References:
  - The cloop v2 layout as documented with the cloop tools (create_compressed_fs /
    extract_compressed_fs): a 128-byte shell-script preamble, then big-endian
    block_size (u32) and n_blocks (u32), then n_blocks + 1 big-endian u64 file offsets;
    block i is the zlib stream between offsets[i] and offsets[i + 1] and inflates to
    block_size bytes.
  - Observed qemu-img 7.2 behaviour: block_size must be a non-zero multiple of 512 and at
    most 64 MiB; the whole image is reported as data by ``map``.
"""

from __future__ import annotations

import struct

from ..core.driver import Driver
from ..errors import CorruptImage, OpenError, check_limit
from .inflate import inflate_into

CLOOP_PREAMBLE = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
HEADER_SIZE = 128
SECTOR = 512

#: named limits for values read from an image
MAX_BLOCK_SIZE = 64 << 20
MAX_BLOCKS = 1 << 26                    # 512 MiB of offsets
MAX_COMPRESSED_BLOCK = 2 * MAX_BLOCK_SIZE


class CloopDriver(Driver):
    """Read-only cloop images, one zlib block at a time."""

    format_name = "cloop"

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 2 if head.startswith(CLOOP_PREAMBLE) else 0

    def _open(self, options: dict) -> None:
        import numpy as np

        if self.writable:
            raise OpenError("Driver 'cloop' can only be used for read-only devices")
        block_size, n_blocks = struct.unpack(">II", self.store.pread_full(HEADER_SIZE, 8))
        if block_size == 0:
            raise CorruptImage("block_size cannot be zero")
        if block_size % SECTOR:
            raise CorruptImage(f"block_size {block_size} must be a multiple of 512")
        check_limit("cloop block_size", block_size, MAX_BLOCK_SIZE, "cloop header")
        check_limit("cloop n_blocks", n_blocks, MAX_BLOCKS, "cloop header")
        self.charge("cloop block offsets", (n_blocks + 1) * 8)
        table = 8 * (n_blocks + 1)
        file_size = self.store.size()
        if HEADER_SIZE + 8 + table > file_size:
            raise CorruptImage("cloop offsets table extends past the end of the file")
        offs = np.frombuffer(self.store.pread_full(HEADER_SIZE + 8, table), dtype=">u8").astype(np.int64)
        if n_blocks:
            sizes = np.diff(offs)
            bad = np.nonzero(sizes < 0)[0]
            if len(bad):
                raise CorruptImage(f"offsets not monotonically increasing at index {int(bad[0]) + 1}")
            big = np.nonzero(sizes > MAX_COMPRESSED_BLOCK)[0]
            if len(big):
                raise CorruptImage(f"invalid compressed block size at index {int(big[0])}")
            if int(offs[-1]) > file_size or int(offs[0]) < 0:
                raise CorruptImage("cloop block offsets lie outside the file")
        self.offsets = offs
        self.block_size = block_size
        self.n_blocks = n_blocks
        self.virtual_size = n_blocks * block_size
        self._cache = (-1, b"")

    def info_extra(self) -> dict:
        return {"dirty-flag": None}

    def _block(self, i: int) -> bytes:
        if self._cache[0] == i:
            return self._cache[1]
        import zlib

        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        raw = self.store.pread_full(start, end - start)
        try:
            out, got, ended = inflate_into(zlib.decompressobj(), raw, self.block_size)
        except zlib.error as e:
            raise CorruptImage(f"cloop block {i} is damaged: {e}") from None
        if got != self.block_size:
            raise CorruptImage(f"cloop block {i} inflates to {got} bytes, not {self.block_size}")
        if not ended:  # as qemu-img: the stream ends at the block's size (a bomb stops there)
            raise CorruptImage(f"cloop block {i} does not inflate to exactly {self.block_size} bytes")
        self._cache = (i, out)
        return out

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        pos = 0
        bs = self.block_size
        while pos < len(view):
            i, within = divmod(offset + pos, bs)
            n = min(bs - within, len(view) - pos)
            view[pos:pos + n] = memoryview(self._block(i))[within:within + n]  # no copy of a 64 MiB block
            pos += n

