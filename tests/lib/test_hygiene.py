"""Library hygiene: a cheap import, a complete and documented public surface, type hints, py.typed."""

from __future__ import annotations

import inspect
import subprocess
import sys

import qimg
from tests.conftest import ROOT

HEAVY = ("numpy", "tqdm", "cryptography", "zstandard", "click")


def _modules_after(code: str) -> set[str]:
    r = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                       capture_output=True, text=True, check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    return set(r.stdout.split())


def test_import_loads_nothing_heavy():
    mods = _modules_after("import qimg")
    assert not {m for m in mods if m.split(".")[0] in HEAVY}
    assert not {m for m in mods if m.startswith("qimg.")}, "names are imported on first use"
    assert "typing" not in mods or "typing" in _modules_after("pass")


def test_metadata_calls_stay_light(tmp_path):
    """open, info and map of a qcow2 import none of the heavy dependencies (nor click)."""
    img = tmp_path / "a.qcow2"
    qimg.create(img, "1G", fmt="qcow2")
    mods = _modules_after(f"import qimg\nwith qimg.open({str(img)!r}) as i: i.info(); list(i.extents())\n"
                          f"qimg.info({str(img)!r}); qimg.map({str(img)!r})")
    assert not {m for m in mods if m.split(".")[0] in HEAVY}


def test_public_surface_is_documented_and_typed():
    assert qimg.__all__ == sorted(set(qimg.__all__) - {"__version__"}) + ["__version__"]
    assert set(dir(qimg)) >= set(qimg.__all__)
    for name in qimg.__all__:
        if name == "__version__":
            continue
        obj = getattr(qimg, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"
        if inspect.isfunction(obj):
            sig = inspect.signature(obj)
            assert sig.return_annotation is not inspect.Signature.empty, f"{name} has no return type"
            for p in sig.parameters.values():
                assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name}) has no type"
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)):
                    assert inspect.getdoc(member), f"{name}.{attr} has no docstring"
    try:
        qimg.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("unknown names must raise AttributeError")


def test_error_tree():
    for name in qimg.__all__:
        obj = getattr(qimg, name)
        if inspect.isclass(obj) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            assert issubclass(obj, qimg.QimgError) and isinstance(obj.exit_code, int), name
    assert qimg.CheckUnsupported.exit_code == 63 and issubclass(qimg.CheckUnsupported, qimg.Unsupported)
    assert issubclass(qimg.InvalidArgument, ValueError) and issubclass(qimg.ClosedImage, ValueError)
    assert issubclass(qimg.LockError, qimg.OpenError)
    assert issubclass(qimg.QimgWarning, UserWarning)


def test_py_typed_is_shipped():
    assert (ROOT / "qimg" / "py.typed").exists()
    assert 'qimg = ["py.typed"' in (ROOT / "pyproject.toml").read_text() or \
        '"py.typed"' in (ROOT / "pyproject.toml").read_text()


def test_type_hints_check_with_mypy(tmp_path):
    """The public layer is fully annotated and consistent (mypy, every def typed)."""
    import pytest

    pytest.importorskip("mypy")
    r = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
                        "--disallow-untyped-defs", "--disallow-incomplete-defs", "--cache-dir", str(tmp_path / "cache"),
                        "qimg/__init__.py", "qimg/api", "qimg/io/fileobj.py", "qimg/errors.py"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
