"""dd: operands, quirks, messages and output content against qemu-img 7.2."""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.conftest import guest_sha256, qemu, run_qimg, sha256_file, write_pattern
from tests.ops.test_map import needs_qcow2

MiB = 1 << 20


@pytest.fixture
def raw(tmp_path):
    return write_pattern(tmp_path / "a.raw", 10 * MiB, [(0, 4096), (65536, 100000), (5 * MiB, MiB),
                                                       (10 * MiB - 700, 700)])


def run_both(tmp_path, args, out_fmt=None):
    """Run ``dd`` in both tools, ``OUT`` standing for each tool's own output file."""
    results = []
    for tool, name in (("qemu", "q.out"), ("qimg", "m.out")):
        out = tmp_path / name
        if out.exists():
            out.unlink()
        argv = [str(out) if a == "OUT" else a.replace("of=OUT", f"of={out}") for a in args]
        r = qemu("dd", *argv, check=False) if tool == "qemu" else run_qimg("dd", *argv)
        results.append((r, out))
    (q, qout), (m, mout) = results
    assert m.rc == q.rc, (args, m.err, q.err)
    assert m.out == q.out
    assert m.err == q.err.replace("qemu-img", "qimg").replace(str(qout), str(mout)), args
    assert qout.exists() == mout.exists()
    if qout.exists():
        if out_fmt in (None, "raw"):
            assert os.path.getsize(mout) == os.path.getsize(qout), args
            assert sha256_file(mout) == sha256_file(qout), args
        else:
            assert guest_sha256(mout, out_fmt) == guest_sha256(qout, out_fmt), args
            assert qemu("compare", "-f", out_fmt, "-F", out_fmt, qout, mout, check=False).rc == 0
    return m


@pytest.mark.parametrize("ops", [
    ["bs=64k"], ["bs=1M", "count=3"], ["bs=1M", "skip=5"], ["bs=1M", "skip=5", "count=2"], ["bs=1M", "skip=20"],
    ["bs=3000", "count=2"], ["count=0"], ["bs=1k", "count=1", "bs=2k"], ["bs=1.5k", "count=2"],
    ["bs=1k", "skip=1.5k"], ["bs=1G"], ["bs=4M", "count=1M"], ["bs=1M", "count=3", "skip=9"],
    ["bs=3000", "count=1", "skip=1"], ["skip=0x10", "bs=64k"], ["count=8E"], ["skip=8E"], ["skip=4E", "bs=4"],
    ["bs=1000", "skip=3", "count=7"], ["bs=2147483647", "count=1"], ["bs=64k", "skip=3", "count=100"],
])
def test_dd_raw_matches_qemu(oracle, tmp_path, raw, ops):
    run_both(tmp_path, ["-f", "raw", f"if={raw}", "of=OUT", *ops])


@pytest.mark.parametrize("ops", [[], ["count=4E", "bs=4"], ["bs=7", "skip=3"], ["bs=7", "count=3000"]])
def test_dd_small_blocks_match_qemu(oracle, tmp_path, ops):
    """Tiny block sizes (qemu-img reads block by block: keep the input small)."""
    small = write_pattern(tmp_path / "s.raw", 40000, [(0, 1000), (9000, 3000)])
    run_both(tmp_path, ["-f", "raw", f"if={small}", "of=OUT", *ops])


@pytest.mark.parametrize("ops", [
    ["bs=0"], ["bs=-1"], ["bs=abc"], ["bs=8E"], ["bs=2147483648"], ["count=abc"], ["count=-1"], ["skip=-1"],
    ["foo=1"], ["foo"], ["bs=0", "foo=1"], ["-O", "foo"], ["-O", "bochs"], ["-f", "foo"], ["--bogus"],
    ["-o", "size=1"], ["-f", "raw", "--image-opts"], ["--object", "foo"], ["if="],
])
def test_dd_errors_match_qemu(oracle, tmp_path, raw, ops):
    args = [f"if={raw}", "of=OUT"]
    if ops != ["-f", "foo"]:
        args = ["-f", "raw", *args] if "--image-opts" not in ops else ["--image-opts"] + [
            f"if=driver=raw,file.filename={raw}", "of=OUT", "-f", "raw"]
    if ops == ["-f", "raw", "--image-opts"]:
        ops = []
    run_both(tmp_path, [*args, *ops])


