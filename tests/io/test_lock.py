"""Image locking: qimg and qemu-img/qemu-io/qemu-nbd see each other's OFD locks, byte for byte."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import shutil
import subprocess
import sys
import time

import pytest

from qimg.core import registry
from qimg.io import lock
from qimg.io.store import FileStore
from tests.conftest import run_qimg, sha256_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OFD locks are Linux-only")

IN_USE = "Is another process using the image [{}]?"


@pytest.fixture
def qemu_io(oracle):
    path = shutil.which("qemu-io")
    if path is None:
        pytest.skip("qemu-io not installed")
    return path


def proc_locks(path) -> set[int]:
    """The bytes of ``path`` under OFD locks (any process), from /proc/locks."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts:  # a blocked waiter
                continue
            if len(parts) >= 8 and parts[1] == "OFDLCK" and parts[5] == dev and parts[7] != "EOF":
                found.update(range(int(parts[6]), int(parts[7]) + 1))
    return found


@contextlib.contextmanager
def held(*cmd, path):
    """Run a qemu process holding ``path`` until the block ends (killed on the way out, whatever happens)."""
    p = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        last = set()
        while True:  # until its locks are taken and settled (qemu takes them one byte at a time)
            now = proc_locks(path)
            if now and now == last:
                break
            if p.poll() is not None:
                raise AssertionError(f"{cmd} exited: {p.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{cmd} took no locks")
            last = now
            time.sleep(0.05)
        yield p
    finally:
        p.kill()
        p.wait()
        p.stderr.close()


def both(oracle, *args):
    """Run qimg (in-process) and qemu-img with the same arguments; (qimg, qemu) results."""
    return run_qimg(*args), oracle(*args, check=False)


def same(oracle, *args):
    mine, theirs = both(oracle, *args)
    err = mine.err.replace("qimg:", "qemu-img:").replace("'qimg --help'", "'qemu-img --help'")
    assert (mine.rc, err, mine.out) == (theirs.rc, theirs.err, theirs.out), args
    return mine


@pytest.fixture
def images(tmp_path, oracle):
    img = tmp_path / "img.qcow2"
    raw = tmp_path / "disk.raw"
    top = tmp_path / "top.qcow2"
    oracle("create", "-q", "-f", "qcow2", img, "1M")
    oracle("create", "-q", "-f", "raw", raw, "1M")
    oracle("create", "-q", "-f", "qcow2", "-b", img, "-F", "qcow2", top)
    yield {"img": str(img), "raw": str(raw), "top": str(top), "dir": tmp_path}
    assert lock.held_files() == {}, "qimg kept locks after its commands"


# ----- the bytes -----

@pytest.mark.parametrize("fmt,writable,share", [
    ("qcow2", False, False), ("qcow2", True, False), ("qcow2", False, True),
    ("raw", False, False), ("raw", True, False),
])
def test_same_bytes_as_qemu_io(images, qemu_io, fmt, writable, share):
    path = images["img"] if fmt == "qcow2" else images["raw"]
    cmd = [qemu_io, "-f", fmt] + ([] if writable else ["-r"]) + (["-U"] if share else [])
    with held(*cmd, "-c", "sleep 100000", path, path=path):
        theirs = proc_locks(path)
    opts = {"force-share": "on"} if share else None
    drv = registry.open_image(path, fmt, writable=writable, options=opts)
    try:
        mine = proc_locks(path)
    finally:
        drv.close()
    assert mine == theirs
    assert proc_locks(path) == set()


def test_documented_bytes(images):
    """Read-only: consistent read held, write and resize refused; read-write also holds write and resize."""
    with registry.open_image(images["img"], "qcow2") as drv:
        assert proc_locks(images["img"]) == {100, 201, 203}
        with registry.open_image(images["img"], "qcow2", writable=True):  # same process: no conflict, a union
            assert proc_locks(images["img"]) == {100, 101, 103, 201, 203}
        assert proc_locks(images["img"]) == {100, 201, 203}
        assert drv.virtual_size == 1 << 20
    from qimg.options import NO_IO

    with registry.open_image(images["img"], "qcow2", options={NO_IO: True}):  # info: metadata only
        assert proc_locks(images["img"]) == {201, 203}
    with registry.open_image(images["raw"], "raw", writable=True, options={lock.TAKE_RESIZE: True}):
        assert proc_locks(images["raw"]) == {100, 101, 103}
    with registry.open_image(images["img"], "qcow2", options={"file.locking": "off"}):
        assert proc_locks(images["img"]) == set()


