"""Run qemu-img and qimg side by side on twin copies of the same files, and compare what they do."""

from __future__ import annotations

import os
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


class Twin:
    """Two copies of a directory: qemu-img works in ``q``, qimg in ``i``; names are given relative."""

    def __init__(self, tmp_path: Path):
        self.q = tmp_path / "q"
        self.i = tmp_path / "i"
        self.q.mkdir()

    def split(self) -> None:
        """Copy the files built in ``q`` (with qemu-img) to ``i``, holes kept (map reports them)."""
        subprocess.run(["cp", "-a", "--sparse=always", str(self.q), str(self.i)], check=True)

    def qemu(self, *argv) -> tuple:
        p = subprocess.run(["qemu-img", *map(str, argv)], capture_output=True, text=True, cwd=self.q, timeout=300)
        return p.returncode, p.stdout, p.stderr

    def qimg(self, *argv) -> tuple:
        with _cwd(self.i):
            return run_qimg([str(a) for a in argv])

    def both(self, *argv) -> tuple:
        """Run the command in both copies; assert the same status, stdout and stderr; the qemu-img result."""
        q = self.qemu(*argv)
        i = self.qimg(*argv)
        assert (i[0], _norm(i[1]), _norm(i[2])) == (q[0], _norm(q[1]), _norm(q[2])), argv
        return q

    def same_file(self, name: str) -> None:
        """The file left behind is byte for byte the same in both copies."""
        assert (self.i / name).read_bytes() == (self.q / name).read_bytes(), name


def build(cwd: Path, *argv) -> str:
    """Run a qemu-img/qemu-io build step in ``cwd``; its stdout."""
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert p.returncode == 0, (argv, p.stderr, p.stdout)
    return p.stdout
