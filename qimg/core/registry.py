"""The format registry: probing and opening (the name -> driver table itself is catalog.py)."""

from __future__ import annotations

import os

from ..errors import OpenError, QimgError
from .catalog import (
    FORMATS,
    PROBE_BYTES,
    PROTOCOLS,
    _cache,
    format_names,
    get_driver,
    probe,
    protocol_for,
    resolve_backing,
)

__all__ = ["FORMATS", "PROBE_BYTES", "PROTOCOLS", "_cache", "format_names", "get_driver", "protocol_for", "probe",
           "open_image", "bundle_descriptor", "resolve_backing"]

def open_image(filename: str, fmt: str | None = None, writable: bool = False, options: dict | None = None,
               warn=None, guard=None, policy=None):
    """Open one layer (no backing files): probe unless ``fmt`` is given.

    The files the layer names (extents, data files) are admitted by ``guard`` (qimg.core.policy), or
    by a new one for ``policy`` (None: qemu-img's rules) with ``filename`` as the top image.
    Open errors read "Could not open 'NAME': ...", NAME as the user gave it (DISPLAY_NAME: the
    whole --image-opts string, as qemu-img quotes it)."""
    from ..options import DISPLAY_NAME
    from .policy import Guard, PolicyError

    if guard is None:
        guard = Guard(policy, filename)
    from .imageopts import expand

    filename, fmt, options = expand(filename, fmt, options)  # a json:{...} name: its options
    shown = (options or {}).get(DISPLAY_NAME)
    try:
        return _open_image(filename, fmt, writable, options, warn, guard)
    except PolicyError:
        raise
    except QimgError as e:
        prefix = f"Could not open '{filename}': "
        msg = str(e)
        if not shown or shown == filename or not msg.startswith(prefix):
            raise
        raise type(e)(f"Could not open '{shown}': " + msg[len(prefix):], e.exit_code) from None


def _open_image(filename: str, fmt: str | None, writable: bool, options: dict | None, warn, guard):
    from ..io import lock
    from ..io.remote import url_scheme
    from ..io.store import FileStore
    from ..io.urls import open_url
    from ..options import NO_IO
    from .imageopts import FILE_SHOWN, WINDOW, open_window
    from .policy import PolicyError

    proto = protocol_for(filename)
    proto_cls = None
    if proto is not None:
        cls = get_driver(proto)
        if not cls.provides_store:
            try:
                return cls.open_protocol(filename, writable=writable, options=options or {})
            except QimgError as e:
                raise OpenError(f"Could not open '{filename}': {e}") from None
        # a protocol with a byte store (nbd): any format may live on it, raw is the protocol's own view
        proto_cls = cls
    if fmt is not None:
        try:
            get_driver(fmt)  # unknown driver errors before the file is touched
        except OpenError as e:
            raise OpenError(f"Could not open '{filename}': {e}") from None
    try:
        force_share, locking = lock.open_settings(options, writable)
        if proto_cls is not None:
            store = proto_cls.open_store(filename, writable, options or {})
        elif url_scheme(filename) is not None:
            store = open_url(filename)  # http(s) and fsspec URLs: read-only, by byte range
            if writable:
                store.close()
                raise OpenError("a URL can be read only")
        else:
            store = FileStore(bundle_descriptor(filename), writable=writable, lock=None)
        if options and WINDOW in options:
            try:
                store = open_window(store, options)  # an image inside a container (raw offset/size)
            except BaseException:
                store.close()
                raise
    except QimgError as e:
        raise OpenError(f"Could not open '{filename}': {e}") from None
    try:
        if fmt is None:
            head = store.pread(0, PROBE_BYTES)
            fmt = probe(head, filename)
            if fmt == "raw" and warn is not None and proto_cls is None:
                warn(f"Image format was not specified for '{filename}' and probing guessed raw.\n"
                     "         Automatically detecting the format is dangerous for raw images, "
                     "write operations on block 0 will be restricted.\n"
                     "         Specify the 'raw' format explicitly to remove the restrictions.")
        cls = proto_cls if proto_cls is not None and fmt == "raw" else get_driver(fmt)
        no_io = bool((options or {}).get(NO_IO))
        if locking and hasattr(store, "lock"):
            # taken once the format is known (qemu probes before it locks), before the driver reads on
            store.lock(*lock.image_perms(cls.lock_passthrough, writable, no_io, force_share, options))
        opener = make_opener(filename, writable, guard)
        with lock.opening(no_io, force_share, locking):
            # the format reads a window of the file: qemu names that file with its json: options
            shown_file = (options or {}).get(FILE_SHOWN, filename)
            return cls.open(store, shown_file, writable=writable, opener=opener, options=options or {})
    except PolicyError:
        store.close()
        raise
    except QimgError as e:
        store.close()
        msg = str(e)
        if isinstance(e, OpenError) and msg.startswith(f"Could not open '{filename}'"):
            raise
        # (the untrusted mode's structure checks name the image themselves: named once)
        msg = msg.removeprefix(f"'{filename}': ")
        raise type(e)(f"Could not open '{filename}': {msg}", e.exit_code) from None
    except BaseException:
        store.close()
        raise


