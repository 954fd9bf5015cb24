"""qimg rebase"""

from __future__ import annotations

import click

from . import common as c


@click.command("rebase", add_help_option=False)
@c.object_opt
@c.image_opts_opt
@c.force_share_opt
@c.quiet_opt
@c.fmt_opt
@click.option("-t", "cache", default=None)
@click.option("-T", "src_cache", default=None)
@click.option("-p", "progress", is_flag=True)
@click.option("-u", "unsafe", is_flag=True)
@click.option("-b", "backing", default=None)
@click.option("-F", "backing_fmt", default=None)
@click.option("-h", "--help", "help_", is_flag=True)
@click.argument("filename")
def command(objects, image_opts, force_share, quiet, fmt, cache, src_cache, progress, unsafe, backing, backing_fmt,
            help_, filename):
    from ..api.edit import check_rebase_args, rebase
    from ..engine.progress import Progress

    check_rebase_args(backing, unsafe, cache, src_cache)  # before --object and --image-opts are read
    # -U shares the backing files only: the image itself is opened read-write (qemu-img ignores -U for it)
    c.load_objects(objects)
    name, fmt, opts = c.image_spec(filename, fmt, image_opts)
    prog = Progress(0, enabled=progress and not quiet)
    rebase(name, backing, fmt=fmt, backing_fmt=backing_fmt, unsafe=unsafe, cache=cache, src_cache=src_cache,
           image_options=opts, progress=prog, warn=c.warn, untrusted=c.policy())
