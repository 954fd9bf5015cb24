"""qimg bitmap: add, remove, clear, enable, disable and merge persistent dirty bitmaps (qcow2)."""

from __future__ import annotations

import click

from . import common as c


@click.command("bitmap", add_help_option=False)
# --add ... --merge SRC in their command-line order (see cli._preprocess)
@click.option("--action", "action_args", multiple=True, hidden=True)
@click.option("--merge", "merge_alone", default=None, hidden=True)
@click.option("-b", "source", default=None)
@click.option("-F", "source_fmt", default=None)
@click.option("-g", "granularity", default=None)
@c.object_opt
@c.image_opts_opt
@c.fmt_opt
@click.option("-h", "--help", "help_", is_flag=True)
@click.argument("args", nargs=-1)
def command(action_args, merge_alone, source, source_fmt, granularity, objects, image_opts, fmt, help_, args):
    from ..errors import QimgError
    from ..ops.bitmap import bitmap

    actions = [(a.split("=", 1)[0], a.split("=", 1)[1] if a.startswith("merge=") else None) for a in action_args]
    gran = None
    if granularity is not None:
        gran = c.cvtnum("granularity", granularity)
    if not actions:
        raise QimgError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    if gran is not None and not any(k == "add" for k, _ in actions):
        raise QimgError("granularity only supported with --add")
    if source_fmt and not source:
        raise QimgError("-F only supported with -b")
    if source and not any(k == "merge" for k, _ in actions):
        raise QimgError("Merge bitmap source file only supported with --merge")
    if len(args) != 2:
        raise QimgError("Expecting filename and bitmap name")
    c.load_objects(objects)
    name, fmt, opts = c.image_spec(args[0], fmt, image_opts)
    bitmap(name, fmt, opts, args[1], actions, gran, source, source_fmt, warn=c.warn, policy=c.policy())
