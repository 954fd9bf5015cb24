"""``--object`` definitions (secrets) and ``--image-opts`` strings."""

from __future__ import annotations

from .errors import QimgError, UsageError
from .options import parse_opts

#: secrets by id, filled from --object secret,id=...,data=...|file=...
SECRETS: dict[str, bytes] = {}


def add_object(text: str) -> None:
    """Register one --object definition (only 'secret' objects are meaningful to qimg)."""
    if text == "help":
        raise UsageError("List of user creatable objects:\n  secret")
    kind, _, rest = text.partition(",")
    if "=" in kind:
        opts = parse_opts(text)
        kind = opts.pop("qom-type", "")
    else:
        opts = parse_opts(rest)
    if kind != "secret":
        raise QimgError(f"Parameter 'qom-type' does not accept value '{kind}'")
    ident = opts.get("id")
    if not ident:
        raise QimgError("Parameter 'id' is missing")
    if "data" in opts and "file" in opts:
        raise QimgError("'data' and 'file' are mutually exclusive")
    if "data" in opts:
        value = opts["data"].encode()
    elif "file" in opts:
        try:
            with open(opts["file"], "rb") as f:
                value = f.read()
        except OSError as e:
            raise QimgError(f"Unable to read {opts['file']}: {e.strerror}") from None
    else:
        raise QimgError("Either 'file' or 'data' must be provided")
    fmt = opts.get("format", "raw")
    if fmt == "base64":
        import base64

        try:
            value = base64.b64decode(value, validate=True)
        except Exception:
            raise QimgError("Unable to decode base64 secret") from None
    SECRETS[ident] = value


def get_secret(ident: str) -> bytes:
    """The secret registered under ``ident``."""
    try:
        return SECRETS[ident]
    except KeyError:
        raise QimgError(f"No secret with id '{ident}'") from None


def parse_image_opts(text: str) -> tuple[str, str | None, dict]:
    """``driver=qcow2,file.filename=x,...`` -> (filename, format, remaining options)."""
    opts = parse_opts(text)
    first = text.replace(",,", "\0").split(",", 1)[0].replace("\0", ",")
    if first and "=" not in first:
        # a leading bare value is qemu's implied key "file"
        opts.pop(first, None)
        opts["file"] = first
    fmt = opts.pop("driver", None)
    node = opts.pop("file", None)
    filename = opts.pop("file.filename", None) or opts.pop("filename", None)
    opts.pop("file.driver", None)
    if filename is None and node is not None:
        # file=NAME names another block node, and qemu-img defines none
        raise QimgError(f"Could not open '{text}': Cannot find device='{node}' nor node-name='{node}'")
    if filename is None:
        raise QimgError(f"Could not open '{text}': A block device must be specified for \"file\"")
    return filename, fmt, opts
