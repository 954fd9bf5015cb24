"""Images read from URLs: HTTP Range requests against nginx, s3:// through fsspec against moto's S3 server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import qemu, run_qimg, sha256_file
from tests.servers import Misbehaving, MotoS3, Nginx

CLUSTER = 64 << 10


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A directory of images and nginx serving it."""
    root = tmp_path_factory.mktemp("www")
    img = root / "a.qcow2"
    qemu("create", "-f", "qcow2", img, "64M")
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 7 40M 64k", "-c", "write -z 50M 1M",
                    str(img)], check=True, capture_output=True)
    qemu("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", root / "over.qcow2")
    subprocess.run(["qemu-io", "-c", "write -P 9 2M 64k", str(root / "over.qcow2")], check=True, capture_output=True)
    server = Nginx(root, tmp_path_factory.mktemp("nginx"))
    yield server, root
    server.close()


def _local_and_remote(args, served, name="a.qcow2"):
    server, root = served
    local = run_qimg(*[str(root / name) if a == "IMG" else a for a in args])
    remote = run_qimg(*[server.url(name) if a == "IMG" else a for a in args])
    return local, remote


@pytest.mark.parametrize("args", [
    ["info", "--output=json", "IMG"],
    ["map", "--output=json", "IMG"],
    ["check", "--output=json", "IMG"],
    ["measure", "--output=json", "-O", "qcow2", "IMG"],
])
def test_metadata_commands_match_local(served, args):
    server, root = served
    local, remote = _local_and_remote(args, served)
    assert remote.rc == local.rc == 0, remote.err
    lo, re_ = json.loads(local.out), json.loads(remote.out)
    if args[0] == "info":
        assert lo.pop("actual-size") > 0
        assert "actual-size" not in re_  # "disk size: unavailable", as qemu-img for network images
        assert lo.pop("filename") == str(root / "a.qcow2") and re_.pop("filename") == server.url("a.qcow2")
    if args[0] == "check":
        lo.pop("filename"), re_.pop("filename")
    assert re_ == lo


def test_map_matches_qemu_img(served):
    server, root = served
    r = run_qimg("map", "--output=json", server.url("a.qcow2"))
    assert r.rc == 0
    assert r.out == qemu("map", "--output=json", root / "a.qcow2").out


def test_compare_and_backing_over_http(served):
    server, root = served
    r = run_qimg("compare", server.url("a.qcow2"), root / "a.qcow2")
    assert (r.rc, r.out) == (0, "Images are identical.\n")
    # the overlay's relative backing name resolves beside it, on the same server
    r = run_qimg("compare", server.url("over.qcow2"), root / "over.qcow2")
    assert (r.rc, r.out) == (0, "Images are identical.\n"), r.err
    r = run_qimg("compare", server.url("over.qcow2"), server.url("a.qcow2"))
    assert r.rc == 1 and r.out.startswith("Content mismatch at offset 2097152!")


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_convert_from_http(served, tmp_path, out_fmt):
    server, root = served
    out = tmp_path / f"out.{out_fmt}"
    r = run_qimg("convert", "-O", out_fmt, server.url("over.qcow2"), out)
    assert r.rc == 0, r.err
    ref = tmp_path / "ref.raw"
    qemu("convert", "-O", "raw", root / "over.qcow2", ref)
    qemu("compare", "-f", out_fmt, "-F", "raw", out, ref)
    if out_fmt == "raw":
        assert sha256_file(out) == sha256_file(ref)
    else:
        qemu("check", out)


def test_requests_follow_extents_not_clusters(tmp_path):
    """One allocated extent of 256 clusters costs a handful of requests; sixteen separate one-cluster
    extents cost about one each: the count follows the extents."""
    root = tmp_path / "www"
    root.mkdir()
    qemu("create", "-f", "qcow2", root / "one.qcow2", "256M")
    subprocess.run(["qemu-io", "-c", "write -P 1 0 16M", str(root / "one.qcow2")], check=True, capture_output=True)
    qemu("create", "-f", "qcow2", root / "many.qcow2", "256M")
    cmds = []
    for i in range(16):
        cmds += ["-c", f"write -P {i + 1} {i * 16}M 64k"]
    subprocess.run(["qemu-io", *cmds, str(root / "many.qcow2")], check=True, capture_output=True)
    server = Nginx(root, tmp_path / "nginx")
    try:
        for name in ("one.qcow2", "many.qcow2"):
            r = run_qimg("convert", "-O", "raw", server.url(name), tmp_path / f"{name}.raw")
            assert r.rc == 0, r.err
            assert sha256_file(tmp_path / f"{name}.raw") == sha256_file(
                _qemu_raw(root / name, tmp_path / f"{name}.ref"))
        lines = server.requests()
        assert all(line.split(" ")[-2] == "206" for line in lines), lines
        one, many = server.count("one.qcow2"), server.count("many.qcow2")
        # 16 MiB = 256 clusters: metadata blocks + 1 MiB parts, far fewer than the clusters
        assert one <= 24, lines
        # 16 one-cluster extents: the metadata blocks, then one request per extent (no per-cluster reads)
        assert 16 <= many <= 16 + 8, lines
        # only metadata and allocated data: the bytes sent are about the file, never the 256 MiB guest
        sent = sum(int(line.split(" ")[-1]) for line in lines if "/one.qcow2" in line)
        assert sent <= (root / "one.qcow2").stat().st_size + 8 * CLUSTER
    finally:
        server.close()