# ----- a qemu process writes the image -----

def test_image_in_use_by_qemu(images, oracle, qemu_io):
    img, raw, top, d = images["img"], images["raw"], images["top"], images["dir"]
    over = d / "over.qcow2"
    oracle("create", "-q", "-f", "qcow2", "-b", raw, "-F", "raw", over)
    before = sha256_file(img)
    with held(qemu_io, "-f", "qcow2", "-c", "sleep 100000", img, path=img):
        r = same(oracle, "info", img)
        assert r.rc == 1
        assert r.err == f"qimg: Could not open '{img}': Failed to get shared \"write\" lock\n{IN_USE.format(img)}\n"
        for args in (["check", img], ["map", img], ["measure", "-O", "qcow2", img], ["compare", img, img],
                     ["convert", "-O", "raw", img, d / "never.raw"], ["snapshot", "-l", img],
                     ["dd", f"if={img}", f"of={d / 'never2.raw'}"], ["map", top], ["info", "--backing-chain", top],
                     ["convert", "-O", "raw", top, d / "never3.raw"], ["commit", top],
                     ["rebase", "-b", img, "-F", "qcow2", over]):
            r = same(oracle, *args)
            assert r.rc in (1, 2) and "lock" in r.err
        # read-write opens: 'Failed to get "write" lock'
        for args in (["resize", img, "+1M"], ["snapshot", "-c", "s1", img], ["amend", "-o", "lazy_refcounts=on", img],
                     ["check", "-r", "all", img], ["rebase", "-u", "-b", "", img],
                     ["rebase", "-U", "-u", "-b", "", img],
                     ["convert", "-n", "-O", "qcow2", raw, img], ["convert", "-U", "-n", "-O", "qcow2", raw, img],
                     ["convert", "-O", "qcow2", raw, img], ["create", "-q", "-f", "qcow2", img, "1M"],
                     ["dd", "-O", "qcow2", f"if={raw}", f"of={img}"], ["bitmap", "--add", img, "b0"]):
            r = same(oracle, *args)
            assert r.rc == 1 and 'Failed to get "write" lock' in r.err, args
        # -U: read-only commands share the image with its writer
        for args in (["info", "-U", img], ["check", "-U", img], ["map", "-U", img], ["map", "-U", top],
                     ["measure", "-U", "-O", "qcow2", img], ["compare", "-U", img, top], ["snapshot", "-U", "-l", img],
                     ["info", "-U", "--backing-chain", "--output=json", top],
                     ["map", "--image-opts", f"driver=qcow2,file.filename={top},force-share=on"]):
            r = same(oracle, *args)
            assert r.rc == 0, args
        for tool in ("qimg", "qemu"):
            out = d / f"copy-{tool}.raw"
            args = ("convert", "-U", "-O", "raw", top, out)
            r = run_qimg(*args) if tool == "qimg" else oracle(*args, check=False)
            assert (r.rc, r.err) == (0, "")
        assert sha256_file(d / "copy-qimg.raw") == sha256_file(d / "copy-qemu.raw")
        # -U is refused where the image is written, or unknown, as qemu-img does
        for args in (["check", "-U", "-r", "all", img], ["snapshot", "-U", "-c", "s2", img],
                     ["bench", "-U", "-w", img], ["resize", "-U", img, "+1M"], ["commit", "-U", top]):
            same(oracle, *args)
    assert sha256_file(img) == before  # nothing touched the image in use


def test_raw_in_use_by_qemu(images, oracle, qemu_io):
    """A writer of a raw image (qemu-io) refuses nothing: compare and info run, convert's source lock does not."""
    raw, d = images["raw"], images["dir"]
    with held(qemu_io, "-f", "raw", "-c", "sleep 100000", raw, path=raw):
        assert same(oracle, "compare", "-f", "raw", "-F", "raw", raw, raw).rc == 0
        assert same(oracle, "info", "-f", "raw", raw).rc == 0
        r = same(oracle, "convert", "-f", "raw", "-O", "raw", raw, d / "never.raw")
        assert r.rc == 1 and 'Failed to get shared "write" lock' in r.err
        assert run_qimg("convert", "-U", "-f", "raw", "-O", "raw", raw, d / "ok.raw").rc == 0


