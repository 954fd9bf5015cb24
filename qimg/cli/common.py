"""Options shared by the subcommands, and small helpers for the click commands."""

from __future__ import annotations

import sys

import click

from ..errors import UsageError


def object_opt(f):
    return click.option("--object", "objects", multiple=True, help="object definition")(f)


def image_opts_opt(f):
    return click.option("--image-opts", "image_opts", is_flag=True)(f)


def force_share_opt(f):
    return click.option("-U", "--force-share", "force_share", is_flag=True)(f)


def quiet_opt(f):
    return click.option("-q", "quiet", is_flag=True)(f)


def fmt_opt(f):
    return click.option("-f", "fmt", default=None)(f)


def output_opt(f):
    return click.option("--output", "output", default="human")(f)


def cache_opts(f):
    f = click.option("-t", "cache", default=None)(f)
    return click.option("-T", "src_cache", default=None)(f)


CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")


def check_cache(mode: str | None) -> None:
    if mode is not None and mode not in CACHE_MODES:
        raise UsageError(f"Invalid cache option: {mode}")


def load_objects(objects) -> None:
    from ..objects import add_object

    for obj in objects or ():
        add_object(obj)


def image_spec(filename: str, fmt: str | None, image_opts: bool) -> tuple[str, str | None, dict]:
    """(filename, format, options) from a filename or an --image-opts string."""
    if image_opts:
        from ..objects import parse_image_opts

        if fmt is not None:
            raise UsageError("--image-opts and --format are mutually exclusive")
        return parse_image_opts(filename)
    return filename, fmt, {}


def check_output(output: str) -> str:
    if output not in ("human", "json"):
        raise UsageError(f"--output must be used with human or json as argument.")
    return output


def warn(message: str) -> None:
    sys.stderr.write(f"WARNING: {message}\n")


def echo(text: str, quiet: bool = False) -> None:
    if not quiet:
        sys.stdout.write(text)
