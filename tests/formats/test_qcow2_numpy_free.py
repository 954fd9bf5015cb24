"""A plain qcow2 convert (raw -> qcow2, qcow2 -> raw) never imports numpy (start-up cost)."""

import hashlib
from pathlib import Path

import pytest

from tests.conftest import qemu, run_fresh, write_pattern

MiB = 1 << 20


def _run(*args):
    r = run_fresh(*args, watch=("numpy",))
    return {"rc": r["rc"], "numpy": bool(r["loaded"])}


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def src(tmp_path):
    # data runs, a hole, a run crossing an L2 table's span (512 MiB with 64 KiB clusters), a partial cluster
    return write_pattern(tmp_path / "src.raw", 1100 * MiB,
                         [(0, 3 * MiB), (10 * MiB + 4096, 70000), (512 * MiB - MiB, 2 * MiB),
                          (1100 * MiB - 5000, 5000)])


def test_raw_to_qcow2_to_raw_without_numpy(src, tmp_path):
    q = tmp_path / "out.qcow2"
    r = _run("convert", "-f", "raw", "-O", "qcow2", src, q)
    assert r == {"rc": 0, "numpy": False}
    back = tmp_path / "back.raw"
    r = _run("convert", "-f", "qcow2", "-O", "raw", q, back)
    assert r == {"rc": 0, "numpy": False}
    assert _sha(back) == _sha(src)
    r = _run("check", q)
    assert r["rc"] == 0


def test_qcow2_refcount_width_8_still_works(src, tmp_path):
    # unusual refcount widths take the numpy path; the result must be the same
    q = tmp_path / "out.qcow2"
    assert _run("convert", "-f", "raw", "-O", "qcow2", "-o", "refcount_bits=8", src, q)["rc"] == 0
    back = tmp_path / "back.raw"
    assert _run("convert", "-f", "qcow2", "-O", "raw", q, back)["rc"] == 0
    assert _sha(back) == _sha(src)
    assert _run("check", q)["rc"] == 0


def test_qcow2_output_agrees_with_qemu_img(src, tmp_path, qemu_img):
    # the plain-array write path: qemu-img finds the image consistent and equal to the source
    q = tmp_path / "out.qcow2"
    assert _run("convert", "-f", "raw", "-O", "qcow2", src, q)["rc"] == 0
    assert qemu("check", "-f", "qcow2", q).rc == 0
    assert qemu("compare", "-f", "raw", "-F", "qcow2", src, q).rc == 0
