"""rebase: change an image's backing file; in safe mode first copy what would change in the guest view."""

from __future__ import annotations

from ..core import registry
from ..core.chain import Chain
from ..errors import QimgError, UsageError

CHUNK = 2 << 20
SECTOR = 512


def rebase(filename: str, backing: str | None, backing_fmt: str | None = None, fmt: str | None = None,
           unsafe: bool = False, options: dict | None = None, progress=None, warn=None, policy=None) -> None:
    """qemu-img rebase.  ``backing`` '' (or None with unsafe) removes the backing file.

    Safe mode: every range the overlay does not hold itself is read through the old and the new
    backing chain and compared sector by sector; differing sectors are written into the overlay,
    which is flushed before the header names the new backing file (one atomic write)."""
    if backing is None and not unsafe:
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    new_name = backing or None
    if new_name and not backing_fmt:
        # qemu 7.2 refuses to record a backing file without its format
        drv = registry.open_image(filename, fmt, writable=True, options=options, warn=warn, policy=policy)
        drv.close()
        raise QimgError(f"Could not change the backing file to '{backing}': backing format must be specified")
    if unsafe:
        # -u: the image alone (qemu-img opens it without its backing file)
        drv = registry.open_image(filename, fmt, writable=True, options=options, warn=warn, policy=policy)
        try:
            _set_backing(drv, backing, new_name, backing_fmt)
        finally:
            drv.close()
        return
    from ..core.chain import open_for_command as open_chain

    chain = open_chain(filename, fmt, writable=True, options=options, warn=warn, policy=policy)
    try:
        top = chain.top
        new_chain = None
        if new_name:
            path = registry.resolve_backing(filename, new_name)
            try:
                new_chain = Chain.open(path, backing_fmt, policy=chain.guard.policy)
            except QimgError as e:
                inner = str(e).removeprefix(f"Could not open '{path}': ")  # qemu names the file once
                raise QimgError(f"Could not open new backing file '{path}': {inner}") from None
        try:
            if len(chain.layers) > 1:
                _copy_differences(chain, new_chain, top, progress)
            top.flush()
            _set_backing(top, backing, new_name, backing_fmt)
        finally:
            if new_chain is not None:
                new_chain.close()
    finally:
        chain.close()
    if progress is not None:
        progress.finish()


def _set_backing(drv, backing, new_name, backing_fmt):
    try:
        drv.set_backing(new_name, backing_fmt if new_name else None)
    except QimgError as e:
        if new_name:
            raise QimgError(f"Could not change the backing file to '{backing}': {e}") from None
        raise


def _copy_differences(chain, new_chain, top, progress) -> None:
    """Write into ``top`` every sector of the ranges it does not hold whose old view (through the old
    backing chain) differs from the new one.  Two workers read both views and find the differing
    sectors; this thread walks the overlay's allocation and writes, in guest order."""
    from ..engine.compare import ordered_map
    from ..io.store import BufferPool

    size = chain.virtual_size
    if progress is not None:
        progress.total = size
    workers = 2
    depth = workers * 2
    old_pool, new_pool = BufferPool(CHUNK, depth + 1), BufferPool(CHUNK, depth + 1)

    def ranges():
        """(offset, length) pieces that need reading: not held by the overlay, and not zero in both chains."""
        pos = 0
        while pos < size:
            ext = top.block_status(pos, min(size - pos, CHUNK * 16))
            n = max(1, min(ext.length, size - pos))
            if ext.present:
                if progress is not None:
                    progress.update(n)
                pos += n
                continue
            end = pos + n
            while pos < end:
                k = min(CHUNK - pos % CHUNK, end - pos)
                if _both_zero(chain, new_chain, pos, k):
                    if progress is not None:
                        progress.update(k)
                else:
                    yield pos, k
                pos += k

    def differing(item):
        pos, k = item
        ob = old_pool.get()
        ov = memoryview(ob)[:k]
        chain.readinto(pos, ov, 1)
        if new_chain is None:
            from ..engine.zeroscan import nonzero_runs

            return ob, nonzero_runs(ov, pos, SECTOR)  # the new view is all zeros
        nb = new_pool.get()
        nv = memoryview(nb)[:k]
        try:
            new_chain.readinto(pos, nv)
            if bytes(ov).startswith(nv):  # one memcmp: most chunks of a similar base are equal
                return ob, []
            from ..engine.compare import diff_runs

            return ob, diff_runs(ov, nv, SECTOR)
        finally:
            nv.release()
            new_pool.put(nb)

    try:
        for (pos, k), (ob, runs) in ordered_map(differing, ranges(), workers=workers, depth=depth):
            try:
                ov = memoryview(ob)
                for lo, hi in runs:
                    top.pwrite(pos + lo, ov[lo:hi])
                del ov
            finally:
                old_pool.put(ob)
            if progress is not None:
                progress.update(k)
    finally:
        old_pool.close()
        new_pool.close()


def _both_zero(chain, new_chain, pos, k) -> bool:
    """True when neither the old backing chain nor the new one holds data in [pos, pos+k)."""
    old = chain.block_status(pos, k)
    if old.present and old.depth == 0:
        return False
    # block_status from the top: the overlay does not hold this range, so depth >= 1 answered
    if old.length < k or old.data or not old.zero:
        return False
    if new_chain is None:
        return True
    if pos >= new_chain.virtual_size:
        return True
    new = new_chain.block_status(pos, k)
    return new.length >= k and new.zero and not new.data
