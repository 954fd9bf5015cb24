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
            copy_offload,
            compress, progress, quiet, no_create, fmt, cache, src_cache, out_fmt, backing, backing_fmt, options,
            snapshot_param, sparse, rate, coroutines, out_of_order, salvage, filenames):
    from ..engine.progress import Progress
    from ..errors import QimgError, UsageError
    from ..ops.convert import ConvertRequest, convert
    from ..ops.create import options_help
    from ..options import merge_opts, parse_opts

    c.load_objects(objects)
    c.check_cache(cache)
    c.check_src_cache(src_cache)
    opts = merge_opts(list(options))
    if "help" in opts or "?" in opts:
        c.echo(options_help(out_fmt, filenames[-1] if len(filenames) >= 2 else None))
        return
    if copy_offload and compress:
        raise QimgError("Cannot enable copy offloading when -c is used")
    if copy_offload and sparse is not None:
        raise QimgError("Cannot enable copy offloading when -S is used")
    if copy_offload and salvage:
        raise QimgError("Cannot use copy offloading in salvaging mode")
    if len(filenames) < 2:
        raise QimgError("Must specify image file name")
    min_sparse = 4096
    if sparse is not None:
        v = c.cvtnum("buffer size for sparse output", sparse)
        if v % 512 or v > (16 << 20):
            raise QimgError("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 "
                            "up to 16777216. Select 0 to disable sparse detection (fully allocates output).")
        min_sparse = v
    try:
        workers = int(coroutines)
    except ValueError:
        workers = 0
    if workers < 1 or workers > 16:
        raise QimgError("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    snapshot = None
    if snapshot_param is not None:
        # like qemu-img 7.2 (which no longer takes -s): "snapshot.id=..,snapshot.name=.." or a plain id or name
        if snapshot_param.startswith("snapshot."):
            p = parse_opts(snapshot_param)
            for k in p:
                if k not in ("snapshot.id", "snapshot.name"):
                    from . import PROG

                    raise QimgError(f"Invalid parameter '{k}'\n"
                                    f"{PROG}: Failed in parsing snapshot param '{snapshot_param}'")
            snapshot = {k[len("snapshot."):]: v for k, v in p.items()}
        else:
            snapshot = {"id_or_name": snapshot_param}
    if "backing_file" in opts and backing is None:
        backing = opts.pop("backing_file")
    if "backing_fmt" in opts and backing_fmt is None:
        backing_fmt = opts.pop("backing_fmt")
    from ..io.lock import EXCLUSIVE_READ

    # qemu-img convert keeps writers off its sources while it copies (even raw ones), unless -U
    sources = [(n, f, {**o, EXCLUSIVE_READ: True}) for n, f, o in (c.image_spec(f, fmt, image_opts)
                                                                  for f in filenames[:-1])]
    target = filenames[-1]
    target_options = {}
    if target_image_opts:
        if not no_create:
            raise UsageError("--target-image-opts requires use of -n flag")
        target, tfmt, target_options = c.image_spec(target, None, True)
        out_fmt = tfmt or out_fmt
    req = ConvertRequest(
        sources=sources, target=target, out_fmt=out_fmt, options=opts, compress=compress, backing=backing,
        backing_fmt=backing_fmt, min_sparse=min_sparse, no_create=no_create, target_is_zero=target_is_zero,
        workers=workers, out_of_order=out_of_order, snapshot=snapshot, target_options=target_options,
        salvage=salvage, copy_offload=copy_offload, bitmaps=bitmaps, skip_broken_bitmaps=skip_broken_bitmaps)
    prog = Progress(0, enabled=progress and not quiet)
    convert(req, progress=prog, warn=c.warn_report)

