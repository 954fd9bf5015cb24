"""VHDX consistency: allocated blocks must lie inside the file and off the metadata regions.

References: [MS-VHDX] 2.4 (BAT entry states and file offsets); qemu-img 7.2's observed behaviour:
the same block errors refuse an open and are what ``check`` reports (as corruptions, one line each
with the program name in front); a log replayed by a writable open counts as a repaired corruption.
"""

from __future__ import annotations

import struct

from ...core.check import CheckResult
from .layout import (
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
    SMALL_BAT_ENTRIES,
    VHDX_BAT_FILE_OFF_MASK,
    VHDX_BAT_STATE_BIT_MASK,
    MiB,
)


def present_blocks(drv):
    """(payload block index, BAT index, host offset) of every allocated block."""
    if drv.bat_entries > SMALL_BAT_ENTRIES:
        import numpy as np

        drv._load_bat()
        present = np.flatnonzero(drv._block_off >= 0)
        return zip(present.tolist(), drv._pidx[present].tolist(), drv._block_off[present].tolist())
    from array import array

    bat = array("Q")
    bat.frombytes(drv.store.pread_full(drv.bat_offset, drv.bat_entries * 8))
    if struct.pack("=Q", 1) != struct.pack("<Q", 1):
        bat.byteswap()
    out = []
    ratio = drv.chunk_ratio
    for i in range(drv.data_blocks):
        b = i + i // ratio
        e = bat[b]
        if e & VHDX_BAT_STATE_BIT_MASK in (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT):
            out.append((i, b, e & VHDX_BAT_FILE_OFF_MASK))
    return out

def validate_bat(drv) -> list:
    """Messages for allocated blocks beyond the end of the file or over a metadata region (as qemu at open)."""
    bs = drv.block_size
    size = drv.file_size
    regions = [(drv.meta_offset, drv.meta_length), (drv.bat_offset, drv.bat_length)]
    if drv.header["log_length"]:
        regions.append((drv.header["log_offset"], drv.header["log_length"]))
    regions.append((0, MiB))
    errors = []
    for i, b, st in present_blocks(drv):
        en = st + min(bs, drv.virtual_size - i * bs) - 1
        if st >= size:
            errors.append("VHDX BAT entry %d start offset %d points after end of file (%d). "
                          "Image has probably been truncated." % (b, st, size))
        elif en >= size:
            errors.append("VHDX BAT entry %d end offset %d points after end of file (%d). "
                          "Image has probably been truncated." % (b, en, size))
        else:
            for o, n in regions:
                if st < o + n and st + bs > o:
                    errors.append("VHDX region %d-%d overlaps with region %d-%d" % (st, st + bs, o, o + n))
                    break
        if len(errors) >= 100:
            break
    return errors


def check_image(drv, repair: str | None = None):
    """qemu's vhdx check: allocated blocks inside the file and off the metadata regions;
    a log replayed by this (writable) open counts as a repaired corruption."""

    drv._load_bat()
    errors = list(drv.bat_errors)
        # qemu reports these through error_report, with the program name in front
    return CheckResult(corruptions=len(errors), corruptions_fixed=1 if drv.replayed else 0,
                       messages=["qimg: " + m for m in errors])
