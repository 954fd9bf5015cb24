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
    from ..engine.progress import Progress
    from ..errors import QimgError
    from ..ops.commit import commit

    c.check_cache(cache)
    if rate is not None:
        from ..units import parse_size

        if parse_size(rate) is None:
            raise QimgError("Invalid rate limit specified")
    c.load_objects(objects)
    name, fmt, opts = c.image_spec(filename, fmt, image_opts)
    prog = Progress(0, enabled=progress and not quiet)
    commit(name, fmt, base=base, drop=drop, options=opts, progress=prog, warn=c.warn)
    c.echo("Image committed.\n", quiet)
