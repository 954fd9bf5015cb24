"""The ordered copy strategy: worker threads read and scan chunks, the calling thread writes them
in guest order.

Targets that allocate metadata as they are written (qcow2 being edited in place, vdi, vmdk, ...)
and compressed targets see one writer, in order.  Compression runs in the workers too
(``prepare_compressed``); the writer only enters the results.  A zero extent drains the pipeline
first (the writes stay in guest order: a compressed target merges partial clusters) unless the
target already reads as zeros.
"""

from __future__ import annotations

import collections
import threading

from ..core.extent import clip, split_at
from ..errors import WriteError
from ..io.store import BufferPool


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


def run_ordered(src, dst, start: int, end: int, opts, progress, chunk: int, workers: int, dst_offset: int,
                scan: bool) -> None:
    """Copy guest bytes [start, end) of ``src`` to ``dst``, the writes made by this thread in guest order."""
    from .zeroscan import is_zero, nonzero_runs

    gran = opts.min_sparse
    prepare = dst.prepare_compressed if opts.compress else None

    def zero_range(off, n):
        if not opts.target_is_zero:
            dst.write_zeroes(off + dst_offset, n, opts.unmap_zeroes)

    # chunks in flight.  Compressing a chunk costs ~30 ms (zlib) against well under a millisecond to write it, and
    # chunks vary in size with the extents: with only two per worker, a worker finishing small chunks
    # waits while the writer waits for a large one (zlib convert: workers busy 93-96% -> 97-98%)
    depth = workers * (4 if opts.compress else 2) + 1
    pool = BufferPool(chunk, depth + 1)
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
            for off, nxt in split_at(ext.start, ext.end, chunk):
                n = nxt - off
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
