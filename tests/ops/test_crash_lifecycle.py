"""SIGKILL during commit, rebase, resize, snapshot -c/-d and convert: the images stay valid.

Each trial copies a fresh image set, starts qimg in a subprocess, kills it after a random short
delay, and then checks with the real qemu-img: sources unchanged, the modified image's guest
content either the old or the new one, and ``qemu-img check`` exit 0 or 3 (leaks are allowed).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, qemu, sha256_file

TRIALS = 8


def qemu_io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(path)], check=True, capture_output=True)


def guest(path, out):
    qemu("convert", "-O", "raw", str(path), str(out))
    return sha256_file(out)


def kill_after(args, delay):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "qimg", *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    return p.wait()


def check_ok(path):
    r = qemu("check", str(path), check=False)
    assert r.rc in (0, 3), r.out + r.err


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    d = tmp_path_factory.mktemp("crash-template")
    base = d / "base.qcow2"
    qemu("create", "-f", "qcow2", str(base), "64M")
    qemu_io(base, "write -P 1 0 16M", "write -P 4 40M 8M")
    top = d / "top.qcow2"
    qemu("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top), "64M")
    qemu_io(top, "write -P 2 8M 16M", "write -z 44M 1M", "write -P 3 60M 4M")
    new = d / "new.qcow2"
    qemu("create", "-f", "qcow2", str(new), "64M")
    qemu_io(new, "write -P 1 0 4M", "write -P 9 30M 2M")
    # the same overlay over a raw base, for commit
    rbase = d / "rbase.raw"
    qemu("create", "-f", "raw", str(rbase), "64M")
    qemu_io(rbase, "write -P 1 0 16M", "write -P 4 40M 8M", fmt="raw")
    rtop = d / "rtop.qcow2"
    qemu("create", "-f", "qcow2", "-b", "rbase.raw", "-F", "raw", str(rtop), "64M")
    qemu_io(rtop, "write -P 2 8M 16M", "write -z 44M 1M", "write -P 3 60M 4M")
    return d


def _fresh(template, tmp_path, i):
    d = tmp_path / f"t{i}"
    shutil.copytree(template, d)
    return d


def _trial_delays(seed):
    rnd = random.Random(seed)
    return [rnd.uniform(0.15, 0.8) for _ in range(TRIALS)]


def _expect(template, tmp_path, op_args, name):
    """Raw guest images of ``name``: as in the template, and after a complete run of the operation."""
    d = tmp_path / "complete"
    shutil.copytree(template, d)
    old = tmp_path / "old.raw"
    qemu("convert", "-O", "raw", str(d / name), str(old))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "qimg", *[str(a).replace("{d}", str(d)) for a in op_args]], check=True,
                   env=env, capture_output=True)
    new = tmp_path / "new.raw"
    qemu("convert", "-O", "raw", str(d / name), str(new))
    return old, new


def _same_guest(img, raw) -> bool:
    return qemu("compare", "-F", "raw", str(img), str(raw), check=False).rc == 0


@pytest.mark.parametrize("op", [
    ("commit", ["commit", "{d}/rtop.qcow2"], "rtop.qcow2", ["new.qcow2", "top.qcow2", "base.qcow2"]),
    ("commit-qcow2-base", ["commit", "{d}/top.qcow2"], "top.qcow2", ["new.qcow2"]),
    ("rebase", ["rebase", "-b", "new.qcow2", "-F", "qcow2", "{d}/top.qcow2"], "top.qcow2",
     ["base.qcow2", "new.qcow2"]),
    ("rebase-detach", ["rebase", "-b", "", "{d}/top.qcow2"], "top.qcow2", ["base.qcow2", "new.qcow2"]),
    ("resize", ["resize", "--shrink", "{d}/top.qcow2", "20M"], "top.qcow2", ["base.qcow2"]),
    ("snapshot-c", ["snapshot", "-c", "snap", "{d}/base.qcow2"], "base.qcow2", ["new.qcow2"]),
    ("snapshot-d", ["snapshot", "-d", "keep", "{d}/new.qcow2"], "new.qcow2", ["base.qcow2"]),
    ("convert", ["convert", "-O", "qcow2", "{d}/top.qcow2", "{d}/out.qcow2"], "top.qcow2", ["base.qcow2"]),
])
def test_sigkill(template, tmp_path, op):
    label, args, name, sources = op
    if label == "snapshot-d":
        qemu("snapshot", "-c", "keep", str(template / "new.qcow2")) if "keep" not in qemu(
            "snapshot", "-l", str(template / "new.qcow2")).out else None
    old, new = _expect(template, tmp_path, args, name)
    src_sums = {s: sha256_file(template / s) for s in sources}
    for i, delay in enumerate(_trial_delays(sum(map(ord, label)))):
        d = _fresh(template, tmp_path, i)
        kill_after([a.replace("{d}", str(d)) for a in args], delay)
        for s in sources:
            assert sha256_file(d / s) == src_sums[s], f"{label}: source {s} changed"
        check_ok(d / name)
        assert _same_guest(d / name, old) or _same_guest(d / name, new), \
            f"{label}: guest content of {name} is neither old nor new (delay {delay:.3f})"
        if label == "commit-qcow2-base":
            check_ok(d / "base.qcow2")
        if label == "convert":
            out = d / "out.qcow2"
            # the target appears only once complete (written under a temporary name first)
            if out.exists():
                check_ok(out)
                assert _same_guest(out, old)
        shutil.rmtree(d)


# ----- deterministic: stop the qcow2 metadata changes after every possible write -----

class _Crash(Exception):
    pass


def _crashing_store(path, limit):
    from qimg.io.store import FileStore

    class CrashingStore(FileStore):
        """Writes until ``limit`` writes (or truncates) were made, then dies like a killed process."""

        count = 0

        def pwrite(self, offset, data):
            if self.count >= limit:
                raise _Crash()
            self.count += 1
            super().pwrite(offset, data)

        def truncate(self, size):
            if self.count >= limit:
                raise _Crash()
            self.count += 1
            super().truncate(size)

    return CrashingStore(str(path), True)


def _op(name):
    from qimg.formats.qcow2 import amend, check, resize, snapshot_ops

    return {
        "snapshot-c": lambda st: snapshot_ops.create(st, "new"),
        "snapshot-d": lambda st: snapshot_ops.delete(st, "keep"),
        "snapshot-a": lambda st: snapshot_ops.apply(st, "keep"),
        "resize-grow": lambda st: resize.resize(st, 200 << 20),
        "resize-shrink": lambda st: resize.resize(st, 20 << 20),
        "amend-v2": lambda st: amend.amend(st, {"compat": "0.10"}),
        "amend-refcount": lambda st: amend.amend(st, {"refcount_bits": "8"}),
        "make-empty": snapshot_ops.make_empty,
        "set-backing": lambda st: snapshot_ops.set_backing(st, "other.qcow2", "qcow2"),
        "repair": lambda st: check.run_check(st, "all"),
    }[name]


@pytest.mark.parametrize("name", ["snapshot-c", "snapshot-d", "snapshot-a", "resize-grow", "resize-shrink",
                                  "amend-v2", "amend-refcount", "make-empty", "set-backing", "repair"])
def test_crash_after_every_write(tmp_path, oracle, name):
    src = tmp_path / "src.qcow2"
    qemu("create", "-f", "qcow2", str(src), "64M")
    qemu_io(src, "write -P 1 0 3M", "write -z 20M 1M")
    qemu("snapshot", "-c", "keep", str(src))
    qemu_io(src, "write -P 2 1M 64k", "write -P 3 30M 64k")
    if name == "amend-v2":
        qemu_io(src, "write -z 40M 64k")   # zero clusters to expand while the snapshot shares clusters
    qemu("create", "-f", "qcow2", str(tmp_path / "other.qcow2"), "64M")
    if name == "repair":
        # a leaked cluster and a wrong OFLAG_COPIED for the repair to fix
        with open(src, "ab") as f:
            f.write(bytes(65536))
        n = src.stat().st_size // 65536 - 1
        with open(src, "r+b") as f:
            head = f.read(104)
            rt = int.from_bytes(head[48:56], "big")
            f.seek(rt)
            blk = int.from_bytes(f.read(8), "big")
            f.seek(blk + 2 * n)
            f.write((1).to_bytes(2, "big"))
    old = guest(src, tmp_path / "old.raw")
    full = tmp_path / "full.qcow2"
    shutil.copy(src, full)
    st = _crashing_store(full, 1 << 30)
    _op(name)(st)
    total = st.count
    st.close()
    new = guest(full, tmp_path / "new.raw")
    assert qemu("check", str(full), check=False).rc == 0
    for limit in range(total):
        img = tmp_path / f"c{limit}.qcow2"
        shutil.copy(src, img)
        st = _crashing_store(img, limit)
        with pytest.raises(_Crash):
            _op(name)(st)
        st.close()
        r = qemu("check", str(img), check=False)
        assert r.rc in (0, 3) if name == "repair" else r.rc == 0, (limit, total, r.out, r.err)
        assert guest(img, tmp_path / "g.raw") in (old, new), (limit, total)
        img.unlink()
