"""Run qemu-img and qimg side by side on twin copies of the same files, and compare what they do."""

from __future__ import annotations

import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

from tests.oracle.differential import _norm, run_qimg


@contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _no_allocation(text: str) -> str:
    text = re.sub(r"disk size: .*", "disk size: N", _norm(text))
    return re.sub(r'"actual-size": \d+', '"actual-size": N', text)


class Twin:
    """Two twin directories built by the same steps: qemu-img works in ``q``, qimg in ``i``; names are relative."""

    def __init__(self, tmp_path: Path):
        self.q = tmp_path / "q"
        self.i = tmp_path / "i"
        self.q.mkdir(parents=True)
        self.i.mkdir()

    def build(self, *argv) -> None:
        """Run a qemu-img/qemu-io build step in both copies (the same steps give the same files, holes and
        allocation included: a copy would change what ``actual-size`` and ``map`` report)."""
        build(self.q, *argv)
        build(self.i, *argv)

    def each(self, fn) -> None:
        """Call fn(directory) for both copies."""
        fn(self.q)
        fn(self.i)

    def qemu(self, *argv) -> tuple:
        p = subprocess.run(["qemu-img", *map(str, argv)], capture_output=True, text=True, cwd=self.q, timeout=300)
        return p.returncode, p.stdout, p.stderr

    def qimg(self, *argv) -> tuple:
        with _cwd(self.i):
            return run_qimg([str(a) for a in argv])

    def both(self, *argv, allocation: bool = True) -> tuple:
        """Run the command in both copies; assert the same status, stdout and stderr; the qemu-img result.

        ``allocation=False`` leaves the host allocation out ("disk size", "actual-size"): after the same
        truncate of the same file the filesystem may keep a different number of blocks in each copy."""
        q = self.qemu(*argv)
        i = self.qimg(*argv)
        norm = _norm if allocation else _no_allocation
        assert (i[0], norm(i[1]), norm(i[2])) == (q[0], norm(q[1]), norm(q[2])), argv
        return q

    def same_file(self, name: str) -> None:
        """The file left behind is byte for byte the same in both copies."""
        assert (self.i / name).read_bytes() == (self.q / name).read_bytes(), name


def build(cwd: Path, *argv) -> str:
    """Run a qemu-img/qemu-io build step in ``cwd``; its stdout."""
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert p.returncode == 0, (argv, p.stderr, p.stdout)
    return p.stdout
