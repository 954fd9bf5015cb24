"""qimg measure"""

from __future__ import annotations

import sys

import click

from . import PROG
from . import common as c


class _MeasureCommand(click.Command):
    """qemu-img measure treats a bad option like -h: getopt's complaint, then the usage text, status 0."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoSuchOption as e:
            name = e.option_name
            if name.startswith("--"):
                sys.stderr.write(f"measure: unrecognized option '{name}'\n")
            else:
                sys.stderr.write(f"measure: invalid option -- '{name[1:2]}'\n")
        except click.exceptions.BadOptionUsage as e:
            name = e.option_name or ""
            if name.startswith("--"):
                sys.stderr.write(f"measure: option '{name}' requires an argument\n")
            else:
                sys.stderr.write(f"measure: option requires an argument -- '{name[1:2]}'\n")
        c.show_help()


@click.command("measure", cls=_MeasureCommand, add_help_option=False)
@click.option("--object", "objects", multiple=True, callback=c.objects_now)
@c.image_opts_opt
@c.fmt_opt
@click.option("--output", "output", default=None, callback=c.output_now)
@c.force_share_opt
@click.option("--size", "size", default=None, callback=c.size_now("image size"))
@click.option("-O", "out_fmt", default="raw")
@click.option("-o", "options", multiple=True)
@click.option("-l", "snapshot_param", default=None)
@click.option("-h", "--help", "help_", is_flag=True, callback=c.help_now)
@click.argument("filenames", nargs=-1)
def command(objects, image_opts, fmt, output, force_share, size, out_fmt, options, snapshot_param, help_,
            filenames):
    from ..api.commands import measure
    from ..errors import QimgError
    from ..ops.measure import MeasureOptionsError, human

    if len(filenames) > 1:
        raise QimgError("At most one filename argument is allowed.")
    name, opts = None, ({} if image_opts else None)
    if filenames:
        name, fmt, opts = c.image_spec(filenames[0], fmt, image_opts)
    try:
        result = measure(name, size=size, fmt=fmt, out_fmt=out_fmt, options=list(options), snapshot=snapshot_param,
                         image_options=opts, untrusted=c.policy())
    except MeasureOptionsError as e:
        # the option's own message keeps qemu's unprefixed continuation lines
        first, _, rest = e.detail.partition("\n")
        sys.stderr.write(f"{PROG}: {first}\n" + (rest + "\n" if rest else ""))
        raise QimgError(e.summary) from None
    c.echo(result.to_json() if output == "json" else human(result.to_dict()))
