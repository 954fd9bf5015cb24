"""``--image-opts`` strings and ``json:{...}`` filenames, read as qemu-img 7.2 reads them.

Both describe a tree of block nodes: the format node (``driver``, its options), its ``file`` child
(the host file, or a ``raw`` node with ``offset``/``size`` over another file: an image inside a
container such as an OVA), and optionally its ``backing`` child (``null``: no backing file; a node:
that backing file, with its own options).  ``--image-opts`` spells the tree with dotted keys
(``file.file.filename=x``); ``json:`` with nested objects, dotted keys allowed too.

``plan()`` turns a tree into what the registry opens: a filename, a format and the flat option dict
the drivers read, with private keys for the windows over the file (``WINDOW``), a backing override
(``BACKING``) and the name qemu-img shows for the image (``SHOWN``: the file name, or a ``json:``
name when options that change what is read were given).  Keys a node does not have are refused
with qemu-img's messages.
"""

from __future__ import annotations

from ..errors import OpenError, QimgError

#: private option keys (never on a command line: qemu's option names have no leading underscore)
WINDOW = "_window"      # [(offset, size), ...], outermost first: raw nodes between the format and the file
BACKING = "_backing"    # None: no backing file; a dict: the backing node's tree; a str: a node reference
SHOWN = "_shown_name"   # the image's name as info and check show it
TREE = "_tree"          # the whole tree (for the backing.* keys info refuses)
FILE_SHOWN = "_file_shown_name"  # the name of the format's file when it is a window (json:{"driver": "raw", ...})

#: options every node accepts (qemu's generic block options)
GENERIC = frozenset({"driver", "node-name", "discard", "cache.direct", "cache.no-flush", "read-only",
                     "auto-read-only", "detect-zeroes", "force-share"})
_QCOW2 = frozenset({
    "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot", "pass-discard-other", "overlap-check",
    "overlap-check.template", "overlap-check.main-header", "overlap-check.active-l1", "overlap-check.active-l2",
    "overlap-check.refcount-table", "overlap-check.refcount-block", "overlap-check.snapshot-table",
    "overlap-check.inactive-l1", "overlap-check.inactive-l2", "overlap-check.bitmap-directory", "cache-size",
    "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size", "cache-clean-interval", "encrypt.format",
    "encrypt.key-secret", "data-file", "snapshot"})
#: each format's own runtime options (qemu 7.2)
FORMAT_OPTS = {
    "qcow2": _QCOW2,
    "qcow": frozenset({"encrypt.format", "encrypt.key-secret"}),
    "luks": frozenset({"key-secret"}),
    "raw": frozenset({"offset", "size"}),
    "parallels": frozenset({"prealloc-mode", "prealloc-size"}),
}
#: options that change what is read: their presence makes qemu name the image with a json: filename
STRONG_OPTS = {"qcow2": ("encrypt.key-secret",), "qcow": ("encrypt.key-secret",), "luks": ("key-secret",),
               "raw": ("offset", "size")}
#: the host-file protocol's options
FILE_OPTS = GENERIC | {"filename", "aio", "aio-max-batch", "locking", "pr-manager", "x-check-cache-dropped",
                       "drop-cache"}
FILE_DRIVERS = ("file", "host_device", "host_cdrom")
#: formats that take a backing file (the others do not have the option)
BACKED = ("qcow2", "qed", "qcow", "vmdk")


# --- parsing ----------------------------------------------------------------------------------------

def _nest(flat: dict) -> dict:
    """{"file.filename": x} -> {"file": {"filename": x}}; a key given both ways keeps its dotted spelling."""
    tree: dict = {}
    for key, value in flat.items():
        if isinstance(value, dict):
            value = _nest(value)
        head, dot, rest = key.partition(".")
        if dot and head in ("file", "backing", "data-file") and not isinstance(tree.get(head), str):
            sub = tree.setdefault(head, {})
            if isinstance(sub, dict):
                if isinstance(value, dict):
                    sub.setdefault(rest, {}).update(value)
                else:
                    sub.update(_nest({rest: value}))
                continue
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key].update(value)
        else:
            tree[key] = value
    return tree


