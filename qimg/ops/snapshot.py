"""snapshot: list, create, apply and delete internal snapshots through the driver's hooks."""

from __future__ import annotations


def _open(filename, fmt, writable, options, warn, policy):
    """The image's chain: like qemu-img, snapshot refuses an image whose backing file is missing."""
    from ..core.chain import open_for_command as open_chain

    return open_chain(filename, fmt, writable=writable, options=options, warn=warn if writable else None,
                      policy=policy)


def list_snapshots(filename: str, fmt: str | None = None, options: dict | None = None,
                   policy=None) -> list[dict]:
    """SnapshotInfo dicts (id, name, vm-state-size, date-sec/-nsec, vm-clock-sec/-nsec, icount)."""
    chain = _open(filename, fmt, False, options, None, policy)
    drv = chain.top
    try:
        return drv.snapshot_infos()
    finally:
        chain.close()


def snapshot(action: str, name: str, filename: str, fmt: str | None = None, options: dict | None = None,
             warn=None, policy=None) -> None:
    """Run -c/-a/-d ``name`` on the image."""
    chain = _open(filename, fmt, True, options, warn, policy)
    drv = chain.top
    try:
        if action == "create":
            drv.snapshot_create(name)
        elif action == "apply":
            drv.snapshot_apply(name)
        elif action == "delete":
            drv.snapshot_delete(name)
        drv.flush()
    finally:
        chain.close()
