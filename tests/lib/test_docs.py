"""The README's Python examples run as written, and the API reference builds without a warning."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def section(text: str, title: str) -> str:
    """The text of one ``## title`` section of the README (up to the next ``## `` heading)."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    # the Python API section runs as written; the batch example names a scheduler of the reader's own
    readme = section((ROOT / "README.md").read_text(), "Python API")
    blocks = python_blocks(readme)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102 - the point
    assert (tmp_path / "disk.vmdk").exists() and (tmp_path / "disk.raw").stat().st_size == 64 << 20
    assert not (tmp_path / "out.qcow2").exists()


def test_sphinx_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    r = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"),
                        str(tmp_path / "html")], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    page = (tmp_path / "html" / "api.html").read_text()
    import qimg

    for name in qimg.__all__:
        if name != "__version__":
            assert f'id="qimg.{name}"' in page, name