def parse_opts_string(text: str) -> dict:
    """An --image-opts string as a node tree (qemu's key=value,... syntax, no implied key)."""
    from ..options import parse_opts

    return _nest(parse_opts(text))


def parse_json_name(name: str) -> dict:
    """A ``json:{...}`` filename as a node tree."""
    import json

    try:
        value = json.loads(name[len("json:"):])
    except ValueError as e:
        what = "premature EOI" if "Expecting" in str(e) and e.pos >= len(name) - 6 else "invalid token"
        raise OpenError(f"Could not parse the JSON options: JSON parse error, {what}") from None
    if not isinstance(value, dict):
        raise OpenError("Invalid JSON object given")
    return _nest(value)


# --- validation and planning --------------------------------------------------------------------------

def _first(keys) -> str:
    """The key qemu reports first: its QDict iteration order."""
    from ..qjson import qdict_order

    return qdict_order(list(keys))[0]


def _flat(node: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


def _check_format(fmt: str, node: dict, with_backing: bool) -> None:
    allowed = GENERIC | FORMAT_OPTS.get(fmt, frozenset()) | {"file"}
    if fmt in BACKED and with_backing:
        allowed |= {"backing"}
    bad = [k for k in _flat(node) if k not in allowed and k.split(".")[0] not in ("file",)
           and not (k.split(".")[0] in ("backing", "data-file") and k.split(".")[0] in allowed)]
    if fmt == "qcow2":
        bad = [k for k in bad if not k.startswith("data-file.")]
    if bad:
        raise OpenError(f"Block format '{fmt}' does not support the option '{_first(bad)}'")


def _str(value) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def _int_opt(node: dict, key: str) -> int | None:
    if key not in node:
        return None
    try:
        value = int(node[key])
    except (TypeError, ValueError):
        raise OpenError(f"Parameter '{key}' expects a non-negative number below 2^64") from None
    if value < 0:
        raise OpenError(f"Parameter '{key}' expects a non-negative number below 2^64")
    return value


def _check_file_node(drv: str, node: dict) -> None:
    """A host-file protocol node (``file``, ``host_device``...): only its options, and a file name."""
    bad = [k for k in _flat(node) if k not in FILE_OPTS]
    if bad:
        raise OpenError(f"Block protocol '{drv}' doesn't support the option '{_first(bad)}'")
    if "filename" not in node:
        raise OpenError(f"The '{drv}' block driver requires a file name")


def _file_child(fmt_shown: str, node: dict, windows: list, flat: dict) -> tuple[str, dict]:
    """Walk a format node's ``file`` child: (host file name, its full options for a json: name)."""
    child = node.get("file")
    if isinstance(child, str):
        raise OpenError(f"Cannot find device='{child}' nor node-name='{child}'")
    if child is None:
        raise OpenError('A block device must be specified for "file"')
    drv = child.get("driver", "file")
    if drv in FILE_DRIVERS:
        _check_file_node(drv, child)
        for k, v in child.items():
            if k not in ("driver", "filename"):
                flat[f"file.{k}"] = v
        return _str(child["filename"]), {"driver": drv, "filename": child["filename"]}
    if drv == "raw":
        _check_format("raw", child, False)
        offset, size = _int_opt(child, "offset"), _int_opt(child, "size")
        windows.append((offset or 0, size))
        name, inner = _file_child("raw", child, windows, flat)
        full = {"driver": "raw"}
        full.update({k: child[k] for k in ("offset", "size") if k in child})
        full["file"] = inner
        return name, full
    from .catalog import get_driver

    get_driver(drv)  # "Unknown driver 'x'"
    raise OpenError(f"A '{drv}' image as the file of a '{fmt_shown}' image is not supported")


def _probe_format(filename: str) -> str | None:
    """The format qemu would probe (None when the file cannot be read: the open reports that)."""
    from .catalog import PROBE_BYTES, probe

    try:
        with open(filename, "rb") as f:
            head = f.read(PROBE_BYTES)
    except OSError:
        return None
    return probe(head, filename)


def plan(tree: dict, display: str, fmt: str | None = None) -> tuple[str, str | None, dict]:
    """(filename, format, flat options) for a node tree; ``display`` names it in errors."""
    from ..options import DISPLAY_NAME

    node = dict(tree)
    fmt = node.get("driver") or fmt
    if fmt is not None:
        node["driver"] = fmt
    if fmt in FILE_DRIVERS:
        _check_file_node(fmt, node)
        flat = {k: v for k, v in node.items() if k not in ("driver", "filename")}
        flat.update({TREE: tree, DISPLAY_NAME: display})
        return _str(node["filename"]), "file", flat
    if fmt is None and "file" not in node:
        raise OpenError("Must specify either driver or file")
    if fmt is not None:
        from .catalog import get_driver

        get_driver(fmt)
    windows: list = []
    flat: dict = {}
    filename, file_full = _file_child(fmt or "raw", node, windows, flat)
    if fmt is None and not windows:
        fmt = _probe_format(filename)
    if fmt is not None:
        # qemu checks a node's own keys once the file is open and the format known; the backing
        # keys are checked where the backing file is opened (or refused by an open without one)
        _check_format(fmt, node, True)
    for k, v in node.items():
        if k not in ("driver", "file", "backing"):
            flat[k] = v
    if windows:
        flat[WINDOW] = windows
        flat[FILE_SHOWN] = "json:" + compact(file_full)
    if "backing" in node:
        flat[BACKING] = node["backing"]
        if node["backing"] == "":
            import warnings

            from ..errors import QimgWarning

            # the command line prints it as qemu-img does ("qimg: warning: ...")
            warnings.warn('Use of "backing": "" is deprecated; use "backing": null instead', QimgWarning, stacklevel=2)
    flat[TREE] = tree
    flat[DISPLAY_NAME] = display
    flat[SHOWN] = shown_name(fmt, node, filename, file_full)
    return filename, fmt, flat


def shown_name(fmt: str | None, node: dict, filename: str, file_full: dict) -> str:
    """The name qemu gives the node: the file's name, or json:{...} when strong options or a backing
    override are present (its full options, in QDict order)."""
    strong = [k for k in STRONG_OPTS.get(fmt or "", ()) if k in node]
    if not strong and file_full.get("driver") in FILE_DRIVERS:
        return filename
    full = {"driver": fmt}
    for k in strong:
        full[k] = node[k]
    full["file"] = file_full
    return "json:" + compact(full)


def compact(value) -> str:
    """qemu's one-line JSON (qobject_to_json): ", " and ": " separators, QDict key order."""
    import json

    from ..qjson import qdict_order

    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {compact(value[k])}" for k in qdict_order(list(value))) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(compact(v) for v in value) + "]"
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    return json.dumps(value)


