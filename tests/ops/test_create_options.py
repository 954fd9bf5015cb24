"""Creation options as qemu-img 7.2 lists and prints them: ``-o help`` with and without a target
file name (with one, the host file's own options are merged in and the footnote goes), and the
host file's options (nocow, preallocation, extent_size_hint) accepted by every format and shown
after the format's own in the "Formatting" line."""

from __future__ import annotations

import pytest

from tests.conftest import qemu, run_qimg

FORMATS = ["raw", "qcow2", "qcow", "qed", "vdi", "vmdk", "vpc", "vhdx", "luks", "parallels"]


@pytest.mark.parametrize("target", [None, "x.img"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_create_help_matches_qemu(oracle, tmp_path, monkeypatch, fmt, target):
    monkeypatch.chdir(tmp_path)
    args = ["create", "-f", fmt, "-o", "help"] + ([target] if target else [])
    assert run_qimg(*args).out == qemu(*args).out


@pytest.mark.parametrize("files", [[], ["a.raw"], ["a.raw", "b.vdi"]])
def test_convert_help_matches_qemu(oracle, tmp_path, monkeypatch, files):
    monkeypatch.chdir(tmp_path)
    args = ["convert", "-O", "vdi", "-o", "help", *files]
    assert run_qimg(*args).out == qemu(*args).out


@pytest.mark.parametrize("opts", ["extent_size_hint=1M,nocow=on,preallocation=off", "nocow=off",
                                  "extent_size_hint=0", "preallocation=falloc", "nocow=maybe",
                                  "extent_size_hint=big"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2", "qed", "vdi", "vmdk", "vpc", "vhdx"])
def test_host_file_options_in_the_formatting_line(oracle, tmp_path, monkeypatch, fmt, opts):
    monkeypatch.chdir(tmp_path)
    got = run_qimg("create", "-f", fmt, "-o", opts, "m.img", "1M")
    want = qemu("create", "-f", fmt, "-o", opts, "q.img", "1M", check=False)
    assert got.rc == want.rc
    assert got.out.replace("m.img", "q.img") == want.out
    assert got.err.replace("qimg:", "qemu-img:").replace("m.img", "q.img") == want.err


@pytest.mark.parametrize("cmd", [
    "info -f file r.raw", "info --output=json -f file r.raw", "map -f file --output=json r.raw",
    "check -f file r.raw", "info --image-opts driver=file,filename=r.raw", "create -f file n.img 1M",
    "create -f file -o preallocation=full,nocow=on,extent_size_hint=1M n.img 1M", "create -f file -o help",
    "create -f file -o help n.img", "measure -f file -O qcow2 r.raw", "compare -f file -F raw r.raw r.raw",
])
def test_file_protocol_as_a_format(oracle, tmp_path, monkeypatch, cmd):
    """qemu's host-file driver can be named as the format (-f file, driver=file): it reads as raw,
    shows as "file" and creates with the host file's options."""
    import shlex

    monkeypatch.chdir(tmp_path)
    qemu("create", "-q", "-f", "raw", "r.raw", "1M")
    args = shlex.split(cmd)
    want = qemu(*args, check=False)
    (tmp_path / "n.img").unlink(missing_ok=True)
    got = run_qimg(*args)
    assert (got.rc, got.out, got.err.replace("qimg:", "qemu-img:")) == (want.rc, want.out, want.err)
