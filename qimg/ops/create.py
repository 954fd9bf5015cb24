"""create: make a new image of a format."""

from __future__ import annotations

from ..core import registry
from ..core.driver import CreateOptions, Opener
from ..errors import QimgError
from ..options import FILE_PROTOCOL_OPTS, NO_IO, OptSpec, option_text, parse_opt_size
from ..units import INT64_MAX

_KIND_LABEL = {"size": "<size>", "bool": "<bool (on/off)>", "number": "<num>", "string": "<str>"}


def options_help(fmt: str, filename: str | None = None) -> str:
    """``-o help``: the creation options of a format, as qemu-img lists them.  Given the target file
    name, qemu-img lists the host file's options too, merged, and leaves out the footnote."""
    cls = registry.get_driver(fmt)
    specs = {s.name: s for s in _public_opts(cls)}
    if filename is not None and registry.protocol_for(filename) is None:
        for spec in FILE_PROTOCOL_OPTS:
            specs.setdefault(spec.name, spec)
    lines = ["Supported options:" if filename is not None else f"Supported {fmt} options:"]
    for name in sorted(specs):
        spec = specs[name]
        lines.append("  %-22s - %s" % (f"{spec.name}={_KIND_LABEL.get(spec.kind, '<str>')}", spec.help))
    if filename is None:
        lines.append("")
        lines.append("The protocol level may support further options.")
        lines.append("Specify the target filename to include those options.")
    return "\n".join(lines) + "\n"


def _public_opts(cls) -> list[OptSpec]:
    return [s for s in cls.create_opts if not s.name.startswith("_")]


def validate_options(cls, filename: str, options: dict) -> None:
    """Refuse options the format does not know (qemu-img: "Invalid parameter 'x'")."""
    # the file protocol's own options are accepted with any format, as qemu-img does
    known = {s.name for s in cls.create_opts} | {s.name for s in FILE_PROTOCOL_OPTS}
    for key in options:
        if key not in known:
            raise QimgError(f"{filename}: Invalid parameter '{key}'")


def _protocol_pairs(cls, opts: CreateOptions) -> list[tuple[str, str]]:
    """The host file's options given, as the "Formatting" line shows them after the format's own."""
    own = {s.name for s in cls.create_opts}
    out = []
    for spec in FILE_PROTOCOL_OPTS:
        if spec.name in own or spec.name not in opts.options:
            continue
        out.append((spec.name, option_text(spec, opts.options[spec.name])))
    return out


def format_line(cls, filename: str, opts: CreateOptions) -> str:
    """The "Formatting 'x', fmt=..." line."""
    pairs = cls.format_line_options(opts)
    protocol = _protocol_pairs(cls, opts)
    if protocol:
        given = {k for k, _ in protocol}
        pairs = [(k, v) for k, v in pairs if k not in given] + protocol
    text = " ".join(f"{k}={v}" for k, v in pairs)
    return f"Formatting '{filename}', fmt={cls.format_name} {text}".rstrip() + "\n"


class RedirectingOpener(Opener):
    """An Opener whose files of some names come from the caller: ``store_for(resolved path, create)``
    returns a store, or None for the usual open."""

    def __init__(self, *args, store_for=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.store_for = store_for

    def open_file(self, name: str, writable: bool | None = None, create: bool = False, **kwargs):
        store = self.store_for(self.resolve(name), create) if self.store_for is not None else None
        return store if store is not None else super().open_file(name, writable, create, **kwargs)


def create_image(filename: str, fmt: str, size: int | None, options: dict | None = None,
                 backing_file: str | None = None, backing_fmt: str | None = None,
                 unsafe: bool = False, announce=None, display_name: str | None = None, policy=None,
                 store_for=None) -> str:
    """Create ``filename``; returns the "Formatting ..." line qemu-img prints.

    ``announce(line)`` is called with that line just before the driver writes anything,
    so the line shows even when the driver then fails (as qemu-img prints it).  ``store_for(path, create)``
    may hand the driver the store of a file it opens (convert: the partial file, a pipe), or None.
    """
    shown = display_name or filename
    cls = registry.get_driver(fmt) if fmt in registry.FORMATS else _unknown(fmt, filename)
    options = dict(options or {})
    if "backing_file" in options:
        backing_file = backing_file or options.pop("backing_file")
    else:
        options.pop("backing_file", None)
    if "backing_fmt" in options:
        backing_fmt = backing_fmt or options.pop("backing_fmt")
    if "size" in options:
        osize = parse_opt_size("size", options.pop("size"))
        size = size if size is not None else osize
    validate_options(cls, shown, options)
    backing_size = None
    if backing_file:
        if not cls.supports_backing:
            raise QimgError(f"{shown}: Backing file not supported for file format '{fmt}'")
        if backing_fmt is None and not unsafe:
            detected = _detect_backing(filename, backing_file)
            raise QimgError(f"{shown}: Backing file specified without backing format\n"
                            f"Detected format of {detected}.")
        if not unsafe or size is None:
            backing_size = _backing_size(filename, backing_file, backing_fmt, shown, policy)
        if size is None:
            size = backing_size
    if size is None:
        raise QimgError(f"{shown}: Image creation needs a size parameter")
    if size > INT64_MAX:
        raise QimgError("Image size must be less than 8 EiB!")
    opts = CreateOptions(size=size, options=options, backing_file=backing_file, backing_fmt=backing_fmt,
                         backing_size=backing_size)
    try:
        line = format_line(cls, filename, opts)
    except QimgError as e:  # a typed -o value that does not parse: no "Formatting" line, as qemu-img
        raise type(e)(f"{shown}: {e}", e.exit_code) from None
    if announce is not None:
        announce(line)
    try:
        from ..core.chain import Chain
        from ..core.policy import Guard

        # the backing file a driver reads while creating (a VMDK parent's CID) opens under the same policy
        def open_backing(path, bfmt, open_options, backing):
            return Chain.open(path, bfmt, options=open_options, backing=backing, policy=policy)

        cls.create(filename, opts, RedirectingOpener(filename, writable=True, guard=Guard(policy, filename),
                                                     open_backing=open_backing, store_for=store_for))
    except QimgError as e:
        msg = str(e)
        if not msg.startswith(shown + ":"):
            raise type(e)(f"{shown}: {msg}", e.exit_code) from None
        raise
    return line


def _unknown(fmt, filename=None):
    raise QimgError((f"{filename}: " if filename else "") + f"Unknown file format '{fmt}'")


def _resolve(filename, backing_file):
    return registry.resolve_backing(filename, backing_file)


def _detect_backing(filename, backing_file) -> str:
    return registry.probe_file(_resolve(filename, backing_file)) or "unknown"


def _backing_size(filename, backing_file, backing_fmt, shown=None, policy=None) -> int:
    from ..core.chain import Chain

    path = _resolve(filename, backing_file)
    try:
        with Chain.open(path, backing_fmt, options={NO_IO: True}, policy=policy) as chain:
            return chain.virtual_size
    except QimgError as e:
        raise QimgError(f"{shown or filename}: Could not open backing image: {e}") from None
