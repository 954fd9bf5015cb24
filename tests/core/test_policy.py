"""The open policy: depth, budget, strict structure, global options, and convert -n onto a broken chain."""

from __future__ import annotations

import struct
import subprocess

import pytest

from qimg.core.policy import Guard, Policy, PolicyError
from tests.conftest import qemu, run_qimg


def test_policy_defaults():
    assert Policy().depth_limit == 64 and Policy().memory_limit is None and not Policy().strict
    p = Policy(untrusted=True)
    assert p.depth_limit == 16 and p.memory_limit == 64 << 20 and p.strict
    assert Policy(untrusted=True, max_depth=3, max_metadata_memory=1000).depth_limit == 3


def test_judge_records_without_raising(tmp_path):
    (tmp_path / "a").write_bytes(b"x")
    p = Policy(untrusted=True).rooted(str(tmp_path / "top.qcow2"))
    ok = p.judge("top.qcow2", "a", str(tmp_path / "a"), "backing file")
    assert ok.allowed and ok.reason is None
    bad = p.judge("top.qcow2", "/etc/passwd", "/etc/passwd", "backing file")
    assert not bad.allowed and bad.reason == "absolute path outside the allowed folders"
    g = Guard(Policy(untrusted=True), str(tmp_path / "top.qcow2"))
    with pytest.raises(PolicyError) as e:
        g.reference("top.qcow2", "/etc/passwd", "/etc/passwd", "data file")
    assert str(e.value) == "Untrusted image 'top.qcow2': data file '/etc/passwd' refused: absolute path outside " \
                           "the allowed folders"
    assert [r.name for r in g.references] == ["/etc/passwd"]
    assert Policy().judge("t", "/etc/passwd", "/etc/passwd", "backing file").allowed  # trusted: qemu's rules


def _chain(tmp_path, n):
    qemu("create", "-q", "-f", "qcow2", tmp_path / "l0.qcow2", "1M")
    for i in range(1, n + 1):
        qemu("create", "-q", "-f", "qcow2", "-b", f"l{i - 1}.qcow2", "-F", "qcow2", tmp_path / f"l{i}.qcow2")
    return tmp_path / f"l{n}.qcow2"


def test_depth(tmp_path):
    top = _chain(tmp_path, 3)
    assert run_qimg("--untrusted", "--max-depth", "3", "map", str(top)).rc == 0
    r = run_qimg("--untrusted", "--max-depth", "2", "map", str(top))
    assert r.rc == 1
    assert r.err == f"qimg: Untrusted image '{top}': backing chain refused: deeper than 2 backing files (--max-depth)\n"
    r = run_qimg("--untrusted", "--max-depth", "2", "info", "--backing-chain", str(top))
    assert r.rc == 1 and "deeper than 2 backing files" in r.err


def test_default_depth_is_16(tmp_path):
    top = _chain(tmp_path, 17)
    r = run_qimg("--untrusted", "map", str(top))
    assert r.rc == 1 and "deeper than 16 backing files" in r.err
    assert run_qimg("map", str(top)).rc == 0  # qemu-img reads it