def _qemu_raw(src, dst):
    qemu("convert", "-O", "raw", src, dst)
    return dst


def test_redirects_are_followed(served, tmp_path):
    server, root = served
    r = run_qimg("convert", "-O", "raw", server.url("moved/over.qcow2"), tmp_path / "out.raw")
    assert r.rc == 0, r.err
    qemu("compare", "-F", "raw", root / "over.qcow2", tmp_path / "out.raw")
    r = run_qimg("info", "--output=json", server.url("moved/a.qcow2"))
    assert (r.rc, json.loads(r.out)["virtual-size"]) == (0, 64 << 20)


def test_backing_file_named_by_url(served, tmp_path):
    """An overlay whose backing file is an absolute URL reads through to it (as qemu-img with curl)."""
    server, root = served
    over = tmp_path / "over-url.qcow2"
    qemu("create", "-f", "qcow2", "-u", "-b", server.url("a.qcow2"), "-F", "qcow2", over, "64M")
    r = run_qimg("compare", over, root / "a.qcow2")
    assert (r.rc, r.out) == (0, "Images are identical.\n"), r.err


def test_http_errors_are_one_line(served, tmp_path):
    server, root = served
    r = run_qimg("info", server.url("missing.qcow2"))
    assert (r.rc, r.out) == (1, "")
    assert r.err == f"qimg: Could not open '{server.url('missing.qcow2')}': HTTP error 404 Not Found\n"
    r = run_qimg("info", server.url("norange/a.qcow2"))
    assert r.rc == 1
    assert r.err == (f"qimg: Could not open '{server.url('norange/a.qcow2')}': the server does not support HTTP "
                     "Range requests (it answered a range request with the whole object)\n")
    r = run_qimg("convert", "-O", "raw", root / "a.qcow2", server.url("new.raw"))
    assert r.rc == 1
    assert r.err == (f"qimg: Could not create '{server.url('new.raw')}': a URL can be read only; "
                     "convert to a local file\n")
    from tests.servers import free_port

    url = f"http://127.0.0.1:{free_port()}/x.qcow2"
    r = run_qimg("info", url)
    assert r.rc == 1 and r.err == f"qimg: Could not open '{url}': Connection refused\n"


@pytest.mark.parametrize("mode", ["truncate", "stall"])
def test_truncated_and_stalled_reads(served, tmp_path, monkeypatch, mode):
    server, root = served
    monkeypatch.setenv("QIMG_REMOTE_TIMEOUT", "1")
    bad = Misbehaving((root / "a.qcow2").read_bytes(), mode)
    try:
        r = run_qimg("convert", "-O", "raw", bad.url(), tmp_path / "out.raw")
    finally:
        bad.close()
    assert r.rc == 1 and r.out == ""
    assert r.err.count("\n") == 1 and r.err.startswith(f"qimg: Could not read '{bad.url()}' at offset "), r.err
    reason = "truncated response: got " if mode == "truncate" else "timed out after 1 s"
    assert reason in r.err
    assert not (tmp_path / "out.raw").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


# ----------------------------------------------------------------------------- fsspec: s3:// on moto

@pytest.fixture(scope="module")
def s3(tmp_path_factory, served):
    pytest.importorskip("s3fs")
    import fsspec.config

    server = MotoS3(tmp_path_factory.mktemp("moto"))
    fs = server.filesystem()
    fs.mkdir("images")
    _, root = served
    fs.put(str(root / "a.qcow2"), "images/dir/a.qcow2")
    saved = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": server.endpoint, "key": "testing", "secret": "testing",
                                "skip_instance_cache": True}
    yield server
    if saved is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = saved
    server.close()


def test_s3_sources(s3, served, tmp_path):
    _, root = served
    url = "s3://images/dir/a.qcow2"
    r = run_qimg("info", "--output=json", url)
    assert r.rc == 0, r.err
    info = json.loads(r.out)
    assert (info["format"], info["virtual-size"], info["filename"]) == ("qcow2", 64 << 20, url)
    r = run_qimg("map", "--output=json", url)
    assert r.out == qemu("map", "--output=json", root / "a.qcow2").out
    r = run_qimg("convert", "-O", "raw", url, tmp_path / "out.raw")
    assert r.rc == 0, r.err
    assert sha256_file(tmp_path / "out.raw") == sha256_file(_qemu_raw(root / "a.qcow2", tmp_path / "ref.raw"))
    r = run_qimg("info", "s3://images/dir/none.qcow2")
    assert (r.rc, r.err) == (1, "qimg: Could not open 's3://images/dir/none.qcow2': No such file or directory\n")


def test_missing_packages_are_named(tmp_path):
    # a backend that is not installed here
    r = run_qimg("info", "gs://bucket/x.qcow2")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    assert (r.rc, r.err) == (1, "qimg: Could not open 'gs://bucket/x.qcow2': gs:// URLs need the package gcsfs: "
                                "pip install gcsfs\n")
    # no fsspec at all
    code = ("import sys; sys.modules['fsspec'] = None; from qimg.cli import run; "
            "sys.exit(run(['info', 's3://bucket/x.qcow2']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr == ("qimg: Could not open 's3://bucket/x.qcow2': s3:// URLs need the package fsspec and s3fs: "
                        "pip install 'qimg[remote]'\n")
