"""qimg resize"""

from __future__ import annotations

import click

from . import common as c


@click.command("resize", add_help_option=False)
@c.object_opt
@c.image_opts_opt
@c.fmt_opt
@click.option("--preallocation", "prealloc", default=None)
@c.quiet_opt
@click.option("--shrink", "shrink", is_flag=True)
@click.option("-h", "--help", "help_", is_flag=True)
@click.argument("args", nargs=-1)
def command(objects, image_opts, fmt, prealloc, quiet, shrink, help_, args):
    from ..api.edit import resize
    from ..errors import UsageError

    args = tuple(a for a in args if a != "--") if args.count("--") and len(args) > 2 else args
    if len(args) < 2:
        raise UsageError("Not enough arguments")
    if len(args) > 2:
        raise UsageError(f"Invalid argument '{args[2]}'")
    filename, size_text = args
    c.load_objects(objects)
    name, fmt, opts = c.image_spec(filename, fmt, image_opts)
    resize(name, size_text, fmt=fmt, shrink=shrink, preallocation=prealloc, image_options=opts, warn=c.warn,
           untrusted=c.policy())
    c.echo("Image resized.\n", quiet)
