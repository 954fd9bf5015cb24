"""Shared fixtures: the qemu-img oracle, the shared image corpus, and an in-process CLI runner."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_IMAGES = Path(os.environ.get("QIMG_SHARED_IMAGES", ROOT.parent / "shared" / "images"))
REQUIRE_ORACLE = os.environ.get("QIMG_REQUIRE_ORACLE") == "1"


@dataclass
class Result:
    rc: int
    out: str
    err: str


def run_qimg(*args, input_bytes=None) -> Result:
    """Run qimg in this process (fast) and capture its output and status."""
    from qimg.cli import run

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = run([str(a) for a in args])
    return Result(rc, out.getvalue(), err.getvalue())


def run_qimg_subprocess(*args, timeout=120) -> Result:
    """Run qimg as a separate process (for signals, terminals and start-up)."""
    p = subprocess.run([sys.executable, "-m", "qimg", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


#: the modules a metadata command or a plain convert must not import (start-up cost)
HEAVY_MODULES = ("numpy", "tqdm", "cryptography", "zstandard")

_FRESH_PROBE = """
import json, runpy, sys
watch = json.loads(sys.argv[1])
sys.argv = ["qimg"] + sys.argv[2:]
rc = 0
try:
    runpy.run_module("qimg", run_name="__main__", alter_sys=True)
except SystemExit as e:
    rc = e.code or 0
print(json.dumps({"rc": rc, "loaded": sorted(m for m in watch if m in sys.modules)}))
"""


def run_fresh(*args, cwd=None, watch=HEAVY_MODULES) -> dict:
    """Run ``qimg ARGS`` in a fresh interpreter, as a user does: {"rc": its exit status, "loaded": which
    of the ``watch`` modules it ended up importing}."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-c", _FRESH_PROBE, json.dumps(list(watch)), *map(str, args)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=str(cwd or ROOT))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def qemu_img_path():
    return shutil.which("qemu-img")


@pytest.fixture(scope="session")
def qemu_img():
    """Path of the real qemu-img, or skip (fail under QIMG_REQUIRE_ORACLE=1)."""
    path = qemu_img_path()
    if path is None:
        if REQUIRE_ORACLE:
            pytest.fail("qemu-img is required (QIMG_REQUIRE_ORACLE=1) but not installed")
        pytest.skip("qemu-img not installed")
    return path


def qemu(*args, check=True, timeout=300) -> Result:
    """Run the real qemu-img."""
    p = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}")
    return Result(p.returncode, p.stdout, p.stderr)


def qemu_create_pbkdf(*args) -> Result:
    """``qemu-img create`` of a LUKS-encrypted image.  qemu-img times PBKDF2 with the thread's CPU
    clock, which on this kind of machine often reads no progress ("Unable to get accurate CPU
    usage", about half of the tries): retry that, and only that."""
    for _attempt in range(30):
        r = qemu("create", *args, check=False)
        if r.rc == 0 or "Unable to get accurate CPU usage" not in r.err:
            break
    assert r.rc == 0, r.err
    return r


@pytest.fixture
def oracle(qemu_img):
    """The qemu() runner, available only when qemu-img is."""
    return qemu


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def guest_sha256(path, fmt=None) -> str:
    """sha256 of the guest-visible content as qimg reads it."""
    from qimg.core.chain import Chain

    h = hashlib.sha256()
    with Chain.open(str(path), fmt) as chain:
        size = chain.virtual_size
        pos = 0
        step = 4 << 20
        while pos < size:
            n = min(step, size - pos)
            h.update(chain.read(pos, n))
            pos += n
    return h.hexdigest()


def oracle_raw(path, tmp_path, fmt=None, name="oracle.raw") -> Path:
    """Convert with the real qemu-img to raw; returns the raw file."""
    out = Path(tmp_path) / name
    args = ["convert"]
    if fmt:
        args += ["-f", fmt]
    qemu(*args, "-O", "raw", str(path), str(out))
    return out


@pytest.fixture(scope="session")
def shared_images():
    """The shared image corpus folder (skips when absent)."""
    if not (SHARED_IMAGES / "expected.json").exists():
        pytest.skip("shared image corpus not available")
    return SHARED_IMAGES


@pytest.fixture(scope="session")
def expected_images(shared_images):
    return json.loads((shared_images / "expected.json").read_text())


def decompress_to(src: Path, dst_dir: Path) -> Path:
    """Decompress a corpus file (.bz2/.gz/.xz or plain) into dst_dir; returns the new path."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    name = src.name
    opener = None
    for ext, op in ((".bz2", bz2.open), (".gz", gzip.open), (".xz", lzma.open)):
        if name.endswith(ext):
            name, opener = name[: -len(ext)], op
            break
    out = dst_dir / name
    if not out.exists():
        if opener is None:
            shutil.copyfile(src, out)
        else:
            with opener(src, "rb") as fi, open(out, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
    return out


def write_pattern(path, size, extents, seed=1):
    """A sparse raw file of ``size`` with random data at each (offset, length)."""
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in extents:
            f.seek(off)
            f.write(rnd.randbytes(length))
    return Path(path)


def open_rw(filename, fmt=None, options=None):
    """The top layer of ``filename``'s chain opened for writing, as every write path opens it (its
    backing layers hand it the bytes copy-on-write needs); closing it closes the chain."""
    from qimg.core.chain import Chain

    chain = Chain.open(str(filename), fmt, writable=True, options=options)
    top = chain.top

    def close():
        del top.close  # the driver's own close, reached through the chain
        chain.close()

    top.close = close
    return top
