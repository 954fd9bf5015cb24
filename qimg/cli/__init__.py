"""The command line: a lazy click group and ``run``, the one place errors become text and a status."""

from __future__ import annotations

import importlib
import os
import sys

import click

#: subcommand -> module under qimg.cli (imported only when that command runs)
COMMANDS = {
    "amend": "amend", "batch": "batch", "bench": "bench", "bitmap": "bitmap", "check": "check", "commit": "commit",
    "compare": "compare", "completion": "completion", "convert": "convert", "create": "create", "dd": "dd",
    "info": "info", "inspect": "inspect",
    "map": "map", "measure": "measure", "rebase": "rebase", "resize": "resize", "snapshot": "snapshot",
}

PROG = "qimg"


def version_text() -> str:
    from .. import __version__

    return f"{PROG} version {__version__} (compatible with qemu-img 7.2)\n"


def command_help_text(name: str) -> str:
    """``qimg CMD --help`` and ``qimg help CMD``."""
    from ..core.registry import format_names
    from .usage import command_help

    return version_text() + command_help(name, sorted(format_names()))


def _asks_help(argv: list[str]) -> bool:
    """``CMD -h``/``CMD --help`` for a command that does not read -h itself (those keep their order of errors)."""
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if "-h" not in args and "--help" not in args:
        return False
    cmd = LazyGroup().get_command(None, argv[0])
    return not any(("-h" in p.opts or "--help" in p.opts) and p.callback is not None for p in cmd.params)


def help_text() -> str:
    from ..core.registry import format_names
    from .usage import HELP

    return version_text() + HELP + "\nSupported formats: " + " ".join(sorted(format_names())) + "\n"


class LazyGroup(click.Group):
    """Imports a subcommand's module on first use, so --help and info start fast."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        mod = COMMANDS.get(name)
        if mod is None:
            return None
        module = importlib.import_module(f"qimg.cli.{mod}")
        return module.command

    def resolve_command(self, ctx, args):
        name = args[0]
        cmd = self.get_command(ctx, name)
        if cmd is None:
            raise CommandNotFound(name)
        return name, cmd, args[1:]


class CommandNotFound(Exception):
    pass


@click.group(cls=LazyGroup, add_help_option=False, invoke_without_command=True,
             context_settings={"help_option_names": []})
@click.option("-h", "--help", "show_help", is_flag=True)
@click.option("-V", "--version", "show_version", is_flag=True)
@click.option("-T", "--trace", "trace", multiple=True)
@click.option("--untrusted", "untrusted", is_flag=True)
@click.option("--allow-dir", "allow_dirs", multiple=True)
@click.option("--max-depth", "max_depth", default=None)
@click.option("--max-metadata-memory", "max_metadata_memory", default=None)
@click.pass_context
def main_group(ctx, show_help, show_version, trace, untrusted, allow_dirs, max_depth, max_metadata_memory):
    # the open policy travels with every open of this run (qimg.core.policy); QIMG_UNTRUSTED=1 turns it on too
    ctx.obj = make_policy(untrusted or os.environ.get("QIMG_UNTRUSTED", "") == "1", allow_dirs, max_depth,
                          max_metadata_memory)
    if show_help:
        click.echo(help_text(), nl=False)
        ctx.exit(0)
    if show_version:
        from .usage import COPYRIGHT

        click.echo(version_text() + COPYRIGHT, nl=False)
        ctx.exit(0)
    if ctx.invoked_subcommand is None:
        raise click.UsageError("Not enough arguments")


def make_policy(untrusted: bool, allow_dirs, max_depth: str | None, max_metadata_memory: str | None):
    """The Policy the global options ask for (--untrusted, --allow-dir, --max-depth, --max-metadata-memory)."""
    from ..core.policy import Policy
    from ..errors import UsageError

    dirs = []
    for d in allow_dirs or ():
        if not os.path.isdir(d):
            raise UsageError(f"--allow-dir: '{d}' is not a directory")
        dirs.append(os.path.realpath(d))
    depth = None
    if max_depth is not None:
        try:
            depth = int(max_depth)
        except ValueError:
            depth = -1
        if depth < 0:
            raise UsageError(f"--max-depth: invalid value '{max_depth}' (a number of backing files, 0 or more)")
    memory = None
    if max_metadata_memory is not None:
        from ..units import parse_size

        try:
            memory = parse_size(max_metadata_memory)
        except Exception:
            memory = -1
        if memory is None or memory <= 0:
            raise UsageError(f"--max-metadata-memory: invalid size '{max_metadata_memory}'")
    return Policy(untrusted=untrusted, allow_dirs=tuple(dirs), max_depth=depth, max_metadata_memory=memory)


_BITMAP_ACTIONS = ("--add", "--remove", "--clear", "--enable", "--disable")


def _preprocess(argv: list[str]) -> list[str]:
    """Keep a negative size for resize from being read as an option (qemu-img does the same); give
    bitmap's actions to one repeatable option, so that their command-line order (repeats included)
    survives parsing: qemu-img runs them in that order."""
    if argv and argv[0] == "resize" and len(argv) >= 3:
        last = argv[-1]
        if last.startswith("-") and len(last) > 1 and (last[1].isdigit() or last[1] == "."):
            return argv[:-1] + ["--", last]
    if argv and argv[0] == "bitmap":
        out = [argv[0]]
        i = 1
        while i < len(argv):
            a = argv[i]
            if a == "--":
                out.extend(argv[i:])
                break
            if a in _BITMAP_ACTIONS:
                out.append(f"--action={a[2:]}")
            elif a == "--merge" and i + 1 < len(argv):
                out.append(f"--action=merge={argv[i + 1]}")
                i += 1
            elif a.startswith("--merge="):
                out.append(f"--action=merge={a[len('--merge='):]}")
            elif a in ("-b", "-F", "-g", "-f", "--object") and i + 1 < len(argv):
                out.extend(argv[i:i + 2])
                i += 1
            else:
                out.append(a)
            i += 1
        return out
    return argv


def run(argv: list[str] | None = None) -> int:
    """Run qimg with ``argv``; every error becomes ``qimg: message`` and qemu-img's exit status."""
    from ..errors import QimgError, QimgWarning

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help") and len(argv) == 1:
        sys.stdout.write(help_text())
        return 0
    if argv and argv[0] == "help" and len(argv) == 2:
        if argv[1] not in COMMANDS:
            return _usage_fail(f"Command not found: {argv[1]}")
        sys.stdout.write(command_help_text(argv[1]))
        return 0
    if argv and argv[0] in COMMANDS and _asks_help(argv):
        sys.stdout.write(command_help_text(argv[0]))
        return 0
    argv = _preprocess(argv)
    debug = bool(os.environ.get("QIMG_DEBUG"))
    import warnings

    try:
        with warnings.catch_warnings():
            # the library's QimgWarnings are printed as qemu-img prints its warnings, every time
            warnings.simplefilter("always", QimgWarning)
            warnings.showwarning = _show_warning
            # click's main() would turn Ctrl-C into Abort and print a newline: invoke the group directly
            with main_group.make_context(PROG, argv) as ctx:
                rc = main_group.invoke(ctx)
        return rc if isinstance(rc, int) else 0  # a command may end with click's Exit(status)
    except CommandNotFound as e:
        return _usage_fail(f"Command not found: {e}")
    except click.exceptions.NoSuchOption as e:
        return _usage_fail(f"unrecognized option '{e.option_name}'")
    except click.exceptions.BadOptionUsage as e:
        if e.message.endswith("requires an argument.") and e.option_name:
            return _usage_fail(f"missing argument for option '{e.option_name}'")
        return _usage_fail(e.format_message())
    except click.exceptions.MissingParameter as e:
        return _usage_fail(_missing_message(e))
    except click.UsageError as e:
        return _usage_fail(_usage_message(e))
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        return 1
    except QimgError as e:
        if debug:
            import traceback

            traceback.print_exc()
        for line in e.diagnostics:
            sys.stderr.write(line + "\n")
        _err(str(e))
        if getattr(e, "hint", False):
            sys.stderr.write(f"Try '{PROG} --help' for more information\n")
        return e.exit_code
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM/SIGHUP from cli.signals: nothing printed, as qemu-img
        from .signals import signal_of

        _SIGNALLED[:] = [signal_of(e)]
        return 128 + _SIGNALLED[0]
    except BrokenPipeError:
        return 1
    except MemoryError:
        _err("Out of memory")
        return 1
    except Exception as e:  # the last line of defence: never a traceback for the user
        if debug:
            raise
        _err(f"internal error: {type(e).__name__}: {e}")
        return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from ..errors import QimgWarning

    if issubclass(category, QimgWarning):
        sys.stderr.write(f"{PROG}: warning: {message}\n")
    else:
        import warnings

        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _command_name(e) -> str:
    ctx = getattr(e, "ctx", None)
    return getattr(getattr(ctx, "command", None), "name", "") or ""


