"""Every command as a function, held to the command line and to qemu-img."""

from __future__ import annotations

import json
import threading

import pytest

import qimg
from tests.conftest import decompress_to, run_qimg, write_pattern

MiB = 1 << 20

#: formats qimg writes that qemu-img 7.2 also reads (cow is not in 7.2)
WRITABLE = ["raw", "qcow2", "qed", "qcow", "vdi", "vmdk", "vpc", "vhdx", "parallels", "luks"]


@pytest.fixture
def source(tmp_path):
    return write_pattern(tmp_path / "src.raw", 24 * MiB, [(0, 70000), (5 * MiB + 512, 3 * MiB), (20 * MiB, MiB)])


@pytest.mark.parametrize("out_fmt", WRITABLE)
def test_convert_into_every_writable_format(tmp_path, source, oracle, out_fmt):
    out = tmp_path / f"out.{out_fmt}"
    opts, secrets, oracle_fmt = None, None, ["-F", out_fmt]
    if out_fmt == "luks":
        opts, secrets = {"key-secret": "k", "iter-time": "10"}, {"k": "pw"}
    result = qimg.convert(source, out, out_fmt=out_fmt, options=opts, secrets=secrets)
    assert result == qimg.ConvertResult(str(out), out_fmt, 24 * MiB)
    if out_fmt == "luks":
        # qemu-img reads it back with the key (compare cannot take a secret for one side only)
        oracle("convert", "--object", "secret,id=k,data=pw", "--image-opts",
               f"driver=luks,key-secret=k,file.filename={out}", "-O", "raw", tmp_path / "back.raw")
        assert (tmp_path / "back.raw").read_bytes() == source.read_bytes()
        return
    check = oracle("check", "-f", out_fmt, out, check=False)
    assert check.rc in (0, 63), check.err  # clean, or a format qemu-img has no check for
    r = oracle("compare", "-f", "raw", *oracle_fmt, source, out, check=False)
    assert r.rc == 0, r.out + r.err
    # and the library reads back what it wrote
    assert qimg.compare(source, out, fmt1="raw", fmt2=out_fmt).identical


def test_convert_compressed_and_with_backing(tmp_path, source, oracle):
    base = tmp_path / "base.qcow2"
    qimg.convert(source, base, out_fmt="qcow2", compress=True, options="cluster_size=65536")
    assert json.loads(oracle("check", "--output=json", base).out)["compressed-clusters"] > 0
    top = tmp_path / "top.qcow2"
    qimg.create(top, fmt="qcow2", backing_file=str(base), backing_fmt="qcow2")
    assert qimg.info(top).virtual_size == 24 * MiB
    with qimg.open(top, writable=True) as img:
        img.pwrite(MiB, b"\x01" * 4096)
    flat = tmp_path / "flat.qcow2"
    qimg.convert(top, flat, out_fmt="qcow2", backing_file=str(base), backing_fmt="qcow2")
    assert oracle("compare", top, flat).rc == 0
    assert qimg.info(flat).backing_filename == str(base)


def test_two_converts_at_once_in_threads(tmp_path, source, oracle):
    other = write_pattern(tmp_path / "other.raw", 8 * MiB, [(MiB, 2 * MiB)], seed=9)
    errors = []
    jobs = [(source, tmp_path / "a.qcow2", "qcow2"), (other, tmp_path / "b.vdi", "vdi"),
            (source, tmp_path / "c.vmdk", "vmdk"), (other, tmp_path / "d.qcow2", "qcow2")]

    def run(src, dst, fmt):
        try:
            qimg.convert(src, dst, out_fmt=fmt)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for src, dst, fmt in jobs:
        assert oracle("compare", "-f", "raw", "-F", fmt, src, dst).rc == 0
        assert oracle("check", "-f", fmt, dst, check=False).rc in (0, 63)


@pytest.mark.parametrize("stored", ["qcow2/snapshot.qcow2.gz", "vmdk/image.vmdk", "vhdx/dynamic.vhdx.gz",
                                    "vpc/dynamic.vhd.gz", "vdi/basic.vdi.gz"])
