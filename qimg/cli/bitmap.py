"""qimg bitmap: options as qemu-img 7.2 takes them; changing persistent bitmaps is not provided."""

from __future__ import annotations

import click

from . import common as c


@click.command("bitmap", add_help_option=False)
@click.option("--merge", "merge", multiple=True)
@click.option("--add", "add", is_flag=True)
@click.option("--remove", "remove", is_flag=True)
@click.option("--clear", "clear", is_flag=True)
@click.option("--enable", "enable", is_flag=True)
@click.option("--disable", "disable", is_flag=True)
@click.option("-b", "source", default=None)
@click.option("-F", "source_fmt", default=None)
@click.option("-g", "granularity", default=None)
@c.object_opt
@c.image_opts_opt
@c.fmt_opt
@click.option("-h", "--help", "help_", is_flag=True)
@click.argument("args", nargs=-1)
def command(merge, add, remove, clear, enable, disable, source, source_fmt, granularity, objects, image_opts, fmt,
            help_, args):
    from ..errors import QimgError, UsageError

    if not (merge or add or remove or clear or enable or disable):
        raise QimgError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    if len(args) < 2:
        raise QimgError("Expecting filename and bitmap name")
    if len(args) > 2:
        raise UsageError(f"Unexpected argument: {args[2]}")
    from ..core import registry

    c.load_objects(objects)
    name, fmt, opts = c.image_spec(args[0], fmt, image_opts)
    registry.open_image(name, fmt, writable=True, options=opts, warn=c.warn).close()
    raise QimgError("bitmap is not supported by qimg: persistent dirty bitmaps cannot be changed; "
                    "use qemu-img bitmap")