def make_opener(filename: str, writable: bool, guard):
    """The Opener of an image named ``filename``: its sibling files and nested images go through ``guard``."""
    from .driver import Opener

    return Opener(bundle_descriptor(filename), writable, guard=guard, image=filename,
                  open_image=lambda f, t, w: open_image(f, t, w, guard=guard))


def admit_backing(guard, image: str, name: str, fmt: str | None, depth: int,
                  top: str | None = None) -> tuple[str, str | None]:
    """Resolve, check and record the backing file ``name`` of ``image`` (at ``depth`` below the top image
    ``top``) under ``guard``: (path to open, format).  Without a recorded format the untrusted mode
    probes it here and refuses a guess of raw."""
    from dataclasses import replace

    from .policy import BACKING, PolicyError, refusal

    guard.depth(top or image, depth)
    resolved = resolve_backing(image, name)
    ref = guard.policy.judge(image, name, resolved, BACKING)
    if ref.allowed and fmt is None and guard.untrusted:
        probed = probe_file(resolved)
        if probed == "raw":
            ref = replace(ref, allowed=False,
                          reason="no backing format is recorded and the file would be probed as raw")
        else:
            fmt = probed
    guard.references.append(ref)
    if not ref.allowed:
        raise PolicyError(refusal(ref), ref)
    return resolved, fmt


def probe_file(filename: str) -> str | None:
    """The format ``filename`` probes as (None when it cannot be read: its open reports why)."""
    from ..io.store import FileStore

    try:
        with FileStore(filename, lock=None) as store:
            head = store.pread(0, PROBE_BYTES)
    except QimgError:
        return None
    return probe(head, filename)


def bundle_descriptor(filename: str) -> str:
    """A Parallels Desktop .hdd bundle (a directory) opens through its DiskDescriptor.xml."""
    if os.path.isdir(filename):
        desc = os.path.join(filename, "DiskDescriptor.xml")
        if os.path.isfile(desc):
            return desc
    return filename


def backing_override(options: dict | None, filename: str, top, guard=None):
    """The backing file the options give the top image: None when they say nothing or say "no backing
    file" (Chain then reads the top alone), else (driver, name) opened read-only."""
    from .imageopts import BACKING, plan

    if not options or BACKING not in options:
        return None
    from ..options import DISPLAY_NAME

    back = options[BACKING]
    shown = options.get(DISPLAY_NAME) or filename
    if back is None:
        return None
    if back == "":
        return None  # (plan() warned)
    if isinstance(back, str):
        raise OpenError(f"Could not open '{shown}': Could not open backing file: "
                        f"Cannot find device='{back}' nor node-name='{back}'")
    try:
        if "file" not in back and top.backing is not None and top.backing.filename:
            # options for the backing file the image names: they apply to it
            back = {**back, "file": {"filename": resolve_backing(filename, top.backing.filename)}}
            if "driver" not in back and top.backing.fmt:
                back["driver"] = top.backing.fmt
        # names given by the user are the user's (relative to the working directory)
        name, fmt, opts = plan(back, shown)
        opts.pop(DISPLAY_NAME, None)
        return open_image(name, fmt, False, opts, guard=guard), name
    except QimgError as e:
        inner = str(e)
        if inner.startswith("Could not open '"):
            inner = inner.split("': ", 1)[1]
        raise OpenError(f"Could not open '{shown}': Could not open backing file: {inner}") from None