def test_readers_coexist(images, oracle, qemu_io):
    img, top, d = images["img"], images["top"], images["dir"]
    with held(qemu_io, "-r", "-c", "sleep 100000", img, path=img):
        for args in (["info", img], ["map", img], ["check", img], ["compare", img, top],
                     ["info", "--backing-chain", top]):
            assert same(oracle, *args).rc == 0, args
        assert run_qimg("convert", "-O", "raw", top, d / "out.raw").rc == 0
        r = same(oracle, "resize", img, "+1M")
        assert r.rc == 1 and 'Failed to get "write" lock' in r.err
        # commit reopens the base read-write: qemu-img's bare message
        r = same(oracle, "commit", top)
        assert r.err == f"qimg: Failed to get \"write\" lock\n{IN_USE.format(img)}\n"
    # and the other way round: qemu-img reads what qimg reads
    with registry.open_image(img, "qcow2"):
        assert oracle("map", img, check=False).rc == 0
        r = oracle("resize", img, "+1M", check=False)
        assert r.rc == 1 and 'Failed to get "write" lock' in r.err


def test_qemu_nbd_reader(images, oracle):
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd not installed")
    img = images["img"]
    sock = str(images["dir"] / "nbd.sock")
    with held("qemu-nbd", "-r", "-k", sock, "-f", "qcow2", img, path=img):
        assert same(oracle, "info", img).rc == 0
        r = same(oracle, "snapshot", "-c", "s", img)
        assert r.rc == 1 and 'Failed to get "write" lock' in r.err


# ----- qimg writes the image -----

def test_image_in_use_by_qimg(images, oracle, qemu_io):
    img, raw = images["img"], images["raw"]
    drv = registry.open_image(img, "qcow2", writable=True)
    try:
        r = oracle("info", img, check=False)
        assert (r.rc, r.err) == (1, f"qemu-img: Could not open '{img}': Failed to get shared \"write\" lock\n"
                                    f"{IN_USE.format(img)}\n")
        assert oracle("info", "-U", img, check=False).rc == 0
        r = subprocess.run([qemu_io, "-c", "read 0 512", img], capture_output=True, text=True)
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr
        assert subprocess.run([qemu_io, "-r", "-U", "-c", "read 0 512", img], capture_output=True).returncode == 0
    finally:
        drv.close()
    assert proc_locks(img) == set()
    assert oracle("info", img, check=False).rc == 0
    # a raw image qimg writes: qemu-img compare reads it, convert (which keeps writers off) does not
    drv = registry.open_image(raw, "raw", writable=True)
    try:
        assert oracle("compare", "-f", "raw", "-F", "raw", raw, raw, check=False).rc == 0
        r = oracle("convert", "-f", "raw", "-O", "raw", raw, images["dir"] / "x.raw", check=False)
        assert r.rc == 1 and 'Failed to get shared "write" lock' in r.err
    finally:
        drv.close()


def test_convert_and_create_keep_off_an_image_in_use(images, oracle, qemu_io):
    img, raw = images["img"], images["raw"]
    before = sha256_file(img)
    with held(qemu_io, "-r", "-c", "sleep 100000", img, path=img):
        for out_fmt in ("qcow2", "raw"):
            r = same(oracle, "convert", "-O", out_fmt, raw, img)
            assert r.err == (f"qimg: {img}: error while converting {out_fmt}: Failed to get \"write\" lock\n"
                             f"{IN_USE.format(img)}\n")
        r = same(oracle, "create", "-f", "raw", img, "2M")
        assert r.err == f"qimg: {img}: Failed to get \"write\" lock\n{IN_USE.format(img)}\n"
    assert sha256_file(img) == before
    assert not [p for p in os.listdir(images["dir"]) if "partial" in p]
    # once free, both replace it
    assert run_qimg("convert", "-O", "raw", raw, img).rc == 0


# ----- release -----

def test_released_on_close_and_errors(images, oracle, qemu_io, tmp_path):
    img, top = images["img"], images["top"]
    drv = registry.open_image(img, "qcow2", writable=True)
    assert lock.held_files()
    drv.close()
    assert lock.held_files() == {} and proc_locks(img) == set()
    # failing commands give their locks back
    assert run_qimg("commit", img).rc == 1  # no backing file
    assert run_qimg("resize", img, "-1").rc == 1
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 200)
    assert run_qimg("info", bad).rc == 1
    with pytest.raises(Exception):
        registry.open_image(str(bad), "qcow2", writable=True)
    os.unlink(img)
    oracle("create", "-q", "-f", "qcow2", img, "1M")
    assert run_qimg("map", top).rc == 0
    with held(qemu_io, "-c", "sleep 100000", img, path=img):
        assert run_qimg("commit", top).rc == 1
        assert run_qimg("info", "--backing-chain", top).rc == 1
        locked = proc_locks(img)
    assert lock.held_files() == {}
    assert locked == {100, 101, 103, 201, 203}  # only qemu-io's
    assert proc_locks(top) == set()
    # a store nobody closed still gives its locks back when it goes
    store = FileStore(img, writable=True)
    assert proc_locks(img) == {100, 101, 103, 203}
    del store
    gc.collect()
    assert proc_locks(img) == set() and lock.held_files() == {}
    # in-process opens of one file share its locks; the last close drops them
    a = registry.open_image(img, "qcow2")
    b = registry.open_image(img, "qcow2", writable=True)
    a.close()
    assert proc_locks(img) == {100, 101, 103, 201, 203}
    b.close()
    assert proc_locks(img) == set()


