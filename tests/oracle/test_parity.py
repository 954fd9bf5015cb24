"""Issue 16's divergences from qemu-img 7.2, each run through both tools on the same input."""

from __future__ import annotations

import pytest

from tests.oracle.twin import Twin, build


@pytest.fixture
def twin(tmp_path, qemu_img):
    return Twin(tmp_path)


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_commit_qed_overlay_keeps_its_allocation(twin, base_fmt):
    build(twin.q, "qemu-img", "create", "-q", "-f", base_fmt, "base.img", "4M")
    build(twin.q, "qemu-io", "-f", base_fmt, "-c", "write -P 1 0 2M", "base.img")
    build(twin.q, "qemu-img", "create", "-q", "-f", "qed", "-b", "base.img", "-F", base_fmt, "ov.qed")
    build(twin.q, "qemu-io", "-f", "qed", "-c", "write -P 5 0 64k", "-c", "write -P 6 1M 4k",
          "-c", "write -z 3M 64k", "ov.qed")
    twin.split()
    twin.both("commit", "ov.qed")
    twin.both("map", "--output=json", "ov.qed")
    twin.same_file("ov.qed")
    twin.both("compare", "-f", base_fmt, "-F", "qed", "base.img", "ov.qed")
    twin.both("map", "--output=json", "-f", base_fmt, "base.img")