def _missing_message(e) -> str:
    if e.param is not None and getattr(e.param, "param_type_name", "") == "argument":
        # qemu-img words it per command: create takes "filename [size]", the others one image
        return "Expecting image file name" if _command_name(e) == "create" else "Expecting one image file name"
    return e.format_message()


def _usage_message(e) -> str:
    """click's usage errors in qemu-img's words where qemu-img has its own."""
    msg = e.format_message()
    if msg.startswith("Got unexpected extra argument"):
        extra = msg[msg.find("(") + 1:msg.rfind(")")].split(" ")[0]
        if _command_name(e) == "create":
            return f"Unexpected argument: {extra}"
        return "Expecting one image file name"
    return msg


def _err(message: str) -> None:
    # like qemu's error_report: the prefix goes on the first line of each report only (errors.reports
    # joins several; a message that needs a second prefixed line otherwise carries it itself)
    from ..errors import REPORT_SEP

    for report in message.split(REPORT_SEP):
        lines = report.splitlines() or [""]
        sys.stderr.write(f"{PROG}: {lines[0]}\n")
        for line in lines[1:]:
            sys.stderr.write(f"{line}\n")


def _usage_fail(message: str) -> int:
    _err(message)
    sys.stderr.write(f"Try '{PROG} --help' for more information\n")
    return 1


#: the signal that ended the last ``run`` (``main`` then ends the process by it)
_SIGNALLED: list[int] = []


def main() -> None:
    """The ``qimg`` program.  numpy's BLAS thread pool is of no use to qimg and spins otherwise: the
    program (not the library, which leaves its host's environment alone) caps it before numpy loads.
    Signal handlers are the program's too (``qimg.cli.signals``): it ends by SIGINT/SIGTERM as a shell expects."""
    from .signals import die_by, install

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    install(PROG)
    rc = run()
    if _SIGNALLED:
        die_by(_SIGNALLED[0])
    if "distributed" in sys.modules:
        # a batch ran: its cluster is closed and its results file written and closed; what is left,
        # Dask's exit hooks and the teardown of its threads and modules, costs ~0.2 s and does nothing
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:
            rc = rc or 1
        os._exit(rc)
    sys.exit(rc)
