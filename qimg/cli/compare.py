"""qimg compare"""

from __future__ import annotations

import sys

import click

from . import common as c


class QemuProgress:
    """qemu-img's simple progress printer, single-precision arithmetic included (so the same
    percentages print): ``    (xx.xx/100%)\\r`` whenever the value moved more than ``min_skip``."""

    def __init__(self, min_skip: float = 2.0, stream=None):
        import numpy as np

        self.f32 = np.float32
        self.current = np.float32(0.0)
        self.last_print = np.float32(0.0)
        self.min_skip = np.float32(min_skip)
        self.stream = stream or sys.stdout

    def __call__(self, length: int, base: int) -> None:
        f32 = self.f32
        delta = f32(0.0) if base <= 0 else (f32(length) / f32(base)) * f32(100)
        current = self.current + delta / f32(100) * f32(100)
        self.current = current
        if (current > self.last_print + self.min_skip or current < self.last_print - self.min_skip
                or current == 0 or current == 100):
            self.last_print = current
            self.stream.write(f"    ({float(current):3.2f}/100%)\r")
            self.stream.flush()

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


@click.command("compare", add_help_option=False)
@c.object_opt
@c.image_opts_opt
@click.option("-f", "fmt1", default=None)
@click.option("-F", "fmt2", default=None)
@click.option("-T", "src_cache", default=None)
@click.option("-p", "progress", is_flag=True)
@c.quiet_opt
@click.option("-s", "strict", is_flag=True)
@c.force_share_opt
@click.option("-h", "--help", "help_", is_flag=True, callback=c.help_now)
@click.argument("filenames", nargs=-1)
def command(objects, image_opts, fmt1, fmt2, src_cache, progress, quiet, strict, force_share, help_, filenames):
    from ..api.commands import compare
    from ..errors import QimgError, UsageError
    from ..ops.compare import OPEN_ERROR

    try:
        c.load_objects(objects)
    except QimgError as e:
        raise QimgError(str(e), OPEN_ERROR) from None
    if len(filenames) != 2:
        raise UsageError("Expecting two image file names")
    show = progress and not quiet
    prog = QemuProgress(2.0) if show else None
    try:
        c.check_src_cache(src_cache, OPEN_ERROR)  # (the library checks it too) before the images' options
        try:
            name1, f1, o1 = c.image_spec(filenames[0], fmt1, image_opts)
            name2, f2, o2 = c.image_spec(filenames[1], fmt2, image_opts)
        except QimgError as e:
            raise QimgError(str(e), OPEN_ERROR) from None
        result = compare(name1, name2, fmt1=f1, fmt2=f2, strict=strict, src_cache=src_cache, image_options=o1,
                         image_options2=o2, progress=_Steps(prog) if prog is not None else None,
                         report=lambda line: c.echo(line + "\n", quiet), untrusted=c.policy())
    finally:
        if prog is not None:
            prog.end()
    if result.exit_code:
        raise click.exceptions.Exit(result.exit_code)


class _Steps:
    """The library's progress(done, total) back into qemu's per-step (length, base) printer."""

    def __init__(self, printer: QemuProgress):
        self.printer = printer
        self.last = 0

    def __call__(self, done: int, total: int) -> None:
        self.printer(done - self.last, total)
        self.last = done
