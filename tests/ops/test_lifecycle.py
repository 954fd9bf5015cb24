"""check, snapshot, resize, commit, rebase, amend: qimg against the real qemu-img on copies of the same images."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import qemu, run_qimg, sha256_file


def qemu_io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(path)], check=True, capture_output=True)


def guest(path, tmp_path, name):
    out = tmp_path / name
    qemu("convert", "-O", "raw", str(path), str(out))
    return sha256_file(out)


def clean(path):
    r = qemu("check", str(path), check=False)
    assert r.rc == 0, r.out + r.err
    return r


@pytest.fixture
def pair(tmp_path, oracle):
    """Two identical qcow2 images with data, zeros and a gap: ours and the oracle's."""
    a = tmp_path / "a.qcow2"
    qemu("create", "-f", "qcow2", str(a), "64M")
    qemu_io(a, "write -P 1 0 3M", "write -P 2 10M 64k", "write -z 20M 1M", "write -P 3 63M 1M")
    b = tmp_path / "b.qcow2"
    shutil.copy(a, b)
    return a, b


def test_check_clean_human_and_json(pair, tmp_path):
    a, _ = pair
    for extra in ([], ["--output=json"]):
        ours = run_qimg("check", *extra, a)
        ref = qemu("check", *extra, str(a))
        assert ours.rc == 0
        assert ours.out.replace(str(a), "X") == ref.out.replace(str(a), "X")


def test_check_raw_unsupported(tmp_path, oracle):
    r = tmp_path / "r.img"
    r.write_bytes(bytes(1 << 20))
    res = run_qimg("check", "-f", "raw", r)
    assert res.rc == 63
    assert res.err == "qimg: This image format does not support checks\n"


def test_check_bad_repair_mode(pair):
    res = run_qimg("check", "-r", "bogus", pair[0])
    assert res.rc == 1
    assert "Unknown option value for -r (expecting 'leaks' or 'all'): bogus" in res.err


def test_snapshot_cycle_matches_qemu(pair, tmp_path):
    a, b = pair
    for args, io in ((["-c", "s1"], "write -P 7 1M 128k"), (["-c", "s2"], "write -P 8 0 64k"), (["-a", "s1"], None),
                     (["-d", "s1"], None), (["-a", "1"], None), (["-d", "2"], None)):
        r = run_qimg("snapshot", *args, a)
        q = qemu("snapshot", *args, str(b), check=False)
        assert r.rc == q.rc, (args, r.err, q.err)
        assert r.err.replace("qimg", "qemu-img") == q.err.replace(str(b), str(a))
        clean(a)
        if io:
            qemu_io(a, io)
            qemu_io(b, io)
        assert guest(a, tmp_path, "a.raw") == guest(b, tmp_path, "b.raw")


def test_snapshot_list_and_info_agree(pair):
    a, _ = pair
    assert run_qimg("snapshot", "-c", "first", a).rc == 0
    assert run_qimg("snapshot", "-c", "second", a).rc == 0
    ours = run_qimg("snapshot", "-l", a)
    ref = qemu("snapshot", "-l", str(a))
    assert ours.out == ref.out
    info = json.loads(qemu("info", "--output=json", str(a)).out)
    assert [s["name"] for s in info["snapshots"]] == ["first", "second"]
    assert all(s["vm-state-size"] == 0 for s in info["snapshots"])
    clean(a)


def test_snapshot_raw_messages(tmp_path, oracle):
    r = tmp_path / "r.img"
    r.write_bytes(bytes(1 << 20))
    assert run_qimg("snapshot", "-l", r).out == ""
    res = run_qimg("snapshot", "-c", "s", r)
    assert res.rc == 1 and res.err.endswith("qimg: Could not create snapshot 's': -95 (Operation not supported)\n")
    res = run_qimg("snapshot", "-d", "s", r)
    assert res.err.endswith("qimg: Could not delete snapshot 's': snapshot not found\n")
    assert run_qimg("snapshot", "-f", "raw", "-l", r).err.startswith("qimg: unrecognized option '-f'")


@pytest.mark.parametrize("args", [["+1G"], ["--shrink", "30M"], ["--shrink", "-10M"], ["30M"], ["0"],
                                  ["--preallocation=full", "80M"], ["--preallocation=metadata", "96M"],
                                  ["--shrink", "--preallocation=falloc", "1M"], ["100M"]])
def test_resize_qcow2(pair, tmp_path, args):
    a, b = pair
    ours = run_qimg("resize", *args[:-1], a, args[-1])
    ref = qemu("resize", *args[:-1], str(b), args[-1], check=False)
    assert ours.rc == ref.rc, (ours.err, ref.err)
    assert ours.out == ref.out
    assert ours.err.replace("qimg", "qemu-img") == ref.err.replace(str(b), str(a))
    clean(a)
    assert qemu("compare", str(a), str(b), check=False).rc == 0
    assert qemu("info", str(a)).out.splitlines()[2] == qemu("info", str(b)).out.splitlines()[2]


