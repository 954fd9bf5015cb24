"""The direct copy strategy: worker threads take the next chunk, read, scan and write it themselves.

Used where the target allows it (``Driver.direct_writes``: a raw file, or a qcow2 convert writes with
qemu-img's cache mode unsafe): ``direct_map`` reserves the target's space under a lock and the data
goes straight to the host file, in whatever order the chunks finish.

The data is written from the buffer it was read and scanned in: on a filesystem without reflinks,
``os.copy_file_range`` is a page-by-page splice that costs more than that one write.  With ``-C``
(as qemu-img) no zero scan is made and data moves with copy_file_range between plain host files; a
refusal from the kernel turns that off and the data is read and written.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading

from ..core.extent import clip, split_at
from ..errors import WriteError


def run_direct(src, dst, start, end, opts, progress, chunk, workers, dst_offset, scan, locked):
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
            for off, nxt in split_at(ext.start, ext.end, chunk):
                yield off, nxt - off

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

    if workers == 1 and progress is None:
        # one copy worker and no progress to report: the calling thread copies (no thread of its own
        # per copy; a batch job's I/O is then counted on the job's thread)
        loop()
        if state["error"] is not None:
            raise state["error"]
        return
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
