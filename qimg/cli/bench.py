"""qimg bench: options as qemu-img 7.2 takes them; the benchmark itself is not provided."""

from __future__ import annotations

import click

from . import common as c


@click.command("bench", add_help_option=False)
@click.option("-c", "count", default=None)
@click.option("-d", "depth", default=None)
@c.fmt_opt
@click.option("--flush-interval", "flush_interval", default=None)
@click.option("-i", "aio", default=None)
@click.option("-n", "native", is_flag=True)
@click.option("--no-drain", "no_drain", is_flag=True)
@click.option("-o", "offset", default=None)
@click.option("--pattern", "pattern", default=None)
@c.quiet_opt
@click.option("-s", "buf_size", default=None)
@click.option("-S", "step", default=None)
@click.option("-t", "cache", default=None)
@click.option("-w", "write", is_flag=True)
@c.force_share_opt
@c.object_opt
@c.image_opts_opt
@click.option("-h", "--help", "help_", is_flag=True)
@click.argument("filenames", nargs=-1)
def command(count, depth, fmt, flush_interval, aio, native, no_drain, offset, pattern, quiet, buf_size, step, cache,
            write, force_share, objects, image_opts, help_, filenames):
    from ..core import registry
    from ..errors import QimgError, UsageError
    from ..units import parse_size

    def number(v, what):
        try:
            n = int(v, 0)
        except ValueError:
            n = -1
        if n < 1 or n > (1 << 31) - 1:
            raise QimgError(f"Invalid {what} specified")
        return n

    if count is not None:
        number(count, "request count")
    if depth is not None:
        number(depth, "queue depth")
    for value, what in ((buf_size, "buffer size"), (step, "step size")):
        if value is not None:
            try:
                v = parse_size(value)
            except UsageError:
                v = None
            if v is None:
                raise QimgError(f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes for\n"
                                "qimg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    c.check_cache(cache)
    if len(filenames) != 1:
        raise UsageError("Expecting one image file name")
    c.load_objects(objects)
    if write and force_share:
        raise QimgError(f"Could not open '{filenames[0]}': force-share=on can only be used with read-only images")
    name, fmt, opts = c.image_spec(filenames[0], fmt, image_opts)
    registry.open_image(name, fmt, writable=write, options=opts).close()
    raise QimgError("bench is not supported by qimg (it measures QEMU's block layer); use qemu-img bench")
