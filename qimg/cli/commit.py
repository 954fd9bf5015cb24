"""qimg commit"""

from __future__ import annotations

import click

from . import common as c


@click.command("commit", add_help_option=False)
@c.object_opt
@c.image_opts_opt
@c.quiet_opt
@c.fmt_opt
@click.option("-t", "cache", default=None)
@click.option("-b", "base", default=None)
@click.option("-r", "rate", default=None)
@click.option("-d", "drop", is_flag=True)
@click.option("-p", "progress", is_flag=True)
@click.option("-h", "--help", "help_", is_flag=True)
@click.argument("filename")
def command(objects, image_opts, quiet, fmt, cache, base, rate, drop, progress, help_, filename):
    from ..api.edit import check_commit_args, commit
    from ..engine.progress import Progress

    check_commit_args(cache, rate)  # before --object and --image-opts are read, as qemu-img
    c.load_objects(objects)
    name, fmt, opts = c.image_spec(filename, fmt, image_opts)
    prog = Progress(0, enabled=progress and not quiet)
    commit(name, fmt=fmt, base=base, drop=drop, cache=cache, rate=rate, image_options=opts, progress=prog,
           warn=c.warn, untrusted=c.policy())
    c.echo("Image committed.\n", quiet)
