"""qimg convert"""

from __future__ import annotations

import click

from . import common as c


@click.command("convert", add_help_option=False)
@c.object_opt
@c.image_opts_opt
@click.option("--target-image-opts", "target_image_opts", is_flag=True)
@click.option("--target-is-zero", "target_is_zero", is_flag=True)
@click.option("--bitmaps", "bitmaps", is_flag=True)
@click.option("--skip-broken-bitmaps", "skip_broken_bitmaps", is_flag=True)
@c.force_share_opt
@click.option("-C", "copy_offload", is_flag=True)
@click.option("-c", "compress", is_flag=True)
@click.option("-p", "progress", is_flag=True)
@click.option("--progress", "progress_format", default=None)
@c.quiet_opt
@click.option("-n", "no_create", is_flag=True)
@c.fmt_opt
@c.cache_opts
@click.option("-O", "out_fmt", default="raw")
@click.option("-B", "backing", default=None)
@click.option("-F", "backing_fmt", default=None)
@click.option("-o", "options", multiple=True)
@click.option("-l", "snapshot_param", default=None)
@click.option("-S", "sparse", default=None)
@click.option("-r", "rate", default=None)
@click.option("-m", "coroutines", default="8")
@click.option("-W", "out_of_order", is_flag=True)
@click.option("--salvage", "salvage", is_flag=True)
@click.argument("filenames", nargs=-1)
def command(objects, image_opts, target_image_opts, target_is_zero, bitmaps, skip_broken_bitmaps, force_share,
            copy_offload, compress, progress, progress_format, quiet, no_create, fmt, cache, src_cache, out_fmt,
            backing, backing_fmt, options, snapshot_param, sparse, rate, coroutines, out_of_order, salvage, filenames):
    from ..api.commands import convert
    from ..engine.progress import Tracker
    from ..ops.create import options_help
    from ..options import merge_opts
    from .signals import watch

    c.load_objects(objects)
    c.check_cache(cache)
    c.check_src_cache(src_cache)
    opts = merge_opts(list(options))
    if "help" in opts or "?" in opts:
        c.echo(options_help(out_fmt, filenames[-1] if len(filenames) >= 2 else None))
        return
    sources = [c.image_spec(f, fmt, image_opts) for f in filenames[:-1]]
    target, target_options = (filenames[-1] if filenames else ""), None
    if target_image_opts:
        target_options = {}  # given as image options: the library refuses them without -n
        if no_create:
            target, tfmt, target_options = c.image_spec(target, None, True)
            out_fmt = tfmt or out_fmt
    view = c.progress_view(progress, progress_format, quiet)
    tracker = Tracker(view)
    watch("convert", tracker)  # what SIGUSR1 reports
    c.run_with_progress(view, lambda: convert(
            [s[0] for s in sources], target, fmt=[s[1] for s in sources], out_fmt=out_fmt, compress=compress,
            options=opts, backing_file=backing, backing_fmt=backing_fmt, sparse_size=sparse, no_create=no_create,
            target_is_zero=target_is_zero, coroutines=coroutines, out_of_order=out_of_order,
            snapshot=snapshot_param, copy_offload=copy_offload, salvage=salvage, bitmaps=bitmaps,
            skip_broken_bitmaps=skip_broken_bitmaps, image_options=[s[2] for s in sources],
            target_options=target_options, progress=tracker, warn=c.warn_report, note=None if quiet else c.note,
            untrusted=c.policy()))
