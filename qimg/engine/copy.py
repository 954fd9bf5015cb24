"""The copy engine: extents in, writes out.

Zero extents cost no I/O.  Data extents are cut into aligned chunks that worker threads
read into page-aligned buffers and scan for zeros at qemu-img's ``-S`` granularity (os.preadv
and the scans release the GIL or are short).  convert, commit, rebase and dd all go through
``copy_range``.

Where the target allows it (``Driver.direct_writes``: a raw file, or an image convert has just
created), the workers also write the data runs themselves, in whatever order they finish:
``direct_map`` reserves the target's space under a lock and the data goes straight to the host
file.  Other targets get their writes in guest order from the calling thread, so drivers that
allocate metadata see one writer.

The data is written from the buffer it was read and scanned in: on a filesystem without
reflinks, ``os.copy_file_range`` is a page-by-page splice that costs more than that one write.
With ``-C`` (as qemu-img) no zero scan is made and data moves with copy_file_range between
plain host files; a refusal from the kernel turns that off and the data is read and written.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import mmap
import os
import threading
from dataclasses import dataclass, replace

from ..core.extent import Extent, clip, split_at
from ..errors import WriteError

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
            try:
                b.close()
            except BufferError:  # a view is still alive somewhere: the collector frees it later
                pass
        self.free = []


class _Workers:
    """A minimal ordered pipeline: jobs run on threads, results come back in submission order.

    (concurrent.futures would do, but pulls in logging and friends: ~4 ms of start-up.)
    """

    def __init__(self, count: int):
        import queue

        self.jobs = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._loop, daemon=True, name=f"qimg-copy-{i}")
                        for i in range(count)]
        for t in self.threads:
            t.start()

    def _loop(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            slot, fn, args = job
            if slot[2]:  # cancelled
                slot[3].set()
                continue
            try:
                slot[0] = fn(*args)
            except BaseException as e:  # handed to the writer thread
                slot[1] = e
            slot[3].set()

    def submit(self, fn, *args):
        slot = [None, None, False, threading.Event()]
        self.jobs.put((slot, fn, args))
        return slot

    @staticmethod
    def result(slot):
        slot[3].wait()
        if slot[1] is not None:
            raise slot[1]
        return slot[0]

    def shutdown(self, pending):
        for slot in pending:
            slot[2] = True
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()


def _chunks(ext: Extent, chunk: int):
    """Cut a data extent at absolute multiples of ``chunk``: (offset, length) pairs."""
    for pos, nxt in split_at(ext.start, ext.end, chunk):
        yield pos, nxt - pos


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
    workers = 1 if src.sequential else max(1, opts.workers)
    prepare = dst.prepare_compressed if opts.compress else None
    # -C: data is copied as it is (no zero scan), in the kernel where both ends are plain files
    scan = gran != 0 and not opts.offload

    def zero_range(off, n):
        if not opts.target_is_zero:
            dst.write_zeroes(off + dst_offset, n, opts.unmap_zeroes)

    mode = "" if opts.compress or opts.in_order else dst.direct_writes
    if mode:
        _run_direct(src, dst, start, end, opts, progress, chunk, workers, dst_offset, scan,
                    locked=mode == "locked")
        return

    depth = workers * 2 + 1
    pool = _BufferPool(chunk, depth + 1)
    runner = _Workers(workers) if workers > 1 else None
    pending: collections.deque = collections.deque()

    def work(off, n, buf):
        view = memoryview(buf)[:n]
        src.readinto(off, view)
        if opts.compress:
            if is_zero(view):
                return off, n, buf, [], None
            prep = prepare(off + dst_offset, view) if prepare is not None else None
            return off, n, buf, [(0, n)], prep
        runs = nonzero_runs(view, off, gran) if scan else [(0, n)]
        return off, n, buf, runs, None

    def drain(limit):
        while len(pending) > limit:
            item = pending.popleft()
            off, n, buf, runs, prep = runner.result(item) if runner is not None else item
            try:
                write_runs(off, n, buf, runs, prep)
            except WriteError as e:
                e.guest_offset = off if e.guest_offset is None else e.guest_offset
                raise
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
            if not opts.compress:
                dst.pwrite(off + s + dst_offset, view[s:e])
            elif prep is not None:
                dst.write_prepared(off + dst_offset, prep)
            else:
                dst.write_compressed(off + dst_offset, view[s:e])
            pos = e
        if pos < n:
            zero_range(off + pos, n - pos)

    try:
        for ext in src.extents(start, end):
            ext = clip(ext, start, end)
            if ext is None:
                continue
            if opts.skip_unallocated and not ext.present:
                if progress is not None:
                    progress.update(ext.length)
                continue
            if ext.zero and gran != 0:
                if not opts.target_is_zero:
                    # writes stay in guest order (a compressed target merges partial clusters)
                    drain(0)
                    zero_range(ext.start, ext.length)
                if progress is not None:
                    progress.update(ext.length)
                continue
            for off, n in _chunks(ext, chunk):
                drain(depth - 1)
                buf = pool.get()
                if runner is not None:
                    pending.append(runner.submit(work, off, n, buf))
                else:
                    pending.append(work(off, n, buf))
        drain(0)
    finally:
        if runner is not None:
            runner.shutdown(pending)
        pool.close()


def _run_direct(src, dst, start, end, opts, progress, chunk, workers, dst_offset, scan, locked):
    """Workers that take the next chunk themselves, read, scan and write it, in any order: no
    thread hand-off per chunk, so a busy machine (where every wake-up waits for a time slice)
    costs little.  ``dst.direct_map`` says where each data run goes; with ``locked`` that and every
    other call on ``dst`` is made under one lock, and only the data writes run concurrently.

    The extent walk is shared under a lock too; the calling thread only reports progress.
    """
    from .zeroscan import nonzero_runs

    lock = threading.Lock()
    guard = threading.Lock() if locked else contextlib.nullcontext()
    state = {"error": None, "stop": False, "done": 0, "offload": opts.offload}
    gran = opts.min_sparse

    def zero_range(off, n):
        if not opts.target_is_zero:
            with guard:
                dst.write_zeroes(off + dst_offset, n, opts.unmap_zeroes)

    def jobs():
        for ext in src.extents(start, end):
            ext = clip(ext, start, end)
            if ext is None:
                continue
            if opts.skip_unallocated and not ext.present:
                state["done"] += ext.length
                continue
            if ext.zero and gran != 0:
                zero_range(ext.start, ext.length)
                state["done"] += ext.length
                continue
            yield from _chunks(ext, chunk)

    def put(guest, data):
        """Write one data run where the target maps it."""
        with guard:
            pieces = dst.direct_map(guest + dst_offset, len(data))
            if pieces is None:
                dst.pwrite(guest + dst_offset, data)
                return
        pos = 0
        for store, host, k in pieces:
            store.pwrite(host, data[pos:pos + k])
            pos += k

    def offload(off, n, view):
        """-C: copy_file_range the chunk from a plain source file to where the target maps it
        (what the kernel refuses is read and written); None when either end is not a plain file."""
        plain = src.plain_file(off, off + n)
        if plain is None:
            return None
        with guard:
            pieces = dst.direct_map(off + dst_offset, n)
        if pieces is None:
            return None
        src_fd, src_host = plain
        pos = 0
        for store, host, k in pieces:
            fd = getattr(store, "fd", None) if state["offload"] else None
            done = _copy_file_range(src_fd, src_host + pos, fd, host, k) if fd is not None else 0
            if done is None:
                state["offload"] = False  # the kernel or filesystem refuses: plain writes from now on
                done = 0
            if done < k:
                # the rest of this piece (the source file's end, or a refused copy): read and write
                part = view[pos + done:pos + k]
                src.readinto(off + pos + done, part)
                store.pwrite(host + done, part)
            pos += k
        return True

    def work(off, n, buf):
        view = memoryview(buf)[:n]
        if state["offload"] and offload(off, n, view) is not None:
            return
        src.readinto(off, view)
        runs = nonzero_runs(view, off, gran) if scan else [(0, n)]
        pos = 0
        for s, e in runs:
            if s > pos:
                zero_range(off + pos, s - pos)
            put(off + s, view[s:e])
            pos = e
        if pos < n:
            zero_range(off + pos, n - pos)

    it = jobs()

    def loop():
        buf = mmap.mmap(-1, chunk)
        try:
            while True:
                with lock:
                    if state["stop"]:
                        return
                    try:
                        off, n = next(it)
                    except StopIteration:
                        return
                    except BaseException as e:  # the extent walk failed: stop everyone
                        state["error"] = state["error"] or e
                        state["stop"] = True
                        return
                try:
                    work(off, n, buf)
                except WriteError as e:
                    e.guest_offset = off if e.guest_offset is None else e.guest_offset
                    with lock:
                        state["error"] = state["error"] or e
                        state["stop"] = True
                    return
                except BaseException as e:
                    with lock:
                        state["error"] = state["error"] or e
                        state["stop"] = True
                    return
                with lock:
                    state["done"] += n
        finally:
            try:
                buf.close()
            except BufferError:
                pass

    threads = [threading.Thread(target=loop, daemon=True, name=f"qimg-copy-{i}") for i in range(workers)]
    for t in threads:
        t.start()
    reported = 0
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.05 if progress is not None else None)
                if progress is not None:
                    done = state["done"]
                    if done > reported:
                        progress.update(done - reported)
                        reported = done
    except BaseException:
        with lock:
            state["stop"] = True
        for t in threads:
            t.join()
        raise
    if state["error"] is not None:
        raise state["error"]
    if progress is not None and state["done"] > reported:
        progress.update(state["done"] - reported)


def _copy_file_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> int | None:
    """Bytes copied in the kernel (fewer at the source's end); None when copy_file_range is refused."""
    done = 0
    try:
        while done < n:
            k = os.copy_file_range(src_fd, dst_fd, n - done, src_off + done, dst_off + done)
            if k <= 0:
                break  # end of the source file
            done += k
    except OSError as e:
        if e.errno not in _OFFLOAD_ERRNOS:
            raise
        return None if done == 0 else done
    return done


_OFFLOAD_ERRNOS = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY,
                   errno.EPERM, errno.EOVERFLOW)
