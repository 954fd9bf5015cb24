"""check for VMDK: every allocated grain must lie inside its extent file (as qemu-img checks).

References: qemu-img 7.2's observed behaviour: the first grain pointing past the end of its
file is reported on stderr as "ERROR: cluster offset for sector N points after EOF" and the
check then fails as a whole ("Check failed: Invalid argument", status 1).
"""

from __future__ import annotations

import numpy as np

from ...core.check import CheckResult
from ...errors import QimgError
from .grains import COMPRESSED, DATA


def find_errors(drv) -> list[str]:
    """qemu-img's messages for grains beyond the end of their extent file (it stops at the first)."""
    for start, ext in zip(drv.starts, drv.extents):
        if ext.flat:
            continue
        size = ext.store.size()
        gb = ext.grain_bytes
        per_gt = ext.l2_entries * gb
        for gt_index, kinds, offs in ext.iter_allocated():
            bad = np.flatnonzero(((kinds == DATA) | (kinds == COMPRESSED)) & (offs >= size))
            if bad.size:
                grain_off = gt_index * per_gt + int(bad[0]) * gb
                if grain_off < ext.size:
                    return [f"ERROR: cluster offset for sector {(start + grain_off) // 512} points after EOF"]
    return []


def check_image(drv, repair=None, emit=None) -> CheckResult:
    """Check the grain tables of every sparse extent; a damaged image fails the check like qemu-img's."""
    messages = find_errors(drv)
    if messages:
        if emit is not None:
            for m in messages:
                emit(m)
        raise QimgError("Check failed: Invalid argument", diagnostics=() if emit is not None else messages)
    return CheckResult()
