"""Creation options as qemu-img 7.2 lists and prints them: ``-o help`` with and without a target
file name (with one, the host file's own options are merged in and the footnote goes), and the
host file's options (nocow, preallocation, extent_size_hint) accepted by every format and shown
after the format's own in the "Formatting" line."""

from __future__ import annotations

import pytest

from .conftest import qemu, run_qimg

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