def test_commit_reopens_base_in_process(images, oracle):
    """qimg opens commit's base a second time read-write while the chain holds it: no conflict with itself."""
    oracle("create", "-q", "-f", "qcow2", "-b", images["img"], "-F", "qcow2", images["top"])
    assert run_qimg("commit", images["top"]).rc == 0


def test_foreign_write_lock(images, oracle):
    """A write lock on a byte qemu locks: "Failed to lock byte N" (no hint), as qemu-img says it."""
    img = images["img"]
    code = ("import fcntl, os, struct, sys, time\n"
            f"fd = os.open({img!r}, os.O_RDWR)\n"
            "fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 100, 1, 0))\n"
            "time.sleep(100)\n")
    with held(sys.executable, "-c", code, path=img):
        r = same(oracle, "map", img)
        assert r.err == f"qimg: Could not open '{img}': Failed to lock byte 100\n"
        assert same(oracle, "info", img).rc == 0  # info holds no consistent-read byte


def test_filesystem_without_ofd_locks(images, monkeypatch):
    """Where the filesystem refuses OFD locks, images open without locks, quietly."""
    def refuse(*a, **k):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock, "_fcntl", refuse)
    with registry.open_image(images["img"], "qcow2", writable=True):
        assert lock.held_files() == {}
        assert proc_locks(images["img"]) == set()


def test_force_share_refused_for_writable_image_opts(images, oracle):
    raw = images["raw"]
    r = run_qimg("resize", "--image-opts", f"driver=raw,file.filename={raw},force-share=on", "2M")
    assert r.rc == 1 and r.err.endswith(": force-share=on can only be used with read-only images\n")
    assert oracle("resize", "--image-opts", f"driver=raw,file.filename={raw},force-share=on", "2M",
                  check=False).err.endswith(": force-share=on can only be used with read-only images\n")


def test_no_convert_onto_own_source(images, oracle):
    """qemu-img's source keeps its own target creation off the same file: nothing is truncated."""
    img, raw = images["img"], images["raw"]
    before = sha256_file(img), sha256_file(raw)
    for args in (["convert", "-O", "qcow2", img, img], ["convert", "-f", "raw", "-O", "raw", raw, raw],
                 ["dd", "-O", "qcow2", f"if={img}", f"of={img}"], ["convert", "-n", "-O", "qcow2", img, img],
                 ["convert", "-n", "-f", "raw", "-O", "raw", raw, raw]):
        r = same(oracle, *args)
        name = args[-1].removeprefix("of=")
        assert r.rc == 1 and r.err.endswith(f"Failed to get \"write\" lock\n{IN_USE.format(name)}\n")
    assert (sha256_file(img), sha256_file(raw)) == before


def test_luks_locks_like_raw(tmp_path, oracle, qemu_io):
    """qemu's luks driver passes its user's permissions through, as raw does: readers refuse nothing."""
    from qimg.objects import add_object

    lu = str(tmp_path / "lu.luks")
    assert run_qimg("create", "-q", "--object", "secret,id=lk0,data=pw", "-f", "luks",
                    "-o", "key-secret=lk0,iter-time=10", lu, "1M").rc == 0
    spec = f"driver=luks,key-secret=lk0,file.filename={lu}"
    for ro in (True, False):
        with held(qemu_io, *(["-r"] if ro else []), "--object", "secret,id=lk0,data=pw", "--image-opts", spec,
                  "-c", "sleep 100000", path=lu):
            theirs = proc_locks(lu)
        add_object("secret,id=lk0,data=pw")
        with registry.open_image(lu, "luks", writable=not ro, options={"key-secret": "lk0"}):
            assert proc_locks(lu) == theirs == ({100} if ro else {100, 101})
    assert lock.held_files() == {}
