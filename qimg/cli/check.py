"""qimg check"""

from __future__ import annotations

import click

from . import common as c


@click.command("check", add_help_option=False)
@c.object_opt
@c.image_opts_opt
@c.quiet_opt
@c.fmt_opt
@c.output_opt
@click.option("-r", "repair", default=None)
@click.option("-T", "src_cache", default=None)
@c.force_share_opt
@click.option("-h", "--help", "help_", is_flag=True)
@click.argument("filename")
def command(objects, image_opts, quiet, fmt, output, repair, src_cache, force_share, help_, filename):
    from ..errors import QimgError, UsageError
    from ..ops.check import check_image, result_dict
    from .render import to_json

    if repair is not None and repair not in ("leaks", "all"):
        raise UsageError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}")
    c.check_output(output)
    c.check_src_cache(src_cache)
    if repair and force_share:
        raise QimgError(f"Could not open '{filename}': force-share=on can only be used with read-only images")
    c.load_objects(objects)
    name, fmt, opts = c.image_spec(filename, fmt, image_opts)
    res, fmt_name = check_image(name, fmt, repair, opts, warn=c.warn if repair else None)
    import sys

    for msg in getattr(res, "messages", None) or ():
        sys.stderr.write(msg.rstrip("\n") + "\n")
    if output == "json":
        c.echo(to_json(result_dict(res, name, fmt_name)), quiet)
    else:
        c.echo(_human(res), quiet)
    code = res.exit_code
    if code:
        raise click.exceptions.Exit(code)


def _human(res):
    from ..ops.check import human

    return human(res)
