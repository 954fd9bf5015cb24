"""qimg dd"""

from __future__ import annotations

import sys

import click

from . import PROG
from . import common as c

INT_MAX = (1 << 31) - 1


@click.command("dd", add_help_option=False)
@click.option("--object", "objects", multiple=True, callback=c.objects_now)
@c.image_opts_opt
@c.fmt_opt
@click.option("-O", "out_fmt", default="raw")
@c.force_share_opt
@click.option("-h", "--help", "help_", is_flag=True, callback=c.help_now)
@click.argument("operands", nargs=-1)
def command(objects, image_opts, fmt, out_fmt, force_share, help_, operands):
    from ..api.commands import dd
    from ..errors import QimgError
    from ..options import DISPLAY_NAME

    values: dict = {}
    for operand in operands:
        name, eq, value = operand.partition("=")
        if not eq or name not in ("bs", "count", "if", "of", "skip"):
            raise QimgError(f"unrecognized operand {name if eq else operand}")
        if name == "bs":
            values[name] = c.cvtnum("bs", value, 1, INT_MAX)
        elif name in ("count", "skip"):
            values[name] = c.cvtnum(name, value)
        else:
            values[name] = value
    if "if" not in values or "of" not in values:
        raise QimgError("Must specify both input and output files")
    name, fmt, opts = c.image_spec(values["if"], fmt, image_opts) if values["if"] else ("", fmt, {})

    def warn(message: str) -> None:
        sys.stderr.write(f"{PROG}: {message}\n")

    dd(name, values["of"], fmt=fmt, out_fmt=out_fmt, bs=values.get("bs", 512), count=values.get("count"),
       skip=values.get("skip"), image_options={**opts, DISPLAY_NAME: values["if"]}, warn=warn,
       untrusted=c.policy())
