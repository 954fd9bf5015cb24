"""check: consistency check (and repair) through the driver's ``check`` hook."""

from __future__ import annotations

from ..errors import UsageError

REPAIR_MODES = ("leaks", "all")


def validate_repair(repair: str | None) -> None:
    """``-r``: "leaks" or "all" (or None: check only)."""
    if repair is not None and repair not in REPAIR_MODES:
        raise UsageError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}")


def check_image(filename: str, fmt: str | None = None, repair: str | None = None, options: dict | None = None,
                warn=None, policy=None):
    """(result, format name): result has corruptions/leaks/... and exit_code, like qemu's BdrvCheckResult.

    The image is opened once, with its backing chain (qemu-img check fails when a backing file is
    missing), writable only for a repair."""
    from ..core.chain import open_for_command as open_chain

    # "check": qemu opens for a check what it refuses otherwise (a qcow2 without a refcount table)
    chain = open_chain(filename, fmt, writable=bool(repair), options={**(options or {}), "check": True}, warn=warn,
                       policy=policy)
    try:
        drv = chain.top
        return drv.check(repair), drv.format_name
    finally:
        chain.close()


def result_dict(res, filename: str, fmt: str) -> dict:
    """qemu's ImageCheck: optional members only when non-zero (their order comes from qjson)."""
    out = {"filename": filename, "format": fmt, "check-errors": res.check_errors}
    for key in ("image-end-offset", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed", "total-clusters",
                "allocated-clusters", "fragmented-clusters", "compressed-clusters"):
        v = res[key]
        if v:
            out[key] = v
    return out


def human(res) -> str:
    """qemu-img check's human summary."""
    out = []
    if res.corruptions_fixed or res.leaks_fixed:
        out.append("The following inconsistencies were found and repaired:\n\n"
                   f"    {res.leaks_fixed} leaked clusters\n"
                   f"    {res.corruptions_fixed} corruptions\n\n"
                   "Double checking the fixed image now...\n")
    if not res.corruptions and not res.leaks and not res.check_errors:
        out.append("No errors were found on the image.\n")
    else:
        if res.corruptions:
            out.append(f"\n{res.corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if res.leaks:
            out.append(f"\n{res.leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if res.check_errors:
            out.append(f"\n{res.check_errors} internal errors have occurred during the check.\n")
    if res.total_clusters and res.allocated_clusters:
        a = res.allocated_clusters
        out.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n" % (
            a, res.total_clusters, a * 100.0 / res.total_clusters, res.fragmented_clusters * 100.0 / a,
            res.compressed_clusters * 100.0 / a))
    if res.image_end_offset:
        out.append(f"Image end offset: {res.image_end_offset}\n")
    return "".join(out)
