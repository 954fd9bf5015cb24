"""qimg map"""

from __future__ import annotations

import itertools
import sys

import click

from . import common as c


@click.command("map", add_help_option=False)
@click.option("--object", "objects", multiple=True, callback=c.objects_now)
@c.image_opts_opt
@c.fmt_opt
@click.option("--start-offset", "start_offset", default=None, callback=c.size_now("start offset"))
@click.option("--max-length", "max_length", default=None, callback=c.size_now("max length"))
@c.output_opt
@c.force_share_opt
@click.option("-h", "--help", "help_", is_flag=True, callback=c.help_now)
@click.argument("filenames", nargs=-1)
def command(objects, image_opts, fmt, start_offset, max_length, output, force_share, help_, filenames):
    from ..api.image import open as open_image
    from ..errors import QimgError, UsageError
    from ..ops.map import check_human
    from .render import map_human_header, map_human_line, map_json_line

    start = start_offset or 0
    length = max_length
    if len(filenames) != 1:
        raise UsageError("Expecting one image file name")
    c.check_output(output)
    name, fmt, opts = c.image_spec(filenames[0], fmt, image_opts)
    out = sys.stdout
    with open_image(name, fmt, options=opts, untrusted=c.policy()) as image:
        entries = image.extents(start, length)
        try:
            head = next(entries)  # errors opening a layer lazily come before any output
        except QimgError as e:
            if str(e).startswith("Could not read file metadata"):
                # a failing block status: qemu-img has printed its header (or "[") already
                out.write("[" if output == "json" else map_human_header())
            raise
        entries = itertools.chain((head,), entries)
        if output == "json":
            out.write("[")
            first = True
            for entry in entries:
                if not first:
                    out.write(",\n")
                out.write(map_json_line(entry))
                first = False
            out.write("]\n")
        else:
            out.write(map_human_header())
            for entry in entries:
                check_human(entry)
                if entry.data and not entry.zero:
                    out.write(map_human_line(entry))