def test_resize_qcow2_with_snapshot(pair, tmp_path):
    a, b = pair
    for img in (a, b):
        qemu("snapshot", "-c", "s", str(img))
    assert run_qimg("resize", "--shrink", a, "20M").rc == 0
    qemu("resize", "--shrink", str(b), "20M")
    clean(a)
    assert guest(a, tmp_path, "a.raw") == guest(b, tmp_path, "b.raw")
    assert run_qimg("snapshot", "-a", "s", a).rc == 0
    qemu("snapshot", "-a", "s", str(b))
    clean(a)
    assert guest(a, tmp_path, "a.raw") == guest(b, tmp_path, "b.raw")


@pytest.mark.parametrize("args", [["512K"], ["-2M"], ["+1M"], ["--shrink", "-512K"], ["--preallocation=full", "512K"],
                                  ["--preallocation=bogus", "2M"], ["abc"], ["--preallocation=falloc", "3M"]])
def test_resize_raw(tmp_path, oracle, args):
    a = tmp_path / "a.img"
    b = tmp_path / "b.img"
    for p in (a, b):
        p.write_bytes(b"\1" * (1 << 20))
    ours = run_qimg("resize", "-f", "raw", *args[:-1], a, args[-1])
    ref = qemu("resize", "-f", "raw", *args[:-1], str(b), args[-1], check=False)
    assert ours.rc == ref.rc
    assert ours.err.replace("qimg", "qemu-img") == ref.err.replace(str(b), str(a))
    assert a.stat().st_size == b.stat().st_size
    assert sha256_file(a) == sha256_file(b)


def _chain(tmp_path, base_fmt="qcow2"):
    base = tmp_path / f"base.{base_fmt}"
    qemu("create", "-f", base_fmt, str(base), "8M")
    qemu_io(base, "write -P 1 0 2M", "write -P 4 6M 1M", fmt=base_fmt)
    top = tmp_path / "top.qcow2"
    qemu("create", "-f", "qcow2", "-b", base.name, "-F", base_fmt, str(top), "16M")
    qemu_io(top, "write -P 2 1M 2M", "write -z 6M 64k", "write -P 3 10M 1M")
    return base, top


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("drop", [False, True])
def test_commit_matches_qemu(tmp_path, oracle, base_fmt, drop):
    d1 = tmp_path / "1"
    d2 = tmp_path / "2"
    d1.mkdir()
    d2.mkdir()
    b1, t1 = _chain(d1, base_fmt)
    b2, t2 = _chain(d2, base_fmt)
    before = guest(t1, tmp_path, "before.raw")
    extra = ["-d"] if drop else []
    r = run_qimg("commit", *extra, t1)
    assert r.rc == 0 and r.out == "Image committed.\n"
    qemu("commit", *extra, str(t2))
    assert guest(t1, tmp_path, "t1.raw") == guest(t2, tmp_path, "t2.raw") == before
    assert guest(b1, tmp_path, "b1.raw") == guest(b2, tmp_path, "b2.raw")
    if base_fmt == "qcow2":
        clean(b1)
    clean(t1)
    def strip(m):
        return [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(m)]
    m1 = qemu("map", "--output=json", str(t1)).out
    m2 = qemu("map", "--output=json", str(t2)).out
    assert strip(m1) == strip(m2)


