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
    import sys

    from ..api.args import refuse_shared_write
    from ..api.query import check
    from ..ops.check import validate_repair

    validate_repair(repair)
    c.check_output(output)
    c.check_src_cache(src_cache)
    if repair and force_share:  # the library's check, made before --object and --image-opts are read
        refuse_shared_write(filename)
    c.load_objects(objects)
    name, fmt, opts = c.image_spec(filename, fmt, image_opts)
    res = check(name, fmt=fmt, repair=repair, image_options=opts, warn=c.warn, untrusted=c.policy())
    for msg in res.messages:
        sys.stderr.write(msg + "\n")
    c.echo(res.to_json() if output == "json" else res.human(), quiet)
    if res.exit_code:
        raise click.exceptions.Exit(res.exit_code)
