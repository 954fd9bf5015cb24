"""Crash safety of in-place qcow2 writes (commit into a qcow2 base).

The writes to the base file are cut off after the k-th one, for every k, while ``commit`` copies
an overlay into a qcow2 base with 512-byte clusters: enough new clusters that the refcount table
has to grow (and move), overwritten clusters, and zero writes that free base clusters.  After
each cut the base must pass ``qemu-img check`` (exit 0, or 3 for leaked clusters only) and the
overlay must be unchanged.  Like qemu-img, the base's guest content may be a mix of old and new
while a commit is under way, so only its consistency is asserted.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import qemu, run_qimg, sha256_file


class _Crash(Exception):
    pass


def _qemu_io(path, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(path)], check=True, capture_output=True)


def _commit_cut(monkeypatch, base_path, top_path, limit):
    """Run commit with the base's writes (pwrite/truncate) stopping after ``limit``; returns the count."""
    from qimg.io.store import FileStore
    from qimg.ops.commit import commit

    target = str(base_path)
    count = [0]
    orig_pwrite, orig_truncate = FileStore.pwrite, FileStore.truncate

    def counted(orig):
        def wrapper(self, *args):
            if self.filename.endswith(target) or target.endswith(self.filename):
                if count[0] >= limit:
                    raise _Crash()
                count[0] += 1
            return orig(self, *args)
        return wrapper

    monkeypatch.setattr(FileStore, "pwrite", counted(orig_pwrite))
    monkeypatch.setattr(FileStore, "truncate", counted(orig_truncate))
    try:
        commit(str(top_path), drop=True)
    finally:
        monkeypatch.setattr(FileStore, "pwrite", orig_pwrite)
        monkeypatch.setattr(FileStore, "truncate", orig_truncate)
    return count[0]


@pytest.fixture()
def images(tmp_path, oracle):
    d = tmp_path / "tpl"
    d.mkdir()
    base = d / "base.qcow2"
    qemu("create", "-f", "qcow2", "-o", "cluster_size=512", str(base), "16M")
    # ~7 MiB of the 8 MiB that the first refcount table cluster covers
    _qemu_io(base, "write -P 1 0 3M", "write -P 4 5M 4M")
    top = d / "top.qcow2"
    qemu("create", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "base.qcow2", "-F", "qcow2", str(top), "16M")
    # new clusters past the table's reach, overwrites in place, and zeros over allocated clusters
    _qemu_io(top, "write -P 2 2M 1536k", "write -z 6M 64k", "write -P 3 10M 1M", "write -P 5 14M 512k")
    return d


def test_commit_cut_after_every_write(images, tmp_path, monkeypatch):
    base, top = images / "base.qcow2", images / "top.qcow2"
    rt_before = qemu("info", "--output=json", str(base)).out
    top_sum = sha256_file(top)
    expect_raw = tmp_path / "expect.raw"
    qemu("convert", "-O", "raw", str(top), str(expect_raw))

    full = tmp_path / "full"
    shutil.copytree(images, full)
    total = _commit_cut(monkeypatch, full / "base.qcow2", full / "top.qcow2", 1 << 30)
    assert qemu("check", str(full / "base.qcow2"), check=False).rc == 0
    assert qemu("compare", "-F", "raw", str(full / "base.qcow2"), str(expect_raw), check=False).rc == 0
    # the refcount table had to grow: the header points elsewhere now
    with open(base, "rb") as f:
        old_rt = int.from_bytes(f.read(64)[48:56], "big")
    with open(full / "base.qcow2", "rb") as f:
        new_rt = int.from_bytes(f.read(64)[48:56], "big")
    assert new_rt != old_rt, rt_before
    assert total > 20

    for limit in range(total):
        d = tmp_path / f"c{limit}"
        shutil.copytree(images, d)
        with pytest.raises(_Crash):
            _commit_cut(monkeypatch, d / "base.qcow2", d / "top.qcow2", limit)
        r = qemu("check", str(d / "base.qcow2"), check=False)
        assert r.rc in (0, 3), (limit, total, r.out, r.err)
        assert sha256_file(d / "top.qcow2") == top_sum, limit
        shutil.rmtree(d)


def test_sync_policy_travels_with_the_open(tmp_path):
    """Only an open that says it made the image skips the syncs between metadata stages: an image
    this process created earlier is edited in place as carefully as any other."""
    from qimg.core import registry
    from qimg.options import CACHE_UNSAFE

    img = tmp_path / "a.qcow2"
    src = tmp_path / "a.raw"
    src.write_bytes(b"\x01" * 65536)
    assert run_qimg("convert", "-O", "qcow2", src, img).rc == 0
    drv = registry.open_image(str(img), "qcow2", writable=True)
    try:
        assert drv._sync_meta and drv.direct_writes == ""
    finally:
        drv.close()
    drv = registry.open_image(str(img), "qcow2", writable=True, options={CACHE_UNSAFE: True})
    try:
        assert not drv._sync_meta
    finally:
        drv.close()
