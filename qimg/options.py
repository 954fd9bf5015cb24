"""``-o key=value,...`` option strings, as qemu's QemuOpts parses them."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import QimgError

#: open option: only metadata will be read (qemu's BDRV_O_NO_IO).  qemu-img info, and create
#: sizing up a backing file, open encrypted images so without their keys; every other open of an
#: encrypted image unlocks it at once, so a missing or wrong key fails there, as in qemu-img
NO_IO = "_no_io"
#: open option: how the user named the image (the whole --image-opts string): qemu-img's
#: "Could not open '...'" errors quote that
DISPLAY_NAME = "_display_name"
#: open option: the image need not be durable before it is closed (qemu-img convert's target, cache
#: mode "unsafe"): no flushes between metadata stages, and the copy engine's workers may write its
#: data directly.  Every other writable open syncs as qemu's writeback mode does.
CACHE_UNSAFE = "_cache_unsafe"


@dataclass(frozen=True)
class OptSpec:
    """One creation option: name, kind ("size", "bool", "number", "string"), help text."""

    name: str
    kind: str = "string"
    help: str = ""
    default: object = None


#: the creation options most formats share, with qemu-img's help texts
SIZE_OPT = OptSpec("size", "size", "Virtual disk size")
BACKING_FILE_OPT = OptSpec("backing_file", "string", "File name of a base image")
BACKING_FMT_OPT = OptSpec("backing_fmt", "string", "Image format of the base image")

#: the creation options of the host file under any image (qemu's "file" protocol), in the order
#: qemu-img's "Formatting" line shows them after the format's own
FILE_PROTOCOL_OPTS = (
    OptSpec("nocow", "bool", "Turn off copy-on-write (valid only on btrfs)"),
    OptSpec("preallocation", "string", "Preallocation mode (allowed values: off, falloc, full)"),
    OptSpec("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
    SIZE_OPT,
)


def option_text(spec: OptSpec, value: str) -> str:
    """An option's value as qemu-img prints it in a "Formatting" line (sizes in bytes, on/off)."""
    if spec.kind == "bool":
        return "on" if parse_bool(spec.name, value) else "off"
    if spec.kind == "size":
        return str(parse_opt_size(spec.name, value))
    return str(value)


def parse_opts(text: str) -> dict[str, str]:
    """Split "a=1,b=x,,y" into a dict; ",," escapes a comma, a lone key means "on"."""
    result: dict[str, str] = {}
    if not text:
        return result
    items = []
    cur = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    for item in items:
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            if key.startswith("no") and len(key) > 2:
                result[key[2:]] = "off"
            else:
                result[key] = "on"
        else:
            result[key] = value
    return result


def merge_opts(parts: list[str]) -> dict[str, str]:
    """Several -o arguments: later ones win, as qemu-img joins them with commas."""
    merged: dict[str, str] = {}
    for part in parts:
        merged.update(parse_opts(part))
    return merged


def parse_bool(name: str, value: str) -> bool:
    """qemu's boolean values: on/off, yes/no, true/false."""
    v = str(value).lower()
    if v in ("on", "yes", "true", "y"):
        return True
    if v in ("off", "no", "false", "n"):
        return False
    raise QimgError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_opt_size(name: str, value: str) -> int:
    """A size-valued option (cluster_size=64k)."""
    from .units import parse_size

    v = parse_size(str(value))
    if v is None:
        raise QimgError(
            f"Parameter '{name}' expects a non-negative number below 2^64\n"
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            "and exabytes, respectively.")
    return v