def test_info_to_dict_is_the_command_json(shared_images, tmp_path, stored, oracle):
    import os

    path = decompress_to(shared_images / stored, tmp_path)
    with open(path, "rb+") as f:  # settle delayed allocation: "actual-size" is read three times below
        os.fsync(f.fileno())
    cli = run_qimg("info", "--output=json", path)
    assert cli.rc == 0
    info = qimg.info(path)
    assert info.to_dict() == json.loads(cli.out) == json.loads(oracle("info", "--output=json", path).out)
    assert info.to_json() == cli.out
    assert qimg.open(path).info().to_dict() == info.to_dict()
    assert info.virtual_size == info.to_dict()["virtual-size"] and info.format == info.to_dict()["format"]
    chain = qimg.info(path, backing_chain=True)
    cli_chain = run_qimg("info", "--output=json", "--backing-chain", path)
    assert [i.to_dict() for i in chain] == json.loads(cli_chain.out)


def test_info_of_a_chain_and_snapshots(shared_images, tmp_path):
    for n in (1, 2, 3):
        decompress_to(shared_images / f"qcow2/backing-chain-{n}.qcow2.gz", tmp_path)
    chain = qimg.info(tmp_path / "backing-chain-1.qcow2", backing_chain=True)
    assert [i.to_dict() for i in chain] == json.loads(
        run_qimg("info", "--output=json", "--backing-chain", tmp_path / "backing-chain-1.qcow2").out)
    assert chain[0].backing_filename == "backing-chain-2.qcow2"
    snap = decompress_to(shared_images / "qcow2/snapshot.qcow2.gz", tmp_path)
    snaps = qimg.snapshot_list(snap)
    assert [s.to_dict() for s in snaps] == qimg.info(snap).to_dict()["snapshots"]
    assert [s.name for s in snaps] == [s.name for s in qimg.info(snap).snapshots]


def test_check_result_is_the_command_json(tmp_path, oracle, source):
    img = tmp_path / "c.qcow2"
    qimg.convert(source, img, out_fmt="qcow2")
    res = qimg.check(img)
    cli = run_qimg("check", "--output=json", img)
    assert res.to_dict() == json.loads(cli.out) and res.exit_code == cli.rc == 0
    assert res.to_json() == cli.out
    assert res.human() == run_qimg("check", img).out
    with qimg.open(img) as opened:
        assert opened.check() == res


def test_compare_measure_map(tmp_path, source, oracle):
    q = tmp_path / "m.qcow2"
    qimg.convert(source, q, out_fmt="qcow2")
    assert qimg.compare(source, q) and qimg.compare(source, q, strict=False).messages == ("Images are identical.",)
    other = tmp_path / "o.raw"
    other.write_bytes(source.read_bytes()[:-1] + b"\xff")
    diff = qimg.compare(source, other)
    assert not diff and diff.exit_code == 1
    assert diff.messages == tuple(run_qimg("compare", source, other).out.splitlines())
    m = qimg.measure(source, out_fmt="qcow2")
    assert m.to_dict() == json.loads(oracle("measure", "--output=json", "-O", "qcow2", source).out)
    m = qimg.measure(size="10G", out_fmt="qcow2", options={"cluster_size": "2M"})
    assert m.to_json() == run_qimg("measure", "--output=json", "--size", "10G", "-O", "qcow2",
                                   "-o", "cluster_size=2M").out
    assert [e.to_dict() for e in qimg.map(q)] == json.loads(oracle("map", "--output=json", q).out)


