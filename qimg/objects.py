"""``--object`` definitions (secrets) and ``--image-opts`` strings."""

from __future__ import annotations

import contextlib
import contextvars

from .errors import QimgError, UsageError
from .options import parse_opts

#: secrets by id for the code running in this context (a thread, a library call): filled from
#: ``--object secret,id=...,data=...|file=...`` or a library call's ``secrets=``; never process-wide,
#: so two threads (or two library calls) never see each other's keys
_SECRETS: contextvars.ContextVar[dict[str, bytes] | None] = contextvars.ContextVar("qimg_secrets", default=None)


def _current() -> dict[str, bytes]:
    table = _SECRETS.get()
    if table is None:
        table = {}
        _SECRETS.set(table)
    return table


@contextlib.contextmanager
def secrets_scope(secrets: dict | None):
    """Make ``secrets`` (id -> str or bytes) visible to the opens and creates made inside."""
    if not secrets:
        yield
        return
    table = dict(_SECRETS.get() or {})
    for ident, value in secrets.items():
        table[str(ident)] = value.encode() if isinstance(value, str) else bytes(value)
    token = _SECRETS.set(table)
    try:
        yield
    finally:
        _SECRETS.reset(token)


def add_object(text: str) -> str | None:
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
    _current()[ident] = value
    return ident


def add_objects(texts) -> None:
    """Register the --object definitions of one command, in order; an id given twice is refused as
    qemu-img refuses it (the second object cannot join the first's container)."""
    seen: set[str] = set()
    for text in texts or ():
        kind, _, rest = text.partition(",")
        opts = parse_opts(text if "=" in kind else rest)
        ident = opts.get("id")
        if ident in seen and (opts.get("qom-type") if "=" in kind else kind) == "secret":
            # (before the object's own properties are checked, as in qemu)
            raise QimgError(f"attempt to add duplicate property '{ident}' to object (type 'container')")
        seen.add(add_object(text))


def get_secret(ident: str) -> bytes:
    """The secret registered under ``ident``."""
    try:
        return (_SECRETS.get() or {})[ident]
    except KeyError:
        raise QimgError(f"No secret with id '{ident}'") from None


def parse_image_opts(text: str) -> tuple[str, str | None, dict]:
    """``driver=qcow2,file.filename=x,...`` -> (filename, format, flat options): see core.imageopts."""
    from .core import imageopts

    first = text.replace(",,", "\0").split(",", 1)[0].replace("\0", ",")
    tree = imageopts.parse_opts_string(text)
    if first and "=" not in first:
        # a leading bare value is qemu's implied key "file"
        tree.pop(first, None)
        tree = {"file": first, **tree}
    try:
        return imageopts.plan(tree, text)
    except QimgError as e:
        raise type(e)(f"Could not open '{text}': {e}", e.exit_code) from None
