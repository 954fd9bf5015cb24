"""The copy engine: extents in, ordered writes out.

Zero extents cost no I/O.  Data extents are cut into aligned chunks that worker threads
read into page-aligned buffers and scan for zeros (numpy and os.preadv release the GIL);
the calling thread writes the non-zero runs in guest order, so drivers that allocate
metadata see one writer.  convert, commit, rebase and dd all go through ``copy_range``.
"""

from __future__ import annotations

import collections
import mmap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..core.extent import Extent, clip

CHUNK = 2 << 20


@dataclass
class CopyOptions:
    """How to copy: qemu-img convert's -S, --target-is-zero, -m, -W, -c, -B."""

    min_sparse: int = 4096          # -S; 0 writes everything, zeros included
    target_is_zero: bool = False    # the destination already reads as zeros
    workers: int = 2                # threads reading and scanning
    compress: bool = False          # -c: clusters go through write_compressed
    skip_unallocated: bool = False  # -B / commit: ranges not present in the top are left alone
    chunk: int = CHUNK
    unmap_zeroes: bool = True       # zero ranges may be deallocated on the target


class Source:
    """What the engine reads: ``extents(start, end)`` and ``readinto(offset, buf)``."""

    virtual_size = 0

    def extents(self, start: int, end: int):
        raise NotImplementedError

    def readinto(self, offset: int, buf) -> None:
        raise NotImplementedError


class ChainSource(Source):
    """One backing chain; ``base_depth`` hides the layers from that depth down."""

    def __init__(self, chain, base_depth: int | None = None):
        self.chain = chain
        self.base_depth = base_depth
        self.virtual_size = chain.virtual_size

    def extents(self, start, end):
        return self.chain.extents(start, end, self.base_depth)

    def readinto(self, offset, buf):
        self.chain.readinto(offset, buf)


class ConcatSource(Source):
    """Several sources back to back (qemu-img convert with more than one input)."""

    def __init__(self, sources: list[Source]):
        self.sources = sources
        self.starts = []
        pos = 0
        for s in sources:
            self.starts.append(pos)
            pos += s.virtual_size
        self.virtual_size = pos

    def _parts(self, start, end):
        for base, src in zip(self.starts, self.sources):
            s, e = max(start, base), min(end, base + src.virtual_size)
            if s < e:
                yield base, src, s, e

    def extents(self, start, end):
        for base, src, s, e in self._parts(start, end):
            for ext in src.extents(s - base, e - base):
                ext.start += base
                yield ext

    def readinto(self, offset, buf):
        view = memoryview(buf)
        for base, src, s, e in self._parts(offset, offset + len(view)):
            src.readinto(s - base, view[s - offset:e - offset])


class _BufferPool:
    """Reusable page-aligned buffers (see PERFORMANCE: unaligned copies are 5x slower)."""

    def __init__(self, size: int, count: int):
        self.size = size
        self.free = [mmap.mmap(-1, size) for _ in range(count)]

    def get(self):
        return self.free.pop()

    def put(self, buf):
        self.free.append(buf)

    def close(self):
        for b in self.free:
            b.close()
        self.free = []


def _chunks(ext: Extent, chunk: int):
    """Cut a data extent at absolute multiples of ``chunk``."""
    pos = ext.start
    while pos < ext.end:
        nxt = min((pos // chunk + 1) * chunk, ext.end)
        yield pos, nxt - pos
        pos = nxt


def copy_range(src: Source, dst, start: int, end: int, opts: CopyOptions, progress=None,
               dst_offset: int = 0, cluster_size: int | None = None) -> None:
    """Copy guest bytes [start, end) of ``src`` to ``dst`` at ``start + dst_offset``."""
    from .zeroscan import is_zero, nonzero_runs

    gran = opts.min_sparse
    chunk = opts.chunk
    if opts.compress:
        # compressed writes are per cluster: chunks must be whole clusters
        cluster_size = cluster_size or 65536
        chunk = max(cluster_size, chunk // cluster_size * cluster_size)
    workers = max(1, opts.workers)
    depth = workers * 2 + 1
    pool = _BufferPool(chunk, depth + 1)
    executor = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    pending: collections.deque = collections.deque()

    def work(off, n, buf):
        view = memoryview(buf)[:n]
        src.readinto(off, view)
        if opts.compress:
            if is_zero(view):
                return off, n, buf, [], None
            prep = dst.prepare_compressed(off + dst_offset, view) if hasattr(dst, "prepare_compressed") else None
            return off, n, buf, [(0, n)], prep
        if gran == 0:
            return off, n, buf, [(0, n)], None
        return off, n, buf, nonzero_runs(view, off, gran), None

    def drain(limit):
        while len(pending) > limit:
            fut = pending.popleft()
            off, n, buf, runs, prep = fut.result() if executor else fut
            try:
                write_runs(off, n, buf, runs, prep)
            finally:
                pool.put(buf)
            if progress is not None:
                progress.update(n)

    def write_runs(off, n, buf, runs, prep):
        view = memoryview(buf)
        pos = 0
        for s, e in runs:
            if s > pos:
                zero_range(off + pos, s - pos)
            if opts.compress:
                if prep is not None:
                    dst.write_prepared(off + dst_offset, prep)
                else:
                    dst.write_compressed(off + dst_offset, view[s:e])
            else:
                dst.pwrite(off + s + dst_offset, view[s:e])
            pos = e
        if pos < n:
            zero_range(off + pos, n - pos)

    def zero_range(off, n):
        if not opts.target_is_zero:
            dst.write_zeroes(off + dst_offset, n, opts.unmap_zeroes)

    try:
        for ext in src.extents(start, end):
            ext = clip(ext, start, end)
            if ext is None:
                continue
            if opts.skip_unallocated and not ext.present:
                if progress is not None:
                    drain(0)
                    progress.update(ext.length)
                continue
            if ext.zero and gran != 0:
                drain(0)
                zero_range(ext.start, ext.length)
                if progress is not None:
                    progress.update(ext.length)
                continue
            for off, n in _chunks(ext, chunk):
                drain(depth - 1)
                buf = pool.get()
                if executor is not None:
                    pending.append(executor.submit(work, off, n, buf))
                else:
                    pending.append(work(off, n, buf))
        drain(0)
    finally:
        if executor is not None:
            for fut in pending:
                fut.cancel()
            executor.shutdown(wait=True)
        pool.close()
