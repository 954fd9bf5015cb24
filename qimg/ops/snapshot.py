"""snapshot: list, create, apply and delete internal snapshots through the driver's hooks."""

from __future__ import annotations

from ..core import registry
from ..errors import QimgError


def _open(filename, fmt, writable, options, warn):
    return registry.open_image(filename, fmt, writable=writable, options=options, warn=warn if writable else None)


def list_snapshots(filename: str, fmt: str | None = None, options: dict | None = None) -> list[dict]:
    """SnapshotInfo dicts (id, name, vm-state-size, date-sec/-nsec, vm-clock-sec/-nsec, icount)."""
    drv = _open(filename, fmt, False, options, None)
    try:
        hook = getattr(drv, "snapshot_infos", None)
        if hook is not None:
            return hook()
        out = []
        for s in drv.snapshots():
            out.append(s if isinstance(s, dict) else getattr(s, "info", dict)())
        return out
    finally:
        drv.close()


def snapshot(action: str, name: str, filename: str, fmt: str | None = None, options: dict | None = None,
             warn=None) -> None:
    """Run -c/-a/-d ``name`` on the image."""
    drv = _open(filename, fmt, True, options, warn)
    try:
        if action == "create":
            hook = getattr(drv, "snapshot_create", None)
            if hook is None:
                raise QimgError(f"Could not create snapshot '{name}': -95 (Operation not supported)")
            hook(name)
        elif action == "apply":
            hook = getattr(drv, "snapshot_apply", None)
            if hook is None:
                raise QimgError(f"Could not apply snapshot '{name}': Block driver does not support snapshots")
            hook(name)
        elif action == "delete":
            hook = getattr(drv, "snapshot_delete", None)
            if hook is None:
                raise QimgError(f"Could not delete snapshot '{name}': snapshot not found")
            hook(name)
        drv.flush()
    finally:
        drv.close()