def test_metadata_budget(tmp_path):
    img = tmp_path / "big.qcow2"
    qemu("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "64G")  # an L1 table of 16 MiB
    r = run_qimg("--untrusted", "--max-metadata-memory", "1M", "info", str(img))
    assert r.rc == 1
    assert r.err.count("\n") == 1 and "over its limit of 1048576 bytes (--max-metadata-memory)" in r.err
    assert run_qimg("--untrusted", "info", str(img)).rc == 0  # 64 MiB by default


def test_bad_global_options(tmp_path):
    r = run_qimg("--untrusted", "--allow-dir", str(tmp_path / "nope"), "info", "x")
    assert r.rc == 1 and "--allow-dir: " in r.err
    assert run_qimg("--max-depth", "x", "info", "x").rc == 1
    assert run_qimg("--max-metadata-memory", "lots", "info", "x").rc == 1


def _l2_entry_past_eof(tmp_path):
    img = tmp_path / "t.qcow2"
    qemu("create", "-q", "-f", "qcow2", img, "1M")
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 64k", str(img)], check=True, capture_output=True)
    data = bytearray(img.read_bytes())
    l1_off = struct.unpack(">Q", data[40:48])[0]
    l2_off = struct.unpack(">Q", data[l1_off:l1_off + 8])[0] & ((1 << 56) - 512)
    entry = struct.unpack(">Q", data[l2_off:l2_off + 8])[0]
    struct.pack_into(">Q", data, l2_off, (entry & ~((1 << 56) - 1)) | (1 << 40))  # a data cluster at 1 TiB
    img.write_bytes(data)
    return img


def test_strict_table_entry_past_eof(tmp_path, oracle):
    img = _l2_entry_past_eof(tmp_path)
    r = run_qimg("--untrusted", "convert", "-O", "raw", str(img), str(tmp_path / "o.raw"))
    assert r.rc == 1
    assert r.err.count("\n") == 1 and f"'{img}': host offset 0x10000000000 of guest offset 0x0 lies past" in r.err
    assert not (tmp_path / "o.raw").exists()
    # without the flag: what qemu-img does with it
    mine = run_qimg("convert", "-O", "raw", str(img), str(tmp_path / "m.raw"))
    theirs = qemu("convert", "-O", "raw", img, tmp_path / "q.raw", check=False)
    assert mine.rc == theirs.rc
    if theirs.rc == 0:
        assert (tmp_path / "m.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()


def test_strict_overlapping_tables(tmp_path):
    img = tmp_path / "t.qcow2"
    qemu("create", "-q", "-f", "qcow2", img, "1M")
    data = bytearray(img.read_bytes())
    struct.pack_into(">Q", data, 48, struct.unpack(">Q", data[40:48])[0])  # refcount table := L1 table
    img.write_bytes(data)
    r = run_qimg("--untrusted", "info", str(img))
    assert r.rc == 1 and "overlaps" in r.err and r.err.count("\n") == 1


def test_convert_n_onto_missing_backing_as_qemu(tmp_path, oracle):
    qemu("create", "-q", "-f", "raw", tmp_path / "src.raw", "1M")
    for tool in ("qemu", "qimg"):
        d = tmp_path / tool
        d.mkdir()
        qemu("create", "-q", "-f", "qcow2", d / "base.qcow2", "1M")
        qemu("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "t.qcow2")
        (d / "base.qcow2").unlink()
    before = (tmp_path / "qimg" / "t.qcow2").read_bytes()
    q = qemu("convert", "-n", "-O", "qcow2", tmp_path / "src.raw", tmp_path / "qemu" / "t.qcow2", check=False)
    r = run_qimg("convert", "-n", "-O", "qcow2", str(tmp_path / "src.raw"), str(tmp_path / "qimg" / "t.qcow2"))
    assert (r.rc, q.rc) == (1, 1)
    assert r.err.replace("qimg:", "").replace("/qimg/", "/") == q.err.replace("qemu-img:", "").replace("/qemu/", "/")
    assert "Could not open backing file" in r.err
    assert (tmp_path / "qimg" / "t.qcow2").read_bytes() == before


@pytest.mark.parametrize("cmd", [["resize", "2M"], ["snapshot", "-c", "s"], ["snapshot", "-l"],
                                 ["amend", "-o", "compat=0.10"], ["check"], ["map"]])
def test_missing_backing_refused_as_qemu(cmd, tmp_path, oracle):
    d = tmp_path
    qemu("create", "-q", "-f", "qcow2", d / "base.qcow2", "1M")
    qemu("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "t.qcow2")
    (d / "base.qcow2").unlink()
    args = [*cmd[:-1], str(d / "t.qcow2"), cmd[-1]] if cmd[0] == "resize" else [*cmd, str(d / "t.qcow2")]
    q = qemu(*args, check=False)
    r = run_qimg(*args)
    assert r.rc == q.rc == 1
    assert r.err.replace("qimg:", "") == q.err.replace("qemu-img:", "")


@pytest.mark.parametrize("fmt", ["qcow2", "qcow", "qed", "vdi", "vpc", "vhdx", "vmdk", "parallels"])
def test_every_table_counts_against_the_budget(fmt, tmp_path):
    """A 64 GiB image's tables (L1, BAT, block map, grain directory) do not fit a 4 KiB budget."""
    img = tmp_path / f"big.{fmt}"
    qemu("create", "-q", "-f", fmt, *(["-o", "cluster_size=4k"] if fmt == "qcow2" else []), img, "64G")
    r = run_qimg("--untrusted", "--max-metadata-memory", "4k", "map", "--output=json", str(img))
    assert r.rc == 1, r.err
    assert r.err.count("\n") == 1 and "over its limit of 4096 bytes (--max-metadata-memory)" in r.err
    assert run_qimg("--untrusted", "map", "--output=json", str(img)).rc == 0


def test_strict_data_past_eof_in_every_reader(tmp_path, oracle):
    """A VDI block map entry (read through the generic driver path) pointing past EOF: zeros for
    qemu-img, an error naming the image and offset in untrusted mode."""
    from qimg.core.chain import Chain

    img = tmp_path / "t.vdi"
    qemu("create", "-q", "-f", "vdi", img, "4M")
    subprocess.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x22 0 1M", str(img)], check=True, capture_output=True)
    with Chain.open(str(img)) as ch:
        bmap_off = ch.top.header["offset_bmap"]
    data = bytearray(img.read_bytes())
    struct.pack_into("<I", data, bmap_off, 3)  # block 0 lives in data block 3: the file holds one block
    img.write_bytes(data)
    r = run_qimg("--untrusted", "convert", "-O", "raw", str(img), str(tmp_path / "o.raw"))
    assert r.rc == 1 and r.err.count("\n") == 1
    assert f"'{img}': block map entry at host offset 0x300400 of guest offset 0x0 lies past the end of the file" \
        in r.err
    mine = run_qimg("convert", "-O", "raw", str(img), str(tmp_path / "m.raw"))
    theirs = qemu("convert", "-O", "raw", img, tmp_path / "q.raw", check=False)
    assert mine.rc == theirs.rc
    if theirs.rc == 0:
        assert (tmp_path / "m.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()
