"""dd: copy a byte range of an image into a new image, with qemu-img 7.2's dd rules.

The rules, observed from qemu-img 7.2 (quirks kept on purpose, scripts may rely on them):

* ``count`` limits the *input* to ``count * bs`` bytes counted from offset 0, before ``skip``
  is applied; the output image is created with ``size - skip * bs`` bytes (formats round up,
  raw to 512 bytes), or empty when ``skip`` points past that size.  Skipping too far only
  warns (``<if>: cannot skip to specified offset``) and still exits 0.
* The output is always created anew (an existing file is overwritten) with the ``-O``
  format's default options, and every byte is written, zeros included (no sparse detection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core import registry
from ..core.chain import Chain
from ..errors import QimgError
from ..options import CACHE_UNSAFE
from ..units import round_up

INT64_MAX = (1 << 63) - 1
#: read-only formats (qemu-img cannot create them either)
_NO_CREATE = ("bochs", "cloop", "dmg")


@dataclass
class DdRequest:
    """qemu-img dd's operands and options as plain values."""

    input: str
    output: str
    fmt: str | None = None
    input_options: dict = field(default_factory=dict)
    out_fmt: str = "raw"
    bs: int = 512
    count: int | None = None
    skip: int | None = None
    workers: int = 2
    display_name: str | None = None  # the if= operand as given (an --image-opts string stays one)
    policy: object = None  # qimg.core.policy.Policy (untrusted mode); None: qemu-img's rules


def plan(input_size: int, bs: int, count: int | None, skip: int | None) -> tuple[int, int, bool]:
    """(end of the input range, output size, skip beyond the input) as qemu-img dd computes them."""
    size = input_size
    if count is not None and count <= INT64_MAX // bs and count * bs < size:
        size = count * bs
    skip = skip or 0
    beyond = skip > INT64_MAX // bs or size < skip * bs
    out_size = 0 if beyond else size - skip * bs
    return size, out_size, beyond


def dd(req: DdRequest, warn=None) -> None:
    """Run dd; ``warn(message)`` receives the non-fatal "cannot skip" complaint."""
    from ..engine.copy import ChainSource, CopyOptions, copy_range
    from .create import create_image

    if req.input == "":
        raise QimgError("Could not open '': The 'file' block driver requires a file name")
    with Chain.open(req.input, req.fmt, options=dict(req.input_options), policy=req.policy) as chain:
        if req.out_fmt not in registry.FORMATS:
            raise QimgError("Unknown file format")
        try:
            cls = registry.get_driver(req.out_fmt)
        except QimgError:
            if req.out_fmt in _NO_CREATE:
                raise QimgError(f"Format driver '{req.out_fmt}' does not support image creation") from None
            raise QimgError("Unknown file format") from None
        if not cls.can_create():
            raise QimgError(f"Format driver '{req.out_fmt}' does not support image creation")
        size, out_size, beyond = plan(chain.virtual_size, req.bs, req.count, req.skip)
        try:
            # every qemu format rounds a new image up to whole 512-byte sectors
            create_image(req.output, req.out_fmt, round_up(out_size, 512), {})
        except QimgError as e:
            raise QimgError(f"{req.output}: error while creating output image: {_create_reason(e, req.output)}",
                            e.exit_code) from None
        tgt = registry.open_image(req.output, req.out_fmt, writable=True, options={CACHE_UNSAFE: True},
                                  policy=req.policy)
        try:
            if beyond:
                if warn is not None:
                    warn(f"{req.display_name or req.input}: cannot skip to specified offset")
                start = size
            else:
                start = (req.skip or 0) * req.bs
            if start < size:
                # min_sparse=0: every byte is written, as qemu-img dd does
                opts = CopyOptions(min_sparse=0, target_is_zero=False, workers=max(1, req.workers))
                copy_range(ChainSource(chain), tgt, start, size, opts, dst_offset=-start,
                           cluster_size=tgt.cluster_size)
            tgt.finalize()
            tgt.flush()
        finally:
            tgt.close()


def _create_reason(err: QimgError, output: str) -> str:
    """create's message without its "<file>: " prefix, worded as qemu's file driver words it."""
    msg = str(err)
    if msg.startswith(output + ": "):
        msg = msg[len(output) + 2:]
    prefix = f"Could not open '{output}': "
    if msg.startswith(prefix):
        msg = f"Could not create '{output}': " + msg[len(prefix):]
    return msg
