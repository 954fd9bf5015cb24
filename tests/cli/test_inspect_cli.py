"""qimg inspect on the command line: JSON keys, exit status 0/1/2, human form, a pipe on /dev/stdin."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, run_qimg
from tests.ops import inspect_images as im

KEYS = ["filename", "format", "candidates", "virtual-size", "safe", "references", "findings", "features",
        "signatures", "bytes-read"]


def test_json_safe(oracle, tmp_path):
    path = im.qcow2(tmp_path / "a.qcow2", "1G")
    r = run_qimg("inspect", "--output=json", path)
    assert r.rc == 0, r.err
    d = json.loads(r.out)
    assert list(d) == KEYS
    assert (d["format"], d["candidates"], d["virtual-size"], d["safe"], d["references"], d["findings"]) == (
        "qcow2", ["qcow2"], 1 << 30, True, [], [])


def test_json_unsafe(oracle, tmp_path):
    path = im.qcow2(tmp_path / "a.qcow2", backing="/etc/passwd", backing_fmt="raw")
    r = run_qimg("inspect", "--output=json", path)
    assert r.rc == 1 and r.err == ""
    d = json.loads(r.out)
    assert d["safe"] is False
    assert d["references"] == [{"kind": "backing file", "name": "/etc/passwd", "resolved": "/etc/passwd",
                                "allowed": False, "image": str(path),
                                "reason": "absolute path outside the allowed folders"}]
    assert [f["id"] for f in d["findings"]] == ["reference-refused"]


def test_human(oracle, tmp_path):
    path = im.with_iso_descriptor(im.qcow2(tmp_path / "a.qcow2", "1M"))
    r = run_qimg("inspect", path)
    assert r.rc == 1
    lines = r.out.splitlines()
    assert lines[:4] == [f"image: {path}", "format: qcow2", "candidates: qcow2, iso",
                         "virtual size: 1 MiB (1048576 bytes)"]
    assert "finding polyglot: signatures of qcow2 (offset 0), iso (offset 32768)" in lines
    assert lines[-1] == "verdict: unsafe"


def test_allowed_formats(oracle, tmp_path):
    path = im.qcow2(tmp_path / "a.qcow2")
    assert run_qimg("inspect", "--allowed-formats", "qcow2,raw", path).rc == 0
    r = run_qimg("inspect", "--allowed-formats", "raw", "--output=json", path)
    assert r.rc == 1 and [f["id"] for f in json.loads(r.out)["findings"]] == ["format-not-allowed"]
    r = run_qimg("inspect", "--allowed-formats", "qcow3", path)
    assert (r.rc, r.err) == (2, "qimg: --allowed-formats: unknown format 'qcow3'\n")


def test_could_not_inspect_is_2(tmp_path):
    r = run_qimg("inspect", tmp_path / "missing.qcow2")
    assert (r.rc, r.out) == (2, "")
    assert r.err == f"qimg: Could not open '{tmp_path / 'missing.qcow2'}': No such file or directory\n"
    assert run_qimg("inspect").rc == 2
    assert run_qimg("inspect", "--bogus", "x").rc == 2
    assert run_qimg("inspect", "--output=xml", "x").rc == 2
    assert run_qimg("inspect", "-f", "nosuch", tmp_path).rc == 2
    r = run_qimg("inspect", "/dev/zero")  # endless: refused, not read
    assert (r.rc, r.err) == (2, "qimg: Could not open '/dev/zero': a character device is not an image\n")


def _pipe(path, *args):
    with open(path, "rb") as src:
        p = subprocess.run([sys.executable, "-m", "qimg", "inspect", "--output=json", *args, "/dev/stdin"],
                           stdin=src, capture_output=True, cwd=ROOT, timeout=120)
    return p.returncode, json.loads(p.stdout or b"null"), p.stderr.decode()


def _pipe_through_cat(path, *args):
    """The image through a real pipe (a shell's ``cat img | qimg inspect /dev/stdin``)."""
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    try:
        p = subprocess.run([sys.executable, "-m", "qimg", "inspect", "--output=json", *args, "/dev/stdin"],
                           stdin=cat.stdout, capture_output=True, cwd=ROOT, timeout=120)
    finally:
        cat.stdout.close()
        cat.wait()
    return p.returncode, json.loads(p.stdout or b"null"), p.stderr.decode()


def test_pipe_qcow2(oracle, tmp_path):
    path = im.qcow2(tmp_path / "a.qcow2", "10G")
    rc, d, err = _pipe_through_cat(path)
    assert rc == 0, err
    assert (d["format"], d["virtual-size"], d["safe"]) == ("qcow2", 10 << 30, True)
    assert d["bytes-read"] == path.stat().st_size  # a stream is read to its end (its trailer is part of the verdict)


def test_pipe_polyglot_trailer(oracle, tmp_path):
    path = im.append(im.qcow2(tmp_path / "a.qcow2"), im.vhd_footer(1 << 20))
    rc, d, _ = _pipe_through_cat(path)
    assert (rc, d["candidates"], [f["id"] for f in d["findings"]]) == (1, ["qcow2", "vpc"], ["polyglot"])


def test_pipe_backing_has_no_folder(oracle, tmp_path):
    """A stream has no folder: a relative name is refused; an absolute one inside --allow-dir is allowed."""
    im.qcow2(tmp_path / "base.qcow2")
    rel = im.qcow2(tmp_path / "rel.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    absolute = im.qcow2(tmp_path / "abs.qcow2", backing=str(tmp_path / "base.qcow2"), backing_fmt="qcow2")
    rc, d, _ = _pipe_through_cat(rel, "--allow-dir", str(tmp_path))
    assert rc == 1 and not d["references"][0]["allowed"]
    rc, d, _ = _pipe_through_cat(absolute)
    assert rc == 1 and not d["references"][0]["allowed"]
    rc, d, _ = _pipe_through_cat(absolute, "--allow-dir", str(tmp_path))
    assert rc == 0 and d["references"][0]["allowed"]


def test_pipe_raw_and_fixed_vhd(oracle, tmp_path):
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"\1" * (3 << 20))
    rc, d, _ = _pipe_through_cat(raw)
    assert (rc, d["format"], d["virtual-size"]) == (0, "raw", 3 << 20)
    vhd = im.create(tmp_path / "f.vhd", "vpc", "2M", "subformat=fixed")
    rc, d, _ = _pipe_through_cat(vhd)
    assert (rc, d["format"], d["candidates"]) == (0, "vpc", ["vpc"])


def test_stdin_redirected_from_file(oracle, tmp_path):
    """/dev/stdin that is a regular file is read as a file (head and tail only)."""
    path = im.qcow2(tmp_path / "a.qcow2", "10G")
    rc, d, err = _pipe(path)
    assert rc == 0, err
    assert d["bytes-read"] < (1 << 20)
