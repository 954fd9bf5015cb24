"""Options shared by the subcommands, and small helpers for the click commands."""

from __future__ import annotations

import sys

import click


def policy():
    """The open policy of this run (set by the root group's global options)."""
    from ..core.policy import Policy

    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, Policy) else Policy()


def object_opt(f):
    return click.option("--object", "objects", multiple=True, help="object definition")(f)


def image_opts_opt(f):
    return click.option("--image-opts", "image_opts", is_flag=True)(f)


def _force_share_now(ctx, param, value):
    """-U: the command's read-only opens (and their backing files) refuse nothing to other users."""
    if value:
        from ..io.lock import sharing

        ctx.with_resource(sharing(True))
    return value


def force_share_opt(f):
    return click.option("-U", "--force-share", "force_share", is_flag=True, callback=_force_share_now)(f)


def quiet_opt(f):
    return click.option("-q", "quiet", is_flag=True)(f)


def fmt_opt(f):
    return click.option("-f", "fmt", default=None)(f)


def output_opt(f):
    return click.option("--output", "output", default="human")(f)


def cache_opts(f):
    f = click.option("-t", "cache", default=None)(f)
    return click.option("-T", "src_cache", default=None)(f)


from ..api.args import CACHE_MODES, check_cache, check_src_cache  # noqa: E402,F401 - the library's checks


def load_objects(objects) -> None:
    from ..objects import add_objects

    add_objects(objects)


def image_spec(filename: str, fmt: str | None, image_opts: bool) -> tuple[str, str | None, dict]:
    """(filename, format, options) from a filename or an --image-opts string."""
    if image_opts:
        from ..objects import parse_image_opts

        if fmt is not None:
            from ..errors import QimgError

            raise QimgError("--image-opts and --format are mutually exclusive")
        from ..options import DISPLAY_NAME

        name, fmt, options = parse_image_opts(filename)
        _share_backing_files(options)
        options[DISPLAY_NAME] = filename
        return name, fmt, options
    if filename.startswith("json:"):
        from ..core.imageopts import expand

        return expand(filename, fmt, {})
    return filename, fmt, {}


def _share_backing_files(options: dict) -> None:
    """force-share=on in --image-opts reaches the image's backing files too, as in qemu-img."""
    from ..io import lock

    ctx = click.get_current_context(silent=True)
    if ctx is not None and lock.flag(options.get(lock.FORCE_SHARE)):
        ctx.with_resource(lock.sharing(True))


def check_output(output: str) -> str:
    if output not in ("human", "json"):
        from ..errors import QimgError

        raise QimgError("--output must be used with human or json as argument.")
    return output


def warn(message: str) -> None:
    sys.stderr.write(f"WARNING: {message}\n")


def warn_report(message: str) -> None:
    """A warning as qemu's warn_report prints it: ``qimg: warning: ...``."""
    from . import PROG

    sys.stderr.write(f"{PROG}: warning: {message}\n")


def note(message: str) -> None:
    """Something the user should know, not a warning (silenced by -q): ``qimg: ...`` on stderr."""
    from . import PROG

    sys.stderr.write(f"{PROG}: {message}\n")


def echo(text: str, quiet: bool = False) -> None:
    if not quiet:
        sys.stdout.write(text)


def cvtnum(name: str, text: str, minimum: int = 0, maximum: int = (1 << 63) - 1) -> int:
    """A size argument checked as qemu-img's cvtnum does (the library's check: qimg.units.cvtnum)."""
    from ..units import cvtnum as _cvtnum

    return _cvtnum(name, text, minimum, maximum)


def show_help() -> None:
    """Print the running command's help and exit 0 (qemu-img prints its whole usage text)."""
    from . import command_help_text, help_text

    ctx = click.get_current_context(silent=True)
    name = ctx.command.name if ctx is not None and ctx.command is not None else ""
    from .usage import syntax

    sys.stdout.write(command_help_text(name) if name in syntax() else help_text())
    raise click.exceptions.Exit(0)


def objects_now(ctx, param, value):
    """--object callback: objects are created while options are read (qemu-img's order of errors)."""
    load_objects(value)
    return value


def output_now(ctx, param, value):
    """--output callback for commands that check the format while reading options."""
    return check_output(value) if value is not None else "human"


def size_now(name: str, minimum: int = 0, maximum: int = (1 << 63) - 1):
    """A callback parsing a size option with cvtnum while options are read."""
    def callback(ctx, param, value):
        return None if value is None else cvtnum(name, value, minimum, maximum)
    return callback


def help_now(ctx, param, value):
    """-h/--help callback: the usage text as soon as the option is read."""
    if value:
        show_help()
    return value


def progress_view(flag: bool, fmt: str | None, quiet: bool):
    """The renderer a command's progress goes to: ``-p`` (a tqdm bar on a terminal, qemu-img's lines
    otherwise; silenced by -q), ``--progress=json`` (JSON lines on stderr), or None."""
    from ..engine import progress as p

    if fmt is not None and fmt not in ("json", "human"):
        from ..errors import UsageError

        raise UsageError(f"--progress must be human or json, not '{fmt}'")
    if fmt == "json":
        return p.JsonLines()
    if not (flag or fmt == "human") or quiet:
        return None
    if sys.stderr.isatty():
        try:
            return p.Bar(0)
        except ImportError:
            pass
    return p.QemuLines()


def run_with_progress(view, fn):
    """Run ``fn``; the renderer's last line says how it ended."""
    if view is None:
        return fn()
    status = "failed"
    try:
        result = fn()
        status = "completed"
        return result
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        view.close(status)