def test_edit_commands(tmp_path, source, oracle):
    base = tmp_path / "base.qcow2"
    qimg.convert(source, base, out_fmt="qcow2")
    top = tmp_path / "top.qcow2"
    qimg.create(top, fmt="qcow2", backing_file="base.qcow2", backing_fmt="qcow2")
    with qimg.open(top, writable=True) as img:
        img.pwrite(2 * MiB, b"\x07" * 65536)
    expected = bytearray(source.read_bytes())
    expected[2 * MiB:2 * MiB + 65536] = b"\x07" * 65536
    qimg.commit(top)
    assert qimg.open(base).pread(0, 24 * MiB) == bytes(expected)
    qimg.rebase(top, "", unsafe=True)
    assert qimg.info(top).backing_filename is None
    assert qimg.resize(base, "+8M") == 32 * MiB
    assert qimg.resize(base, 16 * MiB, shrink=True) == 16 * MiB
    qimg.amend(base, {"compat": "0.10"})
    assert qimg.info(base).format_specific["data"]["compat"] == "0.10"
    qimg.snapshot_create(base, "s1")
    with qimg.open(base, writable=True) as img:
        img.pwrite(0, b"\xee" * 512)
    qimg.snapshot_apply(base, "s1")
    assert qimg.open(base).pread(0, 512) == bytes(expected[:512])
    assert [s.name for s in qimg.snapshot_list(base)] == ["s1"]
    qimg.snapshot_delete(base, "s1")
    assert qimg.snapshot_list(base) == []
    assert oracle("check", base).rc == 0
    out = tmp_path / "dd.raw"
    qimg.dd(base, out, fmt="qcow2", bs="64k", count=4, skip=1)
    assert out.read_bytes() == bytes(expected[65536:4 * 65536])


@pytest.mark.parametrize("out_fmt", ["qcow2", "vmdk", "raw"])
def test_convert_into_a_file_object(tmp_path, source, oracle, out_fmt):
    import io

    buf = io.BytesIO()
    result = qimg.convert(io.BytesIO(source.read_bytes()), buf, fmt="raw", out_fmt=out_fmt)
    assert result.target == "<BytesIO>" and result.virtual_size == 24 * MiB
    out = tmp_path / f"out.{out_fmt}"
    out.write_bytes(buf.getvalue())
    assert oracle("compare", "-f", "raw", "-F", out_fmt, source, out).rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out.{out_fmt}", "src.raw"]
    with pytest.raises(qimg.Unsupported, match="several files"):
        qimg.convert(source, io.BytesIO(), out_fmt="vmdk", options={"subformat": "twoGbMaxExtentSparse"})


def _leaky_qcow2(path, oracle):
    """A qcow2 with one leaked cluster: a zero cluster appended to the file with refcount 1."""
    import struct
    import subprocess

    oracle("create", "-q", "-f", "qcow2", path, "4M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", str(path)], check=True, capture_output=True)
    data = bytearray(path.read_bytes())
    table = struct.unpack(">Q", data[48:56])[0]
    block = struct.unpack(">Q", data[table:table + 8])[0]
    index = len(data) // 65536
    data += bytes(65536)
    data[block + 2 * index:block + 2 * index + 2] = struct.pack(">H", 1)
    path.write_bytes(bytes(data))


def test_check_finds_and_repairs_leaks(tmp_path, oracle):
    img = tmp_path / "leak.qcow2"
    _leaky_qcow2(img, oracle)
    res = qimg.check(img)
    theirs = oracle("check", "--output=json", img, check=False)
    assert res.exit_code == theirs.rc == 3 and res.leaks == 1
    assert res.to_dict() == json.loads(theirs.out)
    assert res.messages == ("Leaked cluster 6 refcount=1 reference=0",)
    with qimg.open(img, writable=True) as opened:
        fixed = opened.check(repair="leaks")
    assert (fixed.leaks_fixed, fixed.leaks, fixed.exit_code) == (1, 0, 0)
    assert oracle("check", img).rc == 0
    _leaky_qcow2(img, oracle)
    fixed = qimg.check(img, repair="all")
    assert fixed.exit_code == 0 and fixed.leaks_fixed == 1
    assert oracle("check", img).rc == 0
    _leaky_qcow2(img, oracle)
    cli = run_qimg("check", "--output=json", "-r", "all", img)
    _leaky_qcow2(img, oracle)
    assert qimg.check(img, repair="all").to_json() == cli.out
