"""info: ImageInfo dicts with qemu-img 7.2's keys (rendered by cli.render)."""

from __future__ import annotations

import os

from ..core import imageopts, registry
from ..options import DISPLAY_NAME, NO_IO


def layer_info(driver, filename: str, fmt_name: str | None = None) -> dict:
    """The ImageInfo of one opened layer, keys as qemu's QAPI names them."""
    info: dict = {
        "virtual-size": driver.virtual_size,
        "filename": driver.display_filename or filename,
        "format": fmt_name or driver.format_name,
    }
    cs = driver.cluster_size
    if cs:
        info["cluster-size"] = cs
    try:
        actual = driver.allocated_file_size()
    except Exception:
        actual = None
    if getattr(driver.store, "allocation_unknown", False):
        actual = None  # e.g. an image on an NBD export: qemu shows "disk size: unavailable"
    if actual is not None:
        info["actual-size"] = actual
    extra = driver.info_extra()
    if extra.get("encrypted"):
        info["encrypted"] = True
    if driver.backing is not None and driver.backing.filename:
        name = driver.backing.filename
        info["backing-filename"] = name
        info["full-backing-filename"] = registry.resolve_backing(filename, name)
        if driver.backing.fmt:
            info["backing-filename-format"] = driver.backing.fmt
    snaps = extra.get("snapshots")
    if snaps:
        info["snapshots"] = snaps
    spec = driver.info_specific()
    if spec is not None:
        info["format-specific"] = spec
    if extra.get("dirty-flag", False) is not None:  # None: qemu prints no dirty-flag (e.g. nbd exports)
        info["dirty-flag"] = bool(extra.get("dirty-flag", False))
    for key in ("cluster-size",):
        pass
    return info


def image_info(filename: str, fmt: str | None = None, backing_chain: bool = False, options: dict | None = None,
               policy=None) -> list[dict]:
    """ImageInfo for an image, and for each backing file with ``backing_chain``.

    Each layer opens metadata-only (qemu's BDRV_O_NO_IO); backing files are admitted by ``policy``
    (qimg.core.policy) as a chain's are."""
    from ..core.policy import Guard

    guard = Guard(policy, filename)
    infos = []
    name, cur_fmt = filename, fmt
    seen = set()
    depth = 0
    while True:
        # metadata only (qemu's BDRV_O_NO_IO): encrypted images open without their keys
        layer_opts = dict(options or {}) if depth == 0 else {}
        layer_opts[NO_IO] = True
        if depth == 0:
            name, cur_fmt, layer_opts = imageopts.expand(name, cur_fmt, layer_opts)
        drv = registry.open_image(name, cur_fmt, False, layer_opts, guard=guard)
        try:
            if depth == 0:
                # info opens without backing files: backing options are left over, and refused
                imageopts.refuse_backing_keys(drv.format_name, layer_opts, layer_opts.get(DISPLAY_NAME) or name)
            infos.append(layer_info(drv, layer_opts.get(imageopts.SHOWN) or name))
            backing = drv.backing
        finally:
            drv.close()
        if not backing_chain or backing is None or not backing.filename:
            break
        try:
            st = os.stat(name)
            seen.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        depth += 1
        nxt, nxt_fmt = registry.admit_backing(guard, name, backing.filename, backing.fmt, depth, filename)
        try:
            st = os.stat(nxt)
            if (st.st_dev, st.st_ino) in seen:
                from ..errors import BackingChainError

                raise BackingChainError(f"Backing file '{nxt}' of '{name}' loops back into the chain")
        except OSError:
            pass
        name, cur_fmt = nxt, nxt_fmt
    return infos
