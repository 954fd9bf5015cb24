"""Help for each command, the man page made from the same text, and shell completion."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_qimg

COMMANDS = ["amend", "batch", "bench", "bitmap", "check", "commit", "compare", "completion", "convert", "create", "dd",
            "info", "map", "measure", "rebase", "resize", "snapshot"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_help_three_ways(cmd):
    outs = [run_qimg(cmd, "-h"), run_qimg(cmd, "--help"), run_qimg("help", cmd)]
    for r in outs:
        assert (r.rc, r.err) == (0, "")
        assert r.out.splitlines()[1].startswith(f"usage: qimg {cmd} ")
    assert outs[0].out == outs[1].out == outs[2].out


def test_convert_help_lists_its_options():
    out = run_qimg("convert", "--help").out
    for word in ("-O output_fmt", "'-S' indicates", "Parameters to convert subcommand:", "'-W'", "--progress=json",
                 "Supported formats: "):
        assert word in out
    assert "Parameters to snapshot subcommand" not in out and "'-r' tries to repair" not in out


def test_help_of_an_unknown_command():
    r = run_qimg("help", "nope")
    assert (r.rc, r.out, r.err) == (1, "", "qimg: Command not found: nope\nTry 'qimg --help' for more information\n")


def test_global_help_unchanged():
    r = run_qimg("--help")
    assert r.rc == 0 and r.out.startswith("qimg version ") and "Command syntax:" in r.out
    assert run_qimg("help").out == r.out == run_qimg("-h").out


def test_man_page_is_current():
    from qimg.cli.manpage import render

    page = (ROOT / "qimg" / "data" / "qimg.1").read_text()
    assert page == render(), "regenerate: python -m qimg.cli.manpage > qimg/data/qimg.1"


def test_man_page_renders_cleanly():
    if shutil.which("groff") is None:
        pytest.skip("groff not installed")
    p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(ROOT / "qimg" / "data" / "qimg.1")],
                       capture_output=True, text=True)
    assert (p.returncode, p.stderr) == (0, "")


def test_man_page_is_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"data/qimg.1"' in text and "share/man/man1" in text


@pytest.fixture
def qimg_on_path(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "qimg"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m qimg "$@"\n')
    exe.chmod(0o755)
    home = tmp_path / "home"  # shells keep history and caches there: nothing outside tmp_path
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT), HOME=str(home),
               XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local" / "share"),
               XDG_CACHE_HOME=str(home / ".cache"), ZDOTDIR=str(home))
    (tmp_path / "disk.qcow2").write_bytes(b"")
    (tmp_path / "disk.raw").write_bytes(b"")
    return env


def _bash_complete(env, cwd, *words):
    script = ('eval "$(qimg completion bash)"\n'
              f'COMP_WORDS=({" ".join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n'
              '_qimg; printf "%s\\n" "${COMPREPLY[@]}"\n')
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return sorted(p.stdout.split())


def test_bash_completion(qimg_on_path, tmp_path):
    env = qimg_on_path
    assert _bash_complete(env, tmp_path, "qimg", "con") == ["convert"]
    assert _bash_complete(env, tmp_path, "qimg", "convert", "-O", "qc") == ["qcow", "qcow2"]
    assert _bash_complete(env, tmp_path, "qimg", "info", "-f", "vh") == ["vhdx"]
    assert _bash_complete(env, tmp_path, "qimg", "convert", "--target-i") == ["--target-image-opts",
                                                                             "--target-is-zero"]
    assert _bash_complete(env, tmp_path, "qimg", "convert", "--pro") == ["--progress"]
    assert _bash_complete(env, tmp_path, "qimg", "info", "disk.") == ["disk.qcow2", "disk.raw"]
    assert _bash_complete(env, tmp_path, "qimg", "help", "sn") == ["snapshot"]


def test_fish_completion(qimg_on_path, tmp_path):
    if shutil.which("fish") is None:
        pytest.skip("fish not installed")

    def complete(line):
        p = subprocess.run(["fish", "-c", f'qimg completion fish | source; complete -C "{line}"'],
                           capture_output=True, text=True, env=qimg_on_path, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        return sorted(x.split("\t")[0] for x in p.stdout.splitlines())

    assert complete("qimg con") == ["convert"]
    assert complete("qimg convert -O qc") == ["qcow", "qcow2"]
    assert complete("qimg convert --target-i") == ["--target-image-opts", "--target-is-zero"]
    assert complete("qimg info disk.") == ["disk.qcow2", "disk.raw"]


def test_zsh_completion_registers(qimg_on_path, tmp_path):
    if shutil.which("zsh") is None:
        pytest.skip("zsh not installed")
    p = subprocess.run(["zsh", "-f", "-c", 'autoload -U compinit; compinit -u -D; eval "$(qimg completion zsh)"; '
                        'print -r -- $_comps[qimg]'], capture_output=True, text=True, env=qimg_on_path,
                       cwd=tmp_path)
    assert (p.returncode, p.stdout) == (0, "_qimg\n"), p.stderr


def test_completion_needs_a_shell():
    r = run_qimg("completion", "tcsh")
    assert r.rc == 1 and r.err.startswith("qimg: completion needs a shell: bash, zsh, fish\n")


def test_completion_script_lists_every_format():
    from qimg.core.registry import format_names

    out = run_qimg("completion", "bash").out
    assert all(f in out for f in format_names())
