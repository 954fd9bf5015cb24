"""Untrusted mode: every kind of reference an image can make is confined, whatever the format.

Each case crafts an image (with qemu-img where it can write one) in ``img/`` whose reference
escapes into ``outside/``, where a secret file lives.  In untrusted mode every command refuses it
with one line naming the image, the reference and the rule; a recording of every path the process
opens proves that nothing outside ``img/`` was touched and no secret byte reached any output.
Without the flag qimg still answers as qemu-img 7.2 does for the same images.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess

import pytest

from tests.conftest import qemu, run_qimg

SECRET = b"TOPSECRET-" * 104858  # a little over 1 MiB, a pattern no image holds by chance
MiB = 1 << 20


@pytest.fixture
def area(tmp_path):
    img = tmp_path / "img"
    out = tmp_path / "outside"
    img.mkdir()
    out.mkdir()
    (out / "secret.raw").write_bytes(SECRET[:MiB])
    return img, out


def _qemu(*args, cwd):
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, cwd=cwd)


def _craft(kind: str, img, out):
    """(image path, reference as stored, expected rule) for one kind of escaping reference."""
    secret = out / "secret.raw"
    up = os.path.relpath(secret, img)  # ../outside/secret.raw, or deeper
    if kind in ("qcow", "cow"):
        # these formats record no backing format: the file must probe as one to be read at all
        _qemu("convert", "-O", "qcow2", secret, out / "secret.qcow2", cwd=img)
        secret = out / "secret.qcow2"
        up = os.path.relpath(secret, img)
    if kind == "qcow2-abs":
        _qemu("create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", "t.qcow2", "1M", cwd=img)
        return img / "t.qcow2", "backing file", str(secret), "absolute path outside the allowed folders"
    if kind == "qcow2-dotdot":
        _qemu("create", "-q", "-f", "qcow2", "-b", up, "-F", "raw", "t.qcow2", "1M", cwd=img)
        return img / "t.qcow2", "backing file", up, "'..' escapes the allowed folders"
    if kind == "qcow2-symlink":
        os.symlink(secret, img / "link.raw")
        _qemu("create", "-q", "-f", "qcow2", "-b", "link.raw", "-F", "raw", "t.qcow2", "1M", cwd=img)
        return (img / "t.qcow2", "backing file", "link.raw",
                f"symlink leads outside the allowed folders (to '{os.path.realpath(secret)}')")
    if kind == "qcow":
        _qemu("create", "-q", "-f", "qcow", "-b", up, "-F", "qcow2", "-u", "t.qcow", "1M", cwd=img)
        return img / "t.qcow", "backing file", up, "'..' escapes the allowed folders"
    if kind == "qed":
        _qemu("create", "-q", "-f", "qed", "-b", secret, "-F", "raw", "-u", "t.qed", "1M", cwd=img)
        return img / "t.qed", "backing file", str(secret), "absolute path outside the allowed folders"
    if kind == "cow":
        r = run_qimg("create", "-q", "-f", "cow", "-b", str(secret), "-F", "qcow2", "-u", str(img / "t.cow"), "1M")
        assert r.rc == 0, r.err
        return img / "t.cow", "backing file", str(secret), "absolute path outside the allowed folders"
    if kind == "vmdk-parent":
        _qemu("convert", "-O", "vmdk", secret, out / "parent.vmdk", cwd=img)
        parent = os.path.relpath(out / "parent.vmdk", img)
        _qemu("create", "-q", "-f", "vmdk", "-b", parent, "-F", "vmdk", "t.vmdk", cwd=img)
        return img / "t.vmdk", "backing file", parent, "'..' escapes the allowed folders"
    if kind in ("vmdk-flat", "vmdk-sparse-extent"):
        sub = "monolithicFlat" if kind == "vmdk-flat" else "twoGbMaxExtentSparse"
        _qemu("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", "t.vmdk", "1M", cwd=img)
        desc = (img / "t.vmdk").read_text()
        ext = "t-flat.vmdk" if kind == "vmdk-flat" else "t-s001.vmdk"
        target = secret
        if kind == "vmdk-sparse-extent":
            _qemu("convert", "-O", "vmdk", secret, out / "sparse.vmdk", cwd=img)
            target = out / "sparse.vmdk"
        (img / "t.vmdk").write_text(desc.replace(f'"{ext}"', f'"{target}"'))
        return img / "t.vmdk", "extent", str(target), "absolute path outside the allowed folders"
    if kind == "qcow2-data-file":
        _qemu("create", "-q", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on", "t.qcow2", "1M", cwd=img)
        _qemu("amend", "-o", f"data_file={secret}", "t.qcow2", cwd=img)
        return img / "t.qcow2", "data file", str(secret), "absolute path outside the allowed folders"
    if kind == "parallels-storage":
        b = img / "t.hdd"
        b.mkdir()
        os.symlink(secret, b / "s.hds")
        (b / "DiskDescriptor.xml").write_text(
            "<?xml version='1.0'?><Parallels_disk_image><Disk_Parameters><Disk_size>2048</Disk_size>"
            "</Disk_Parameters><StorageData><Storage><Start>0</Start><End>2048</End><Image><GUID>g</GUID>"
            "<Type>Plain</Type><File>s.hds</File></Image></Storage></StorageData></Parallels_disk_image>")
        return (b, "storage", "s.hds",
                f"symlink leads outside the allowed folders (to '{os.path.realpath(secret)}')")
    raise AssertionError(kind)


KINDS = ["qcow2-abs", "qcow2-dotdot", "qcow2-symlink", "qcow", "qed", "cow", "vmdk-parent", "vmdk-flat",
         "vmdk-sparse-extent", "qcow2-data-file", "parallels-storage"]


def _shown(path) -> str:
    """The name an error gives the image: a Parallels bundle opens through its descriptor."""
    return str(path)


@pytest.mark.parametrize("kind", KINDS)
def test_refused_with_one_line(kind, area, tmp_path):
    img, out = area
    path, ref_kind, name, rule = _craft(kind, img, out)
    for cmd in (["info", "--backing-chain"], ["map", "--output=json"], ["convert", "-O", "raw"],
                ["check"], ["compare"], ["measure", "-O", "qcow2"]):
        args = [*cmd, str(path)]
        if cmd[0] == "convert":
            args.append(str(tmp_path / "o.raw"))
        if cmd[0] == "compare":
            args.append(str(path))
        r = run_qimg("--untrusted", *args)
        if kind in ("qcow2-abs", "qcow2-dotdot", "qcow2-symlink", "qcow", "qed", "cow", "vmdk-parent") \
                and cmd[0] == "info" and r.rc == 0:
            pytest.fail("info --backing-chain opened an escaping backing file")
        if cmd[0] == "check" and r.rc == 63:
            continue  # formats without checks say so before opening anything else
        assert r.rc == (2 if cmd[0] == "compare" else 1), (cmd, r.out, r.err)  # compare's errors exit 2
        assert r.err.count("\n") == 1, r.err
        assert f"{ref_kind} '{name}' refused: {rule}" in r.err, r.err
        assert "Untrusted image '" in r.err
        assert b"TOPSECRET" not in r.out.encode()
    assert not (tmp_path / "o.raw").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_allow_dir_admits(kind, area, tmp_path):
    img, out = area
    path, *_ = _craft(kind, img, out)
    r = run_qimg("--untrusted", "--allow-dir", str(out), "convert", "-O", "raw", str(path), str(tmp_path / "o.raw"))
    assert r.rc == 0, r.err
    assert SECRET[:9] in (tmp_path / "o.raw").read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_trusted_mode_unchanged(kind, area, tmp_path, oracle):
    """Without --untrusted the same images read as qemu-img reads them (secret bytes included)."""
    img, out = area
    path, *_ = _craft(kind, img, out)
    if kind in ("cow", "parallels-storage"):
        pytest.skip("qemu-img 7.2 reads neither cow images nor Parallels bundle directories")
    mine, theirs = tmp_path / "mine.raw", tmp_path / "theirs.raw"
    r = run_qimg("convert", "-O", "raw", str(path), str(mine))
    q = qemu("convert", "-O", "raw", path, theirs, check=False)
    assert r.rc == q.rc, (r.err, q.err)
    if q.rc == 0:
        assert mine.read_bytes() == theirs.read_bytes()
        r = run_qimg("info", "--output=json", str(path))
        q = qemu("info", "--output=json", path)
        assert json.loads(r.out) == json.loads(q.out)


def test_policy_cannot_be_bypassed(area, tmp_path, monkeypatch):
    """Every path any format opens during info/map/convert/check lies inside img/ (or is the output)."""
    img, out = area
    images = []
    for kind in KINDS:
        sub = img / kind
        sub.mkdir()
        images.append(_craft(kind, sub, out)[0])
    opened = []
    real_os_open, real_open = os.open, builtins.open

    def rec_os_open(path, *a, **kw):
        opened.append(os.fsdecode(path))
        return real_os_open(path, *a, **kw)

    def rec_open(file, *a, **kw):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(os, "open", rec_os_open)
    monkeypatch.setattr(builtins, "open", rec_open)
    outputs = []
    for path in images:
        target = tmp_path / "o.raw"
        for args in (["info", "--backing-chain", "--output=json"], ["map", "--output=json"], ["check"],
                     ["convert", "-O", "raw"], ["convert", "-O", "qcow2"]):
            extra = [str(target)] if args[0] == "convert" else []
            r = run_qimg("--untrusted", *args, str(path), *extra)
            outputs.append(r.out + r.err)
            if target.exists():
                outputs.append(target.read_bytes().decode("latin-1"))
                target.unlink()
    monkeypatch.undo()
    outside = os.path.realpath(out)
    touched = [p for p in opened if os.path.realpath(p).startswith(outside + os.sep)]
    assert touched == []
    assert opened  # the recording saw the opens
    assert not any("TOPSECRET" in o for o in outputs)


def test_backing_without_format_probed_raw(area):
    img, _out = area
    qemu("create", "-q", "-f", "raw", img / "base.raw", "1M")
    r = run_qimg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-u", str(img / "t.qcow2"), "1M")
    assert r.rc == 0, r.err
    r = run_qimg("--untrusted", "map", str(img / "t.qcow2"))
    assert r.rc == 1
    assert r.err == (f"qimg: Untrusted image '{img / 't.qcow2'}': backing file 'base.raw' refused: no backing "
                     "format is recorded and the file would be probed as raw\n")
    # a backing file that probes as a real format is fine
    qemu("create", "-q", "-f", "qcow2", img / "base.qcow2", "1M")
    r = run_qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-u", str(img / "u.qcow2"), "1M")
    assert r.rc == 0, r.err
    assert run_qimg("--untrusted", "map", str(img / "u.qcow2")).rc == 0


@pytest.mark.parametrize("special", ["fifo", "device", "socket", "json", "nbd"])
def test_special_references(special, area):
    img, _out = area
    import socket

    if special == "fifo":
        os.mkfifo(img / "f")
        name, rule = "f", "FIFOs are not allowed"
    elif special == "device":
        os.symlink("/dev/zero", img / "f")
        name, rule = "f", "symlink leads outside the allowed folders (to '/dev/zero')"
    elif special == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(img / "f"))
        name, rule = "f", "sockets are not allowed"
    elif special == "json":
        name, rule = 'json:{"file.filename":"/etc/passwd"}', "json: filenames are not allowed"
    else:
        name, rule = "nbd://127.0.0.1:1/x", "protocol names are not allowed"
    r = run_qimg("create", "-q", "-f", "qcow2", "-b", name, "-F", "raw", "-u", str(img / "t.qcow2"), "1M")
    assert r.rc == 0, r.err
    r = run_qimg("--untrusted", "convert", "-O", "raw", str(img / "t.qcow2"), str(img / "o.raw"))
    assert r.rc == 1
    assert r.err == f"qimg: Untrusted image '{img / 't.qcow2'}': backing file '{name}' refused: {rule}\n"
    if special == "socket":
        s.close()


def test_device_node_inside_an_allowed_folder(area):
    img, _out = area
    r = run_qimg("create", "-q", "-f", "qcow2", "-b", "/dev/zero", "-F", "raw", "-u", str(img / "t.qcow2"), "1M")
    assert r.rc == 0, r.err
    r = run_qimg("--untrusted", "--allow-dir", "/dev", "info", "--backing-chain", str(img / "t.qcow2"))
    assert r.rc == 1
    assert r.err.endswith("backing file '/dev/zero' refused: device nodes are not allowed\n")


def test_env_switches_it_on(area, monkeypatch):
    img, out = area
    path, *_ = _craft("qcow2-abs", img, out)
    monkeypatch.setenv("QIMG_UNTRUSTED", "1")
    r = run_qimg("map", str(path))
    assert r.rc == 1 and "refused: absolute path outside the allowed folders" in r.err
