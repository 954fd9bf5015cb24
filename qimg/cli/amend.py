"""qimg amend"""

from __future__ import annotations

import click

from . import common as c


@click.command("amend", add_help_option=False)
@c.object_opt
@c.image_opts_opt
@click.option("-p", "progress", is_flag=True)
@c.quiet_opt
@c.fmt_opt
@click.option("-t", "cache", default=None)
@click.option("--force", "force", is_flag=True)
@click.option("-o", "options", multiple=True)
@click.option("-h", "--help", "help_", is_flag=True)
@click.argument("filename", required=False)
def command(objects, image_opts, progress, quiet, fmt, cache, force, options, help_, filename):
    from ..api.edit import amend, amend_check_args
    from ..errors import UsageError
    from ..ops.amend import amend_help
    from ..options import merge_opts

    opts = merge_opts(list(options))
    if options and ("help" in opts or "?" in opts):
        c.check_cache(cache)
        if filename is None and fmt is None:
            raise UsageError("Expecting one image file name")
        if fmt is None:
            from ..core import registry

            drv = registry.open_image(filename, None, policy=c.policy())
            fmt = drv.format_name
            drv.close()
        c.echo(amend_help(fmt))
        return
    amend_check_args(cache, opts)  # the library's own checks, made before the name and --object are read
    if filename is None:
        raise UsageError("Expecting one image file name")
    c.load_objects(objects)
    name, fmt, open_opts = c.image_spec(filename, fmt, image_opts)
    amend(name, opts, fmt=fmt, force=force, cache=cache, image_options=open_opts, warn=c.warn,
          untrusted=c.policy())
