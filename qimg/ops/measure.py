"""measure: how large an image of a format would be for a size or for a source image.

The output format's driver does the arithmetic through its classmethod
``measure(options, size, src) -> {"required", "fully-allocated"[, "bitmaps"]}`` where
``options`` are the raw ``-o`` strings, ``size`` the virtual size and ``src`` None (``--size``)
or a source with ``extents(start, end)`` (an engine ``ChainSource``).  Checks and messages
follow qemu-img 7.2 in its order: arguments, source, format, ``-o``, then the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core import registry
from ..core.chain import Chain
from ..errors import QimgError
from ..options import OptSpec, merge_opts, parse_bool, parse_opt_size

#: options of the host file every format is stored in (qemu appends them to each format's list)
FILE_OPTS = (
    OptSpec("size", "size"),
    OptSpec("preallocation", "string"),
    OptSpec("nocow", "bool"),
    OptSpec("extent_size_hint", "size"),
)

#: formats qemu-img 7.2 can create but not measure (it names them "Block driver")
_PROTOCOL_NAMES = ("file",)
#: read-only formats (no creation in qemu-img either)
_NO_CREATE = ("bochs", "cloop", "dmg")


class MeasureOptionsError(QimgError):
    """An ``-o`` value the format refuses: ``detail`` (may be several lines), then a summary line."""

    def __init__(self, detail: str, fmt: str):
        super().__init__(f"{detail}\nInvalid options for file format '{fmt}'")
        self.detail = detail
        self.summary = f"Invalid options for file format '{fmt}'"


@dataclass
class MeasureRequest:
    """qemu-img measure's arguments as plain values."""

    filename: str | None = None
    fmt: str | None = None
    image_opts: dict = field(default_factory=dict)
    size: int | None = None
    out_fmt: str = "raw"
    options: list = field(default_factory=list)  # the -o strings
    snapshot: dict | None = None
    image_opts_used: bool = False
    policy: object = None  # qimg.core.policy.Policy (untrusted mode); None: qemu-img's rules


def measure(req: MeasureRequest) -> dict:
    """{"required": n, "fully-allocated": n[, "bitmaps": n]} for the request."""
    if req.filename is None and (req.image_opts_used or req.fmt or req.snapshot):
        raise QimgError("--image-opts, -f, and -l require a filename argument.")
    if req.filename is not None and req.size is not None:
        raise QimgError("--size N cannot be used together with a filename.")
    if req.filename is None and req.size is None:
        raise QimgError("Either --size N or one filename must be specified.")
    chain = None
    try:
        if req.filename is not None:
            opts = dict(req.image_opts)
            chain = Chain.open(req.filename, req.fmt, options=opts, policy=req.policy)
            if req.snapshot is not None:
                _load_snapshot(chain, req.snapshot)
        return _measure(req, chain)
    finally:
        if chain is not None:
            chain.close()


def _load_snapshot(chain: Chain, snapshot: dict) -> None:
    """Show the source as it was at an internal snapshot (formats that have them)."""
    top = chain.top
    try:
        top.load_snapshot(snapshot)
    except QimgError as e:
        raise QimgError(f"Failed to load snapshot: {e}") from None


def _driver_class(name: str):
    if name in _PROTOCOL_NAMES:
        return None
    if name not in registry.FORMATS:
        raise QimgError(f"Unknown file format '{name}'")
    try:
        return registry.get_driver(name)
    except Exception:  # noqa: BLE001 - a module still missing or broken: treat as absent
        if name in _NO_CREATE:
            raise QimgError(f"Format driver '{name}' does not support image creation") from None
        return None  # a format this build has no module for: it cannot measure either


def _measure(req: MeasureRequest, chain: Chain | None) -> dict:
    from ..engine.reword import RewordedSource

    cls = _driver_class(req.out_fmt)
    if cls is not None and not cls.can_create():
        raise QimgError(f"Format driver '{req.out_fmt}' does not support image creation")
    specs = (tuple(cls.create_opts) if cls is not None else ()) + FILE_OPTS
    opts = check_options(req.options, specs, req.out_fmt)
    if cls is None:
        raise QimgError(f"Block driver '{req.out_fmt}' does not support size measurement")
    if chain is not None:
        size = chain.virtual_size
        src = RewordedSource(chain, lambda offset, error: f"Unable to get block status: {error}")
    else:
        size = req.size
        src = None
        opts["size"] = str(size)
    return normalize(cls.measure(opts, size, src))


def check_options(parts: list, specs, fmt: str) -> dict:
    """Parse -o strings and check names and value types against ``specs`` (qemu's QemuOpts)."""
    opts = merge_opts(list(parts))
    kinds = {s.name: s.kind for s in specs}
    for key, value in opts.items():
        kind = kinds.get(key)
        if kind is None:
            raise MeasureOptionsError(f"Invalid parameter '{key}'", fmt)
        try:
            if kind == "size":
                parse_opt_size(key, value)
            elif kind == "bool":
                parse_bool(key, value)
            elif kind == "number" and not str(value).strip().isdigit():
                raise QimgError(f"Parameter '{key}' expects a number")
        except QimgError as e:
            raise MeasureOptionsError(str(e), fmt) from None
    return opts


def normalize(result) -> dict:
    """A driver's answer (dict, tuple or object) as the ordered dict qemu-img prints."""
    if isinstance(result, dict):
        required = result["required"]
        fully = result.get("fully-allocated", result.get("fully_allocated"))
        bitmaps = result.get("bitmaps")
    elif isinstance(result, (tuple, list)):
        required, fully = result[0], result[1]
        bitmaps = result[2] if len(result) > 2 else None
    else:
        required = result.required
        fully = getattr(result, "fully_allocated", None)
        bitmaps = getattr(result, "bitmaps", None)
    out = {"required": int(required), "fully-allocated": int(fully)}
    if bitmaps is not None:
        out["bitmaps"] = int(bitmaps)
    return out


def human(result: dict) -> str:
    """qemu-img measure's human output."""
    text = f"required size: {result['required']}\nfully allocated size: {result['fully-allocated']}\n"
    if "bitmaps" in result:
        text += f"bitmaps size: {result['bitmaps']}\n"
    return text
