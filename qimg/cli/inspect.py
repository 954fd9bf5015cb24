"""qimg inspect: a safety verdict for ingestion gates (exit 0 safe, 1 unsafe, 2 could not be inspected)."""

from __future__ import annotations

import click

from . import common as c


class _InspectCommand(click.Command):
    """Bad usage is status 2 here ("could not be inspected"), never 1, which a gate reads as "unsafe"."""

    def parse_args(self, ctx, args):
        from ..ops.inspect import InspectFailed

        try:
            return super().parse_args(ctx, args)
        except click.exceptions.MissingParameter:
            raise InspectFailed("Expecting one image file name") from None
        except click.UsageError as e:
            msg = e.format_message()
            if isinstance(e, click.exceptions.NoSuchOption):
                msg = f"unrecognized option '{e.option_name}'"
            raise InspectFailed(msg) from None


@click.command("inspect", cls=_InspectCommand, add_help_option=False)
@c.fmt_opt
@click.option("--allowed-formats", "allowed_formats", default=None)
@click.option("--allow-dir", "allow_dirs", multiple=True)
@c.output_opt
@click.argument("filename")
def command(fmt, allowed_formats, allow_dirs, output, filename):
    import json

    from ..ops.inspect import InspectFailed, inspect, parse_allowed_formats

    if output not in ("human", "json"):
        raise InspectFailed("--output must be used with human or json as argument.")
    policy = click.get_current_context().find_root().obj  # the global --allow-dir, --max-depth, ... (if any)
    result = inspect(filename, fmt, parse_allowed_formats(allowed_formats), allow_dirs, policy=policy)
    c.echo(json.dumps(result.to_dict(), indent=4) + "\n" if output == "json" else human(result))
    if result.exit_code:
        raise click.exceptions.Exit(result.exit_code)


def human(result) -> str:
    """The verdict as lines for a reader (the JSON form is the one for programs)."""
    from ..units import size_to_str

    d = result.to_dict()
    lines = [f"image: {d['filename']}", f"format: {d['format']}", f"candidates: {', '.join(d['candidates'])}"]
    vs = d["virtual-size"]
    lines.append("virtual size: " + ("unknown" if vs is None else f"{size_to_str(vs)} ({vs} bytes)"))
    for ref in d["references"]:
        where = ref["resolved"] or "(not resolved)"
        lines.append(f"reference: {ref['kind']} '{ref['name']}' -> {where} "
                     f"({'allowed' if ref['allowed'] else 'refused'})")
    for key, value in d["features"].items():
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
            continue  # nested details (extents, bitmaps, encryption) are in the JSON form
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "none"
        lines.append(f"feature {key}: {value}")
    for f in d["findings"]:
        lines.append(f"finding {f['id']}: {f['message']}")
    lines.append(f"bytes read: {d['bytes-read']}")
    lines.append("verdict: " + ("safe" if d["safe"] else "unsafe"))
    return "\n".join(lines) + "\n"
