"""qimg info"""

from __future__ import annotations

import click

from . import common as c


@click.command("info", add_help_option=False)
@c.object_opt
@c.image_opts_opt
@c.fmt_opt
@c.output_opt
@click.option("--backing-chain", "backing_chain", is_flag=True)
@c.force_share_opt
@click.option("-h", "--help", "help_", is_flag=True)
@click.argument("filename")
def command(objects, image_opts, fmt, output, backing_chain, force_share, help_, filename):
    from ..api.query import info
    from .render import info_human, to_json

    c.check_output(output)
    c.load_objects(objects)
    name, fmt, opts = c.image_spec(filename, fmt, image_opts)
    policy = c.policy()
    infos = [i.to_dict() for i in info(name, fmt=fmt, backing_chain=True, image_options=opts, untrusted=policy)] \
        if backing_chain else [info(name, fmt=fmt, image_options=opts, untrusted=policy).to_dict()]
    if output == "json":
        c.echo(to_json(infos if backing_chain else infos[0]))
    else:
        c.echo("\n".join(info_human(i) for i in infos))
