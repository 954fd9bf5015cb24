"""commit: copy an overlay's data into a base image of its chain, then empty the overlay."""

from __future__ import annotations

import os

from ..core import registry
from ..core.chain import Chain
from ..core.chain import open_for_command as open_chain
from ..engine.copy import ChainSource, CopyOptions, copy_range
from ..errors import QimgError, Unsupported
from ..io.lock import LockError


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def commit(filename: str, fmt: str | None = None, base: str | None = None, drop: bool = False,
           options: dict | None = None, progress=None, warn=None, policy=None) -> None:
    """qemu-img commit: data above ``base`` (default: the backing file) goes into ``base``.

    Order for crash safety: the base is written and flushed (fdatasync) before the overlay is
    emptied, so the overlay's guest view never changes."""
    # qemu-img opens it read-write
    chain = open_chain(filename, fmt, writable=True, options=options, warn=warn, policy=policy)
    try:
        top = chain.top
        if top.backing is None or len(chain.layers) < 2:
            raise QimgError("Image does not have a backing file")
        depth = 1
        if base is not None:
            def matches(i):
                above = chain.layers[i - 1].backing
                if above is not None and above.filename == base:
                    return True   # the name as recorded in the image above
                return (_same_file(chain.filenames[i], registry.resolve_backing(chain.filenames[i - 1], base))
                        or _same_file(chain.filenames[i], base))

            found = [i for i in range(1, len(chain.layers)) if matches(i)]
            if not found:
                raise QimgError(f"Did not find '{base}' in the backing chain of '{filename}'")
            depth = found[0]
            drop = True  # -b implies -d: the images in between are no longer valid
        base_name = chain.filenames[depth]
        base_fmt = chain.layers[depth].format_name
        size = chain.virtual_size
        try:
            # reopened read-write as a chain of its own: its backing layers hand it what copy-on-write needs
            base_chain = Chain.open(base_name, base_fmt, writable=True, policy=chain.guard.policy)
        except LockError as e:  # qemu reopens the base read-write: its lock error names no file first
            raise LockError(str(e).removeprefix(f"Could not open '{base_name}': "), e.exit_code) from None
        base_drv = base_chain.top
        try:
            if base_drv.virtual_size < size:
                base_drv.truncate(size, shrink=False, prealloc="off")
            if progress is not None:
                progress.total = size
            # like qemu-img's commit job: what the top stores as data goes to the base as data, with no
            # scan for zeros in it (zero extents of the top still become zero writes)
            opts = CopyOptions(min_sparse=4096, skip_unallocated=True, workers=2, unmap_zeroes=True,
                               offload=True)
            copy_range(ChainSource(chain, depth), base_drv, 0, size, opts, progress,
                       cluster_size=base_drv.cluster_size)
            base_drv.flush()
        finally:
            base_chain.close()
        top_fmt = top.format_name
    finally:
        chain.close()
    if not drop:
        top_chain = Chain.open(filename, top_fmt, writable=True, options=options, policy=policy)
        try:
            top_chain.top.make_empty()
            top_chain.top.flush()
        except Unsupported:
            pass  # qemu-img leaves an overlay it cannot empty as it is
        finally:
            top_chain.close()
    if progress is not None:
        progress.finish()
