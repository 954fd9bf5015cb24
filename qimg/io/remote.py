"""Remote stores: images read by byte range from a URL (``http(s)://`` or any fsspec scheme).

A remote store offers ``FileStore``'s read side.  Drivers read metadata in small pieces (headers,
L2 tables, grain tables) and data in chunks of the extents they report, so a remote store
- keeps small reads in a bounded cache of aligned blocks (a table read twice costs one request),
  fetching the missing blocks of one read as one merged range;
- fetches large reads directly into the caller's buffer, split into parts that run at once on a
  small thread pool, so one extent keeps several requests in flight;
- never reads past the object's end, and reports a short or failed range as one line.

Only what the drivers ask for is fetched: the metadata and the allocated data.  A URL carries no
hole information, so a raw image over a URL is read whole.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict

from ..errors import OpenError, QimgError
from .store import Store

#: reads up to this size go through the block cache (metadata: headers, tables, descriptors)
CACHE_MAX_READ = 256 << 10
#: the cache's block: reads are widened to whole blocks, so neighbouring small reads share a request
CACHE_BLOCK = 64 << 10
#: bytes the block cache may hold per store
CACHE_BYTES = 32 << 20
#: a large read is split into parts of this size, fetched at once
PART_BYTES = 1 << 20
#: requests in flight per store
PARALLEL = 4

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: schemes that are not remote byte stores here (file:// stays a host path; nbd has its own protocol)
_NOT_REMOTE = {"file", "nbd", "nbd+unix", "nbd+tcp", "json"}


def url_scheme(name: str) -> str | None:
    """The scheme of a URL that a remote store reads (``http``, ``s3``...), or None for anything else."""
    m = _URL.match(name)
    if m is None:
        return None
    scheme = m.group(1).lower()
    return None if scheme in _NOT_REMOTE else scheme


class RemoteStore(Store):
    """The read side of a store over ranged reads; subclasses implement ``_fetch_into``."""

    writable = False
    #: ``info`` shows "disk size: unavailable", as qemu-img does for its network drivers
    allocation_unknown = True

    def __init__(self, name: str):
        self.filename = name
        self.display_name = name
        self.dev_ino = None
        self._size = 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._pool = None
        self._pool_lock = threading.Lock()
        self.requests = 0  # ranged reads made (for tests and benchmarks)

    # ----- what a subclass provides -----
    def _fetch_into(self, offset: int, view) -> None:
        """Fill ``view`` with the bytes at ``offset`` (the range lies inside the object) or raise QimgError."""
        raise NotImplementedError

    # ----- the store interface -----
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self._size:
            return b""
        if offset < 0:
            raise QimgError(f"Could not read '{self.filename}': negative offset {offset}")
        length = min(length, self._size - offset)
        if length <= CACHE_MAX_READ:
            return self._cached(offset, length)
        buf = bytearray(length)
        self._read_parts(offset, memoryview(buf))
        return bytes(buf)

    def pread_full(self, offset: int, length: int) -> bytes:
        data = self.pread(offset, length)
        return data + bytes(length - len(data)) if len(data) < length else data

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        if offset >= self._size or not len(view):
            return 0
        n = min(len(view), self._size - offset)
        if n <= CACHE_MAX_READ:
            view[:n] = self._cached(offset, n)
        else:
            self._read_parts(offset, view[:n])
        return n

    def pwrite(self, offset: int, data) -> None:
        raise QimgError(f"Could not write '{self.filename}': a URL is read-only")

    def truncate(self, size: int) -> None:
        raise QimgError(f"Could not resize '{self.filename}': a URL is read-only")

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        with self._cache_lock:
            self._cache.clear()

    # ----- the block cache (metadata) -----
    def _cached(self, offset: int, length: int) -> bytes:
        first = offset // CACHE_BLOCK
        last = (offset + length - 1) // CACHE_BLOCK
        with self._cache_lock:
            blocks = {i: self._cache.get(i) for i in range(first, last + 1)}
            for i, b in blocks.items():
                if b is not None:
                    self._cache.move_to_end(i)
        # the missing blocks, fetched as maximal runs of neighbours (one request per run)
        i = first
        while i <= last:
            if blocks[i] is not None:
                i += 1
                continue
            j = i
            while j + 1 <= last and blocks[j + 1] is None:
                j += 1
            start = i * CACHE_BLOCK
            end = min((j + 1) * CACHE_BLOCK, self._size)
            buf = bytearray(end - start)
            self._fetch_into(start, memoryview(buf))
            for k in range(i, j + 1):
                blocks[k] = bytes(buf[(k - i) * CACHE_BLOCK:(k - i + 1) * CACHE_BLOCK])
            self._remember(i, j, blocks)
            i = j + 1
        data = b"".join(blocks[k] for k in range(first, last + 1))
        skip = offset - first * CACHE_BLOCK
        return data[skip:skip + length]

    def _remember(self, i: int, j: int, blocks: dict) -> None:
        with self._cache_lock:
            for k in range(i, j + 1):
                self._cache[k] = blocks[k]
            while len(self._cache) * CACHE_BLOCK > CACHE_BYTES:
                self._cache.popitem(last=False)

    # ----- large reads: parts in flight at once -----
    def _read_parts(self, offset: int, view) -> None:
        total = len(view)
        if total <= PART_BYTES:
            self._fetch_into(offset, view)
            return
        parts = [(pos, min(PART_BYTES, total - pos)) for pos in range(0, total, PART_BYTES)]
        pool = self._executor()
        futures = [pool.submit(self._fetch_into, offset + pos, view[pos:pos + n]) for pos, n in parts[1:]]
        try:
            self._fetch_into(offset, view[:parts[0][1]])
        finally:
            errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e

    def _executor(self):
        with self._pool_lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=PARALLEL - 1, thread_name_prefix="qimg-remote")
            return self._pool


def remote_timeout() -> float:
    """Seconds a connection or a read may stall (``QIMG_REMOTE_TIMEOUT``, default 30)."""
    try:
        value = float(os.environ.get("QIMG_REMOTE_TIMEOUT", "30"))
    except ValueError:
        raise OpenError("QIMG_REMOTE_TIMEOUT must be a number of seconds") from None
    return value if value > 0 else 30.0
