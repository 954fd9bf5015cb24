"""qimg snapshot"""

from __future__ import annotations

import click

from . import common as c


@click.command("snapshot", add_help_option=False)
@c.object_opt
@c.image_opts_opt
@c.force_share_opt
@c.quiet_opt
@click.option("-l", "do_list", is_flag=True)
@click.option("-a", "apply_name", default=None)
@click.option("-c", "create_name", default=None)
@click.option("-d", "delete_name", default=None)
@click.option("-h", "--help", "help_", is_flag=True)
@click.argument("filename")
def command(objects, image_opts, force_share, quiet, do_list, apply_name, create_name, delete_name, help_,
            filename):
    from ..api import edit
    from ..api.args import refuse_shared_write
    from ..api.query import snapshot_list
    from ..errors import UsageError
    from .render import snapshot_table

    actions = [a for a in (do_list and ("list", None), apply_name is not None and ("apply", apply_name),
                           create_name is not None and ("create", create_name),
                           delete_name is not None and ("delete", delete_name)) if a]
    if len(actions) > 1:
        raise UsageError("Cannot mix '-l', '-a', '-c', '-d'")
    fmt = None   # qemu-img snapshot has no -f (--image-opts names a driver)
    if not actions:
        # qemu-img opens the image read-write and does nothing else
        from ..core import registry

        c.load_objects(objects)
        fname, fmt, opts = c.image_spec(filename, fmt, image_opts)
        registry.open_image(fname, fmt, writable=not force_share, options=opts, warn=c.warn,
                            policy=c.policy()).close()
        return
    action, name = actions[0]
    if force_share and action != "list":
        refuse_shared_write(filename)  # the library's refusal, before --object and --image-opts are read
    c.load_objects(objects)
    fname, fmt, opts = c.image_spec(filename, fmt, image_opts)
    if action == "list":
        snaps = snapshot_list(fname, fmt=fmt, image_options=opts, untrusted=c.policy())
        if snaps:
            c.echo("Snapshot list:\n" + "\n".join(snapshot_table([s.to_dict() for s in snaps])) + "\n", quiet)
        return
    run = {"create": edit.snapshot_create, "apply": edit.snapshot_apply, "delete": edit.snapshot_delete}[action]
    run(fname, name, fmt=fmt, image_options=opts, warn=c.warn, untrusted=c.policy())
