"""qimg create"""

from __future__ import annotations

import sys

import click

from . import common as c


@click.command("create", add_help_option=False)
@c.object_opt
@c.quiet_opt
@click.option("-f", "fmt", default="raw")
@click.option("-b", "backing_file", default=None)
@click.option("-F", "backing_fmt", default=None)
@click.option("-u", "unsafe", is_flag=True)
@click.option("-o", "options", multiple=True)
@click.argument("filename", required=False)
@click.argument("size", required=False)
def command(objects, quiet, fmt, backing_file, backing_fmt, unsafe, options, filename, size):
    from ..api.commands import create
    from ..errors import UsageError
    from ..ops.create import options_help
    from ..options import merge_opts

    c.load_objects(objects)
    opts = merge_opts(list(options))
    if "help" in opts or "?" in opts:
        c.echo(options_help(fmt, filename))
        return
    if filename is None:
        raise UsageError("Expecting image file name")
    create(filename, size, fmt=fmt, options=opts, backing_file=backing_file, backing_fmt=backing_fmt, unsafe=unsafe,
           announce=lambda line: (c.echo(line, quiet), sys.stdout.flush()), untrusted=c.policy())