def expand(filename: str, fmt: str | None, options: dict | None) -> tuple[str, str | None, dict | None]:
    """A ``json:`` filename planned into (filename, format, options); any other name as it is."""
    if not isinstance(filename, str) or not filename.startswith("json:"):
        return filename, fmt, options
    from ..options import DISPLAY_NAME

    try:
        name, jfmt, opts = plan(parse_json_name(filename), filename, fmt)
    except QimgError as e:
        raise OpenError(f"Could not open '{filename}': {e}") from None
    for k, v in (options or {}).items():
        if k.startswith("_") and k not in (DISPLAY_NAME,):
            opts.setdefault(k, v)
    return name, jfmt, opts


def refuse_backing_keys(fmt: str, options: dict | None, shown: str) -> None:
    """An open without backing files (info) keeps the backing.* keys unused: qemu refuses them."""
    tree = (options or {}).get(TREE)
    if not tree or "backing" not in tree:
        return
    back = tree["backing"]
    if back is None or back == "":
        return
    keys = ["backing"] if not isinstance(back, dict) else ["backing." + k for k in _flat(back)]
    raise OpenError(f"Could not open '{shown}': Block format '{fmt}' does not support the option '{_first(keys)}'")


def open_window(store, options: dict | None):
    """The store a format reads: ``store`` itself, or the raw windows of WINDOW over it."""
    windows = (options or {}).get(WINDOW)
    if not windows:
        return store
    from ..io.window import WindowStore

    base = 0
    size = None
    for offset, length in windows:  # outermost first: each window lies within the one below it
        base_size = store.size() - base if size is None else size
        base += offset
        size = (base_size - offset) if length is None else length
    return WindowStore(store, base, size)