def test_commit_writes_zero_data_as_data(tmp_path, oracle):
    """What the top stores as data (zeros included) reaches the base as data, as with qemu-img's commit
    job; a zero cluster of the top stays a zero write.  Base and top end up mapped alike."""
    maps = []
    for n, tool in (("1", "qimg"), ("2", "qemu")):
        d = tmp_path / n
        d.mkdir()
        base, top = d / "base.qcow2", d / "top.qcow2"
        qemu("create", "-f", "qcow2", str(base), "8M")
        qemu_io(base, "write -P 1 0 4M")
        qemu("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
        qemu_io(top, "write -P 0 0 1M", "write -P 0 5M 1M", "write -P 2 2M 64k", "write -z 7M 64k")
        if tool == "qimg":
            assert run_qimg("commit", top).rc == 0
        else:
            qemu("commit", str(top))
        clean(base)
        clean(top)
        maps.append([qemu("map", "--output=json", str(p)).out for p in (base, top)])
    assert maps[0] == maps[1]
    assert '"start": 0, "length": 4194304, "depth": 0, "present": true, "zero": false, "data": true' in maps[0][0]


def test_commit_errors(tmp_path, oracle):
    b, t = _chain(tmp_path)
    r = run_qimg("commit", "-b", str(tmp_path / "nonex"), t)
    assert r.rc == 1 and "Did not find" in r.err
    r = run_qimg("commit", b)
    assert r.err == "qimg: Image does not have a backing file\n"


@pytest.mark.parametrize("args", [["-b", "new.raw", "-F", "raw"], ["-b", ""], ["-u", "-b", "new.raw", "-F", "raw"],
                                  ["-b", "new.raw"]])
def test_rebase_matches_qemu(tmp_path, oracle, args):
    dirs = []
    for n in ("1", "2"):
        d = tmp_path / n
        d.mkdir()
        b, t = _chain(d)
        new = d / "new.raw"
        qemu("create", "-f", "raw", str(new), "4M")
        qemu_io(new, "write -P 1 0 1M", "write -P 7 1M 512", fmt="raw")
        dirs.append((b, t))
    (b1, t1), (_b2, t2) = dirs
    base_before = sha256_file(b1)
    before = guest(t1, tmp_path, "before.raw")
    r = run_qimg("rebase", *args, t1)
    q = qemu("rebase", *args, str(t2), check=False)
    assert r.rc == q.rc
    assert r.err.replace("qimg", "qemu-img") == q.err
    clean(t1)
    assert sha256_file(b1) == base_before
    assert guest(t1, tmp_path, "t1.raw") == guest(t2, tmp_path, "t2.raw")
    if "-u" not in args:
        assert guest(t1, tmp_path, "t1.raw") == before
    i1 = json.loads(qemu("info", "--output=json", str(t1)).out)
    i2 = json.loads(qemu("info", "--output=json", str(t2)).out)
    for key in ("backing-filename", "backing-filename-format"):
        assert i1.get(key) == i2.get(key)


@pytest.mark.parametrize("opts", ["compat=0.10", "compat=1.1,lazy_refcounts=on", "refcount_bits=8",
                                  "refcount_bits=64,size=80M", "size=10M", "cluster_size=4k", "foo=bar",
                                  "backing_file=x", "preallocation=full"])
def test_amend_matches_qemu(pair, tmp_path, opts):
    a, b = pair
    r = run_qimg("amend", "-o", opts, a)
    q = qemu("amend", "-o", opts, str(b), check=False)
    assert r.rc == q.rc, (r.err, q.err)
    assert r.err.replace("qimg:", "qemu-img:") == q.err
    clean(a)
    assert guest(a, tmp_path, "a.raw") == guest(b, tmp_path, "b.raw")
    i1 = json.loads(qemu("info", "--output=json", str(a)).out)
    i2 = json.loads(qemu("info", "--output=json", str(b)).out)
    assert i1["format-specific"] == i2["format-specific"]
    assert i1["virtual-size"] == i2["virtual-size"]


def test_amend_downgrade_expands_zero_clusters_with_backing(tmp_path, oracle):
    _b, t = _chain(tmp_path)
    before = guest(t, tmp_path, "before.raw")
    assert run_qimg("amend", "-o", "compat=0.10", t).rc == 0
    clean(t)
    assert guest(t, tmp_path, "after.raw") == before
    assert json.loads(qemu("info", "--output=json", str(t)).out)["format-specific"]["data"]["compat"] == "0.10"


def test_bench_refuses_and_bitmap_adds(tmp_path, oracle):
    a = tmp_path / "a.qcow2"
    qemu("create", "-f", "qcow2", str(a), "1M")
    r = run_qimg("bench", "-c", "10", "-w", a)
    assert r.rc == 1 and "not supported" in r.err
    r = run_qimg("bitmap", "--add", "-g", "64k", a, "b0")
    assert (r.rc, r.err) == (0, "")
    info = json.loads(qemu("info", "--output=json", a).out)
    assert info["format-specific"]["data"]["bitmaps"] == [{"flags": ["auto"], "name": "b0", "granularity": 65536}]


def _three(d):
    d.mkdir()
    m1, m2, m3 = d / "m1.qcow2", d / "m2.qcow2", d / "m3.qcow2"
    qemu("create", "-f", "qcow2", str(m1), "8M")
    qemu_io(m1, "write -P 1 0 4M")
    qemu("create", "-f", "qcow2", "-b", "m1.qcow2", "-F", "qcow2", str(m2))
    qemu_io(m2, "write -P 2 1M 1M")
    qemu("create", "-f", "qcow2", "-b", "m2.qcow2", "-F", "qcow2", str(m3))
    qemu_io(m3, "write -P 3 3M 2M")
    return m1, m2, m3


def test_commit_to_deeper_base_by_recorded_name(tmp_path, oracle):
    a = _three(tmp_path / "a")
    b = _three(tmp_path / "b")
    assert run_qimg("commit", "-b", "m1.qcow2", a[2]).rc == 0
    qemu("commit", "-b", "m1.qcow2", str(b[2]))
    for x, y in zip(a, b):
        assert qemu("compare", str(x), str(y), check=False).rc == 0
        clean(x)


def test_rebase_unsafe_without_backing_detaches(tmp_path, oracle):
    _, _, m3 = _three(tmp_path / "a")
    assert run_qimg("rebase", "-u", m3).rc == 0
    info = json.loads(qemu("info", "--output=json", str(m3)).out)
    assert "backing-filename" not in info
    clean(m3)


def test_rebase_onto_grandparent_keeps_content(tmp_path, oracle):
    _m1, m2, m3 = _three(tmp_path / "a")
    before = guest(m3, tmp_path, "before.raw")
    m2_sum = sha256_file(m2)
    assert run_qimg("rebase", "-b", "m1.qcow2", "-F", "qcow2", m3).rc == 0
    assert guest(m3, tmp_path, "after.raw") == before
    assert sha256_file(m2) == m2_sum
    assert json.loads(qemu("info", "--output=json", str(m3)).out)["backing-filename"] == "m1.qcow2"
    clean(m3)