def test_dd_operand_errors(oracle, tmp_path, raw):
    run_both(tmp_path, [f"if={raw}"])
    run_both(tmp_path, ["of=OUT"])
    run_both(tmp_path, [])
    run_both(tmp_path, [f"if={tmp_path / 'nope'}", "of=OUT"])
    run_both(tmp_path, [f"if={tmp_path}", "of=OUT"])
    run_both(tmp_path, ["-f", "raw", f"if={raw}", f"of={tmp_path}"])
    run_both(tmp_path, ["-f", "raw", f"if={raw}", "of=", "count=1"])


def test_dd_probed_input_image_opts_and_repeats(oracle, tmp_path, raw):
    other = write_pattern(tmp_path / "b.raw", 3 * MiB, [(MiB, 4096)], seed=7)
    run_both(tmp_path, [f"if={raw}", "of=OUT", "count=3"])
    run_both(tmp_path, ["--image-opts", f"if=driver=raw,file.filename={raw}", "of=OUT", "count=9"])
    run_both(tmp_path, ["--image-opts", f"if=driver=raw,file.filename={raw}", "of=OUT", "skip=99999"])
    run_both(tmp_path, ["-U", "-f", "raw", f"if={raw}", f"if={other}", "of=OUT"])


def test_dd_overwrites_existing_output(oracle, tmp_path, raw):
    for name in ("q.out", "m.out"):
        (tmp_path / name).write_bytes(b"\xff" * (12 * MiB))
    q = qemu("dd", "-f", "raw", f"if={raw}", f"of={tmp_path / 'q.out'}", "bs=1M", "count=1")
    m = run_qimg("dd", "-f", "raw", f"if={raw}", f"of={tmp_path / 'm.out'}", "bs=1M", "count=1")
    assert m.rc == q.rc == 0
    assert sha256_file(tmp_path / "m.out") == sha256_file(tmp_path / "q.out")
    assert os.path.getsize(tmp_path / "m.out") == MiB


def test_dd_content_is_the_input_range(tmp_path, raw):
    out = tmp_path / "o.raw"
    r = run_qimg("dd", "-f", "raw", f"if={raw}", f"of={out}", "bs=4096", "skip=16", "count=300")
    assert r.rc == 0 and r.err == ""
    data = raw.read_bytes()
    want = data[16 * 4096:300 * 4096]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(want).hexdigest()


def test_dd_plan_quirks():
    from qimg.ops.dd import plan

    assert plan(10 * MiB, MiB, None, 5) == (10 * MiB, 5 * MiB, False)
    assert plan(10 * MiB, MiB, 2, 5) == (2 * MiB, 0, True)  # count limits the input before skip
    assert plan(10 * MiB, 3000, 1, 1) == (3000, 0, False)
    assert plan(10 * MiB, 4, None, 4 << 60) == (10 * MiB, 0, True)


@needs_qcow2
@pytest.mark.parametrize("ops", [["bs=64k", "count=10"], ["bs=1M", "skip=3"], ["bs=3000", "count=5", "skip=1"]])
def test_dd_to_qcow2_matches_qemu(oracle, tmp_path, raw, ops):
    run_both(tmp_path, ["-f", "raw", "-O", "qcow2", f"if={raw}", "of=OUT", *ops], out_fmt="qcow2")
    assert qemu("check", tmp_path / "m.out").rc == 0


@needs_qcow2
def test_dd_from_qcow2_chain(oracle, tmp_path, raw):
    base = tmp_path / "base.qcow2"
    qemu("convert", "-f", "raw", "-O", "qcow2", raw, base)
    top = tmp_path / "top.qcow2"
    qemu("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "12M")
    run_both(tmp_path, [f"if={top}", "of=OUT", "bs=1M", "skip=4"])
    run_both(tmp_path, ["-f", "qcow2", f"if={top}", "of=OUT", "bs=64k", "count=100"])
