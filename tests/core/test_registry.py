"""Registry: lazy driver lookup, probing (raw scores lowest), the raw-guess warning, open errors."""

from __future__ import annotations

import json
import os

import pytest

from qimg.core import registry
from qimg.errors import OpenError
from qimg.formats.raw import RawDriver
from tests.conftest import run_qimg, run_qimg_subprocess


class ProbeOnlyDriver(RawDriver):
    """A format recognised by its first bytes; otherwise raw."""

    format_name = "probeonly"

    @classmethod
    def probe(cls, head, filename):
        return 100 if head.startswith(b"PROBEONLY") else 0


class WeakDriver(RawDriver):
    format_name = "weak"

    @classmethod
    def probe(cls, head, filename):
        return 1  # ties with raw: raw must keep the file


@pytest.fixture
def fake_formats(monkeypatch):
    monkeypatch.setitem(registry.FORMATS, "probeonly", f"{__name__}:ProbeOnlyDriver")
    monkeypatch.setitem(registry.FORMATS, "weak", f"{__name__}:WeakDriver")
    yield
    registry._cache.pop("probeonly", None)
    registry._cache.pop("weak", None)


def test_raw_scores_lowest():
    assert RawDriver.probe(b"", "x") == 1
    assert RawDriver.probe(os.urandom(2048), "x") == 1


def test_probe_picks_best_and_raw_by_default(fake_formats):
    assert registry.probe(b"PROBEONLY" + bytes(100), "x") == "probeonly"
    assert registry.probe(bytes(2048), "x") == "raw"
    assert registry.probe(b"", "x") == "raw"


def test_probe_real_formats(oracle, tmp_path):
    img = tmp_path / "a.qcow2"
    oracle("create", "-q", "-f", "qcow2", str(img), "1M")
    try:
        registry.get_driver("qcow2")
    except Exception:
        pytest.skip("qcow2 driver not available")
    assert registry.probe(img.read_bytes()[:registry.PROBE_BYTES], str(img)) == "qcow2"


def test_warning_when_raw_is_guessed(tmp_path):
    p = tmp_path / "r.img"
    p.write_bytes(bytes(4096))
    warnings = []
    drv = registry.open_image(str(p), None, warn=warnings.append)
    try:
        assert drv.format_name == "raw"
    finally:
        drv.close()
    assert len(warnings) == 1
    assert warnings[0].startswith(f"Image format was not specified for '{p}' and probing guessed raw.")
    assert "write operations on block 0 will be restricted" in warnings[0]
    warnings.clear()
    registry.open_image(str(p), "raw", warn=warnings.append).close()
    assert warnings == []


def test_probing_opens_read_only(fake_formats, tmp_path):
    p = tmp_path / "p.img"
    p.write_bytes(b"PROBEONLY" + bytes(1000))
    st = os.stat(p)
    drv = registry.open_image(str(p))
    try:
        assert drv.format_name == "probeonly"
        assert not drv.writable
    finally:
        drv.close()
    assert os.stat(p).st_mtime_ns == st.st_mtime_ns


def test_get_driver_unknown_and_cached():
    with pytest.raises(OpenError, match="Unknown driver 'nosuchfmt'"):
        registry.get_driver("nosuchfmt")
    assert registry.get_driver("raw") is registry.get_driver("raw") is RawDriver
    assert "raw" in registry.format_names()


def test_open_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.img"
    with pytest.raises(OpenError) as e:
        registry.open_image(str(missing))
    assert str(e.value) == f"Could not open '{missing}': Could not open '{missing}': No such file or directory"
    with pytest.raises(OpenError, match="Unknown driver 'bogus'"):
        registry.open_image(str(missing), "bogus")


def test_resolve_backing():
    assert registry.resolve_backing("/a/b/top.qcow2", "base.raw") == "/a/b/base.raw"
    assert registry.resolve_backing("top.qcow2", "base.raw") == "base.raw"
    assert registry.resolve_backing("d/top.qcow2", "../base.raw") == "d/../base.raw"
    assert registry.resolve_backing("/a/top.qcow2", "/abs/base.raw") == "/abs/base.raw"


def test_info_and_help_do_not_import_heavy_modules(tmp_path):
    p = tmp_path / "x.raw"
    p.write_bytes(bytes(4096))
    code = ("import sys\nfrom qimg.cli import run\n"
            "import io, contextlib\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert run(['info', {str(p)!r}]) == 0\n"
            "    assert run(['--help']) == 0\n"
            "heavy = [m for m in ('numpy', 'tqdm', 'cryptography', 'zstandard') if m in sys.modules]\n"
            "print(heavy)\n")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    r = run_qimg_subprocess("info", "-f", "raw", p)
    assert r.rc == 0 and "file format: raw" in r.out


def test_help_and_probing_work_without_site_hooks(tmp_path):
    """A plain install has no .pth hooks that happen to import importlib.util and friends."""
    import site
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *site.getsitepackages()]))
    p = tmp_path / "x.raw"
    p.write_bytes(bytes(4096))
    code = ("import sys\nfrom qimg.cli import run\n"
            f"sys.exit(run(['--help']) or run(['info', {str(p)!r}]))\n")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "Supported formats:" in r.stdout and "file format: raw" in r.stdout


@pytest.mark.parametrize("pad, fmt", [(400, "vmdk"), (480, "raw")], ids=["version-within-512", "version-past-512"])
def test_probe_reads_512_bytes_like_qemu(oracle, tmp_path, pad, fmt):
    """A text VMDK descriptor whose ``version=`` line starts past byte 512 is raw to qemu-img's probe."""
    oracle("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", tmp_path / "d.vmdk", "1M")
    img = tmp_path / "p.vmdk"
    img.write_bytes(b"# padding " + b"0" * pad + b"\n" + (tmp_path / "d.vmdk").read_bytes())
    assert (img.read_bytes().index(b"version=") < 512) == (fmt == "vmdk")
    theirs = oracle("info", "--output=json", img)
    ours = run_qimg("info", "--output=json", img)
    assert json.loads(theirs.out)["format"] == fmt
    assert (ours.rc, ours.out, ours.err.replace("qimg:", "qemu-img:")) == (0, theirs.out, theirs.err)
