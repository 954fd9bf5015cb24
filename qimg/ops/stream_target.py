"""convert to a pipe, FIFO or socket (``/dev/stdout`` in a pipeline).

Only layouts that can be written front to back go down a pipe: raw, a fixed VHD (vpc
``subformat=fixed``), a streamOptimized VMDK, and qcow2 without -c; the driver writes as it does into
a file, through a ``SequentialStore``, so the bytes are the ones the same convert writes to a file.
qcow2 writes its tables after the data they map: a first pass over the source (``LayoutStore``)
computes the metadata, and the second sends it in place, in order, with the data (``Replay``).
Everything that needs to seek is refused before anything is written, with the reason.
"""

from __future__ import annotations

from ..core import registry
from ..errors import QimgError

#: format -> (option, the values that stream, what to say otherwise)
_STREAMABLE = {
    "raw": None,
    "vpc": ("subformat", ("fixed",), "vpc goes down a pipe only as a fixed image (-o subformat=fixed)"),
    "vmdk": ("subformat", ("streamOptimized",),
             "vmdk goes down a pipe only as a stream (-o subformat=streamOptimized)"),
    # its layout is learned in a first pass over the source, then written front to back in a second
    "qcow2": None,
}
#: formats written in two passes (the source is read twice: it must be a file)
TWO_PASS = ("qcow2",)


def check_streamable(req) -> None:
    """Refuse, with the reason, what cannot be written front to back."""
    what = f"Cannot convert to the pipe '{req.target}'"
    if req.no_create:
        raise QimgError(f"{what} with -n: a pipe holds no image to write into")
    if req.bitmaps:
        raise QimgError(f"{what}: --bitmaps needs an image that can be rewritten")
    if req.out_fmt not in _STREAMABLE:
        ok = "raw, vpc (subformat=fixed), vmdk (subformat=streamOptimized), qcow2 (without -c)"
        raise QimgError(f"{what}: the {req.out_fmt} format needs to seek while it is written; "
                        f"formats that can go down a pipe: {ok}")
    rule = _STREAMABLE[req.out_fmt]
    if rule is not None:
        key, values, reason = rule
        default = "dynamic" if req.out_fmt == "vpc" else "monolithicSparse"
        if req.options.get(key, default) not in values:
            raise QimgError(f"{what}: {reason}")
    if req.out_fmt == "qcow2" and (req.options.get("data_file") or req.options.get("encrypt.format")
                                   or req.options.get("encryption") not in (None, "off", "false")):
        raise QimgError(f"{what}: a qcow2 image with a data file or encryption needs a file")
    if req.compress and req.out_fmt != "vmdk":
        raise QimgError(f"{what}: compression needs to seek in the {req.out_fmt} format")
    if req.backing:
        raise QimgError(f"{what}: a backing file needs a format that records it and seeks")
    if req.options.get("preallocation", "off") not in ("off", "full"):
        raise QimgError(f"{what}: preallocation={req.options['preallocation']} needs a file")


def _pipe_files(name: str, store):
    """``store_for`` of an Opener writing on the pipe: the image's own name is the pipe, any other file is
    refused (these formats write one file)."""
    from ..io.stream import Borrowed

    def store_for(path, create):
        if path != name:
            raise QimgError(f"Cannot convert to the pipe '{name}': the image needs the file '{path}'")
        return Borrowed(store)
    return store_for


def convert_to_stream(req, src, total, progress, target, copy, copy_opts) -> None:
    """Create the image on the pipe and copy ``src`` into it, front to back."""
    from dataclasses import replace

    from ..io.stream import Borrowed, SequentialStore
    from ..io.target import open_stream
    from .create import RedirectingOpener, create_image

    check_streamable(req)
    cls = registry.get_driver(req.out_fmt)

    def write_image(store, tracker):
        files = _pipe_files(target.name, store)
        try:
            create_image(target.name, req.out_fmt, total, dict(req.options), policy=req.policy, store_for=files)
        except QimgError as e:
            msg = str(e).removeprefix(f"{req.target}: ")
            raise type(e)(f"{req.target}: error while converting {req.out_fmt}: {msg}", e.exit_code) from None
        opener = RedirectingOpener(target.name, writable=True, store_for=files)
        tgt = cls.open(Borrowed(store), target.name, writable=True, opener=opener, options={})
        try:
            opts = replace(copy_opts, in_order=True, target_is_zero=tgt.has_zero_init)
            copy(req, src, tgt, total, opts, tracker)
            tgt.finalize()
        finally:
            tgt.close()

    out = SequentialStore(open_stream(target.name, write=True), target.name)
    try:
        if req.out_fmt in TWO_PASS:
            from ..io.stream import LayoutStore, Replay

            layout = LayoutStore(target.name)
            write_image(layout, None)  # the first pass only learns where everything goes
            write_image(Replay(out, layout), progress)
        else:
            write_image(out, progress)
        out.finish()
        if progress is not None:
            progress.finish()
    finally:
        out.close()
