"""snapshot: list, create, apply and delete internal snapshots through the driver's hooks."""

from __future__ import annotations

from ..core import registry


def _open(filename, fmt, writable, options, warn):
    return registry.open_image(filename, fmt, writable=writable, options=options, warn=warn if writable else None)


def list_snapshots(filename: str, fmt: str | None = None, options: dict | None = None) -> list[dict]:
    """SnapshotInfo dicts (id, name, vm-state-size, date-sec/-nsec, vm-clock-sec/-nsec, icount)."""
    drv = _open(filename, fmt, False, options, None)
    try:
        return drv.snapshot_infos()
    finally:
        drv.close()


def snapshot(action: str, name: str, filename: str, fmt: str | None = None, options: dict | None = None,
             warn=None) -> None:
    """Run -c/-a/-d ``name`` on the image."""
    drv = _open(filename, fmt, True, options, warn)
    try:
        if action == "create":
            drv.snapshot_create(name)
        elif action == "apply":
            drv.snapshot_apply(name)
        elif action == "delete":
            drv.snapshot_delete(name)
        drv.flush()
    finally:
        drv.close()
