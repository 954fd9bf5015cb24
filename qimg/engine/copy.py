"""The copy engine: extents in, writes out (what to copy, and which of two strategies copies it).

Zero extents cost no I/O.  Data extents are cut into aligned chunks that worker threads
read into page-aligned buffers and scan for zeros at qemu-img's ``-S`` granularity (os.preadv
and the scans release the GIL or are short).  convert, commit, rebase and dd all go through
``copy_range``.

Two strategies live beside this module: ``direct.py`` where the target allows it
(``Driver.direct_writes``: a raw file, or a qcow2 convert writes with cache mode unsafe), the workers
also write the data runs, in whatever order they finish; ``ordered.py`` for every other target (and
``-c``), the calling thread writes in guest order, so drivers that allocate metadata see one writer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    offload: bool = False           # -C: data copied as it is (no zero scan), copy_file_range between plain files
    in_order: bool = False          # every write in guest order from one thread (a pipe, a stream source)


class Source:
    """What the engine reads: ``extents(start, end)`` and ``readinto(offset, buf)``."""

    virtual_size = 0
    #: read front to back only (a pipe): one worker, reads in the order the extents come
    sequential = False

    def extents(self, start: int, end: int):
        raise NotImplementedError

    def readinto(self, offset: int, buf) -> None:
        raise NotImplementedError

    def plain_file(self, start: int, end: int):
        """(fd, host offset of ``start``) when [start, end) is stored plainly in one host file."""
        return


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

    def plain_file(self, start, end):
        layers = self.chain.layers
        if not layers or len(layers) != 1:
            return None
        return layers[0].plain_host_file(start, end)


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
                # a shifted copy: the source's own iterator goes on from the extent it handed out
                yield replace(ext, start=ext.start + base)

    def readinto(self, offset, buf):
        view = memoryview(buf)
        for base, src, s, e in self._parts(offset, offset + len(view)):
            src.readinto(s - base, view[s - offset:e - offset])

    def plain_file(self, start, end):
        parts = list(self._parts(start, end))
        if len(parts) != 1:
            return None
        base, src, s, e = parts[0]
        return src.plain_file(s - base, e - base)


def copy_range(src: Source, dst, start: int, end: int, opts: CopyOptions, progress=None,
               dst_offset: int = 0, cluster_size: int | None = None) -> None:
    """Copy guest bytes [start, end) of ``src`` to ``dst`` at ``start + dst_offset``."""
    gran = opts.min_sparse
    chunk = opts.chunk
    if opts.compress:
        # compressed writes are per cluster: chunks must be whole clusters
        cluster_size = cluster_size or 65536
        chunk = max(cluster_size, chunk // cluster_size * cluster_size)
    workers = 1 if src.sequential else max(1, opts.workers)
    # -C: data is copied as it is (no zero scan), in the kernel where both ends are plain files
    scan = gran != 0 and not opts.offload

    mode = "" if opts.compress or opts.in_order else dst.direct_writes
    if mode:
        from .direct import run_direct

        run_direct(src, dst, start, end, opts, progress, chunk, workers, dst_offset, scan, locked=mode == "locked")
    else:
        from .ordered import run_ordered

        run_ordered(src, dst, start, end, opts, progress, chunk, workers, dst_offset, scan)
