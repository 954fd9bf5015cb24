"""What the library's queries return (``info``, ``check``, ``snapshot_list``): typed, frozen
dataclasses, each with ``to_dict()``.  The commands that make or compare images return the
dataclasses of ``outcomes.py`` (a command loads only its own module of results: defining a frozen
dataclass costs about half a millisecond at start-up).

``to_dict()`` gives what ``qimg CMD --output=json`` prints (and qemu-img 7.2 with it), parsed;
``to_json()`` gives the exact text.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SnapshotInfo:
    """One internal snapshot, as ``qimg snapshot -l`` and ``qimg info`` list it."""

    id: str
    name: str
    vm_state_size: int = 0
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_sec: int = 0
    vm_clock_nsec: int = 0
    icount: int | None = None
    _data: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict) -> SnapshotInfo:
        """Build from qemu's SnapshotInfo keys (``vm-state-size``, ``date-sec``, ...)."""
        return cls(id=str(data.get("id", "")), name=str(data.get("name", "")),
                   vm_state_size=int(data.get("vm-state-size", 0)), date_sec=int(data.get("date-sec", 0)),
                   date_nsec=int(data.get("date-nsec", 0)), vm_clock_sec=int(data.get("vm-clock-sec", 0)),
                   vm_clock_nsec=int(data.get("vm-clock-nsec", 0)), icount=data.get("icount"),
                   _data=dict(data))

    def to_dict(self) -> dict:
        """qemu's SnapshotInfo as a dict (the keys ``qimg info --output=json`` prints)."""
        return copy.deepcopy(self._data)


@dataclass(frozen=True)
class ImageInfo:
    """One image (one layer): what ``qimg info`` shows.  ``to_dict()`` is its ``--output=json``."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None = None
    cluster_size: int | None = None
    encrypted: bool = False
    dirty_flag: bool | None = None
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_filename_format: str | None = None
    snapshots: tuple[SnapshotInfo, ...] = ()
    format_specific: dict | None = None
    _data: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict) -> ImageInfo:
        """Build from qemu's ImageInfo keys (``virtual-size``, ``actual-size``, ...)."""
        return cls(filename=data["filename"], format=data["format"], virtual_size=data["virtual-size"],
                   actual_size=data.get("actual-size"), cluster_size=data.get("cluster-size"),
                   encrypted=bool(data.get("encrypted", False)), dirty_flag=data.get("dirty-flag"),
                   backing_filename=data.get("backing-filename"),
                   full_backing_filename=data.get("full-backing-filename"),
                   backing_filename_format=data.get("backing-filename-format"),
                   snapshots=tuple(SnapshotInfo.from_dict(s) for s in data.get("snapshots") or ()),
                   format_specific=copy.deepcopy(data.get("format-specific")), _data=data)

    def to_dict(self) -> dict:
        """Exactly what ``qimg info --output=json`` prints for this image, as a dict."""
        return copy.deepcopy(self._data)

    def to_json(self) -> str:
        """The text ``qimg info --output=json`` prints (qemu's key order and layout)."""
        from ..qjson import output_text

        return output_text(self._data)


@dataclass(frozen=True)
class CheckResult:
    """What ``qimg check`` found; ``exit_code`` is its status (0 clean, 1 failed, 2 corrupt, 3 leaks)."""

    filename: str
    format: str
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    #: per-cluster diagnostics qemu-img prints on stderr ("Leaked cluster 5 refcount=1 reference=0", ...)
    messages: tuple[str, ...] = ()
    exit_code: int = 0

    @classmethod
    def from_result(cls, res: Any, filename: str, fmt: str) -> CheckResult:
        """From a format's check result (``qimg.core.check.CheckResult``)."""
        return cls(filename=filename, format=fmt, check_errors=res.check_errors, corruptions=res.corruptions,
                   leaks=res.leaks, corruptions_fixed=res.corruptions_fixed, leaks_fixed=res.leaks_fixed,
                   image_end_offset=res.image_end_offset, total_clusters=res.total_clusters,
                   allocated_clusters=res.allocated_clusters, fragmented_clusters=res.fragmented_clusters,
                   compressed_clusters=res.compressed_clusters,
                   messages=tuple(str(m).rstrip("\n") for m in getattr(res, "messages", None) or ()),
                   exit_code=res.exit_code)

    def __getitem__(self, key: str) -> Any:
        """A field by its JSON name (``res["check-errors"]``)."""
        return getattr(self, key.replace("-", "_"))

    def to_dict(self) -> dict:
        """Exactly what ``qimg check --output=json`` prints, as a dict."""
        from ..ops.check import result_dict

        return result_dict(self, self.filename, self.format)

    def to_json(self) -> str:
        """The text ``qimg check --output=json`` prints."""
        from ..qjson import output_text

        return output_text(self.to_dict())

    def human(self) -> str:
        """The text ``qimg check`` prints."""
        from ..ops.check import human

        return human(self)
