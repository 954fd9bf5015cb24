"""qcow2 writing: create as qemu-img does, convert into qcow2, random writes; qemu-img checks every result."""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from tests.conftest import open_rw, qemu, qemu_create_pbkdf, qemu_img_path, run_qimg

MiB = 1 << 20


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _create_line(out: str, name: str) -> str:
    return out.replace(name, "X")


def test_options_help_matches_qemu(oracle):
    r = run_qimg("create", "-f", "qcow2", "-o", "help")
    assert r.rc == 0
    assert r.out == oracle("create", "-f", "qcow2", "-o", "help").out


CREATE_CASES = [
    ("", "1G"), ("", "0"), ("", "1536"), ("compat=0.10", "1G"), ("compat=v2", "0"), ("compat=v3", "1M"),
    ("compat=1.1,lazy_refcounts=on", "1M"), ("lazy_refcounts=true", "1M"),
    ("cluster_size=512", "1M"), ("cluster_size=512", "1G"), ("cluster_size=512,refcount_bits=64", "1G"),
    ("cluster_size=4k,refcount_bits=1", "1G"), ("cluster_size=2M,refcount_bits=64", "0"),
    ("cluster_size=2M,extended_l2=on", "1M"), ("cluster_size=0x1000", "1M"), ("cluster_size=4096b", "1M"),
    ("cluster_size=64k,cluster_size=128k", "1M"), ("extended_l2=on", "1G"), ("extended_l2=yes", "1M"),
    ("lazy_refcounts=on,compression_type=zstd", "1G"), ("refcount_bits=8,cluster_size=16k", "100G"),
    ("preallocation=metadata", "1M"), ("preallocation=metadata,extended_l2=on", "1M"), ("preallocation=off", "1M"),
    ("data_file=df.raw", "1G"), ("data_file=df.raw,data_file_raw=on", "1M"),
    ("data_file=df.raw,data_file_raw=on", "1G"), ("data_file=df.raw,data_file_raw=on,extended_l2=on", "1G"),
    ("cluster_size=64k", "2251799813685248"),
]


@pytest.mark.parametrize("opts,size", CREATE_CASES)
def test_create_identical_to_qemu(tmp_path, oracle, monkeypatch, opts, size):
    """The "Formatting" line and every byte of the new image (and data file) equal qemu-img's."""
    monkeypatch.chdir(tmp_path)
    args = ["-o", opts] if opts else []
    q = oracle("create", "-f", "qcow2", *args, "q.qcow2", size)
    qdata = None
    if os.path.exists("df.raw"):
        os.rename("df.raw", "q-df.raw")
        qdata = os.path.getsize("q-df.raw")
    r = run_qimg("create", "-f", "qcow2", *args, "m.qcow2", size)
    assert r.rc == 0, r.err
    assert _create_line(r.out, "m.qcow2") == _create_line(q.out, "q.qcow2")
    assert _read("m.qcow2") == _read("q.qcow2")
    if qdata is not None:
        assert os.path.getsize("df.raw") == qdata
    oracle("check", "-q", "m.qcow2")


@pytest.mark.parametrize("opts,size", [
    ("preallocation=falloc", "1M"), ("preallocation=full,cluster_size=4k", "1M"), ("preallocation=metadata", "1G"),
    ("preallocation=full,data_file=pd.raw", "1M"), ("cluster_size=512", "128G"),
])
def test_create_preallocated_checks(tmp_path, oracle, monkeypatch, opts, size):
    monkeypatch.chdir(tmp_path)
    r = run_qimg("create", "-f", "qcow2", "-o", opts, "m.qcow2", size)
    assert r.rc == 0, r.err
    oracle("check", "-q", "m.qcow2")
    q = oracle("create", "-f", "qcow2", "-o", opts, "q.qcow2", size)
    assert _create_line(r.out, "m.qcow2") == _create_line(q.out, "q.qcow2")
    info = json.loads(oracle("info", "--output=json", "m.qcow2").out)
    assert info["virtual-size"] == json.loads(oracle("info", "--output=json", "q.qcow2").out)["virtual-size"]
    assert oracle("compare", "-q", "m.qcow2", "q.qcow2", check=False).rc == 0


@pytest.mark.parametrize("opts", [
    "cluster_size=1k,extended_l2=on", "compression_type=zstd,compat=0.10", "refcount_bits=3", "cluster_size=100",
    "cluster_size=4M", "preallocation=bogus", "compat=0.9", "data_file_raw=on", "lazy_refcounts=on,compat=0.10",
    "extended_l2=on,compat=0.10", "data_file=x.raw,compat=0.10", "compression_type=lz4",
    "refcount_bits=1,compat=0.10", "cluster_size=abc", "lazy_refcounts=maybe", "refcount_bits=abc",
    "refcount_bits=128", "encrypt.format=luks", "encryption=on", "extended_l2=2", "encrypt.iter-time=x",
    "data_file_raw=maybe",
])
def test_create_refusals_match_qemu(tmp_path, oracle, monkeypatch, opts):
    monkeypatch.chdir(tmp_path)
    q = oracle("create", "-f", "qcow2", "-o", opts, "x.qcow2", "1M", check=False)
    r = run_qimg("create", "-f", "qcow2", "-o", opts, "x.qcow2", "1M")
    assert q.rc == 1 and r.rc == 1
    assert r.err.replace("qimg:", "qemu-img:") == q.err
    assert r.out == q.out  # the "Formatting" line only for errors found after option parsing


def test_backing_name_longer_than_1023_bytes_refused(tmp_path, oracle, monkeypatch):
    """create and rebase -u refuse a backing name the header cannot hold, with qemu-img's words;
    create leaves no file behind."""
    monkeypatch.chdir(tmp_path)
    ok, long = "b" * 1023, "b" * 1024
    for name, rc in ((ok, 0), (long, 1)):
        args = ["create", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2"]
        q = oracle(*args, "q.qcow2", "1M", check=False)
        r = run_qimg(*args, "q.qcow2", "1M")
        assert q.rc == r.rc == rc
        assert r.err.replace("qimg:", "qemu-img:") == q.err and r.out == q.out
        assert os.path.exists("q.qcow2") == (rc == 0)
        if rc:
            assert q.err.endswith("with format 'qcow2': Invalid argument\n")
        else:
            os.unlink("q.qcow2")
    oracle("create", "-q", "-f", "qcow2", "x.qcow2", "1M")
    before = open("x.qcow2", "rb").read()
    q = oracle("rebase", "-u", "-b", long, "-F", "raw", "x.qcow2", check=False)
    r = run_qimg("rebase", "-u", "-b", long, "-F", "raw", "x.qcow2")
    assert q.rc == r.rc == 1 and r.err.replace("qimg:", "qemu-img:") == q.err
    assert open("x.qcow2", "rb").read() == before


def test_create_size_limit(tmp_path, oracle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run_qimg("create", "-f", "qcow2", "-o", "cluster_size=512", "x.qcow2", "129G")
    assert r.rc == 1
    assert r.err.strip().endswith("The image size is too large for file format 'qcow2' "
                                  "(try using a larger cluster size)")


def test_create_with_backing(tmp_path, oracle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    oracle("create", "-q", "-f", "qcow2", "base.qcow2", "1G")
    q = oracle("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "q.qcow2")
    r = run_qimg("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "m.qcow2")
    assert r.rc == 0, r.err
    assert _create_line(r.out, "m.qcow2") == _create_line(q.out, "q.qcow2")
    assert _read("m.qcow2") == _read("q.qcow2")


# ---------------------------------------------------------------- convert into qcow2

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    if qemu_img_path() is None:
        pytest.skip("qemu-img not installed")
    d = tmp_path_factory.mktemp("qcow2src")
    rnd = random.Random(7)
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(12 * MiB + 4096)
        for off, n in ((0, 300000), (2 * MiB + 512, 70000), (5 * MiB, 3 * MiB), (12 * MiB, 4096)):
            f.seek(off)
            f.write(rnd.randbytes(n))
        f.seek(9 * MiB)
        f.write(b"compress me " * 50000)
        f.seek(11 * MiB)
        f.write(bytes(MiB))  # written zeros
    base = d / "base.qcow2"
    qemu("convert", "-O", "qcow2", raw, base)
    ovl = d / "ovl.qcow2"
    qemu("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "extended_l2=on", ovl)
    subprocess.run(["qemu-io", "-c", "write -P 0x99 60k 8k", "-c", "write -z 1500k 10k", "-c",
                    "write -P 0x98 3M 100k", "-c", "write -z 5M 2k", "-c", "write -P 7 12M 4096", str(ovl)],
                   check=True, capture_output=True)
    comp = d / "comp.qcow2"
    qemu("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", raw, comp)
    return {"raw": raw, "ovl": ovl, "comp": comp, "base": base}


CONVERT_OPTS = [
    [], ["-c"], ["-c", "-o", "compression_type=zstd"], ["-o", "cluster_size=512"],
    ["-o", "cluster_size=4k,refcount_bits=1"], ["-o", "extended_l2=on"], ["-c", "-o", "extended_l2=on"],
    ["-o", "compat=0.10"], ["-o", "preallocation=metadata"], ["-o", "preallocation=full"],
    ["-o", "cluster_size=2M,refcount_bits=64"], ["-c", "-o", "cluster_size=4k"], ["-o", "lazy_refcounts=on"],
    ["-o", "data_file=out.dat"], ["-o", "data_file=out.dat,data_file_raw=on"],
]


@pytest.mark.parametrize("opts", CONVERT_OPTS, ids=lambda o: " ".join(o) or "default")
@pytest.mark.parametrize("src", ["raw", "ovl", "comp"])
def test_convert_to_qcow2(sources, tmp_path, monkeypatch, opts, src):
    monkeypatch.chdir(tmp_path)
    r = run_qimg("convert", "-O", "qcow2", *opts, sources[src], "out.qcow2")
    assert r.rc == 0, r.err
    qemu("check", "-q", "out.qcow2")
    assert qemu("compare", "-q", sources[src], "out.qcow2", check=False).rc == 0
    data = json.loads(qemu("info", "--output=json", "out.qcow2").out)["format-specific"]["data"]
    text = " ".join(opts)
    assert data["compat"] == ("0.10" if "compat=0.10" in text else "1.1")
    if "extended_l2=on" in text:
        assert data["extended-l2"] is True
    if "zstd" in text:
        assert data["compression-type"] == "zstd"
    if "refcount_bits=1" in text:
        assert data["refcount-bits"] == 1
    if "data_file" in text:
        assert data["data-file"] == "out.dat"
        assert data["data-file-raw"] is ("data_file_raw=on" in text)
    if "lazy_refcounts=on" in text:
        assert data["lazy-refcounts"] is True
    if "-c" in opts:
        res = json.loads(qemu("check", "--output=json", "out.qcow2").out)
        assert res.get("compressed-clusters", 0) > 0


@pytest.mark.parametrize("cluster", ["512", "64k", "2M"])
@pytest.mark.parametrize("workers", ["1", "2", "4"])
def test_convert_workers_write_new_qcow2_directly(sources, tmp_path, monkeypatch, cluster, workers):
    """convert's workers map and write a new qcow2 themselves, in any order; the result is a clean
    image with the source's content, whatever the cluster size and worker count."""
    from qimg.formats.qcow2 import writer

    mapped = []
    real = writer.Qcow2Writer.direct_map
    monkeypatch.setattr(writer.Qcow2Writer, "direct_map", lambda self, o, n: mapped.append(n) or real(self, o, n))
    out = tmp_path / "o.qcow2"
    r = run_qimg("convert", "-m", workers, "-O", "qcow2", "-o", f"cluster_size={cluster}", sources["raw"], out)
    assert r.rc == 0, r.err
    assert mapped
    qemu("check", "-q", out)
    assert qemu("compare", "-q", sources["raw"], out, check=False).rc == 0
    # written zeros inside the data stay unallocated, as in qemu-img's output
    m = json.loads(qemu("map", "--output=json", out).out)
    assert not any(e["data"] and e["start"] <= 11 * MiB + 4096 < e["start"] + e["length"] for e in m)


def test_convert_into_existing_empty_qcow2_writes_directly(sources, tmp_path, monkeypatch):
    """convert -n writes with qemu-img's cache mode unsafe: the workers write the data themselves."""
    from qimg.formats.qcow2 import writer

    calls = []
    orig = writer.Qcow2Writer.direct_map
    monkeypatch.setattr(writer.Qcow2Writer, "direct_map", lambda self, *a: calls.append(a) or orig(self, *a))
    out = tmp_path / "o.qcow2"
    qemu("create", "-q", "-f", "qcow2", out, str(12 * MiB + 4096))
    r = run_qimg("convert", "-n", "-O", "qcow2", sources["raw"], out)
    assert r.rc == 0, r.err
    assert calls
    qemu("check", "-q", out)
    assert qemu("compare", "-q", sources["raw"], out, check=False).rc == 0


@pytest.mark.parametrize("cluster", ["64k", "4k"])
def test_convert_into_existing_qcow2_with_data(sources, tmp_path, cluster):
    """A -n target that already holds data (allocated, zero and unallocated clusters): the result is the
    source, byte for byte, and the image stays consistent."""
    out = tmp_path / "o.qcow2"
    qemu("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", out, str(12 * MiB + 4096))
    subprocess.run(["qemu-io", "-c", "write -P 0x55 0 1M", "-c", "write -P 0x66 2M 3M", "-c", "write -z 6M 1M",
                    "-c", "write -P 0x77 10M 100k", "-c", "write -P 1 12M 4096", str(out)],
                   check=True, capture_output=True)
    r = run_qimg("convert", "-n", "-O", "qcow2", sources["raw"], out)
    assert r.rc == 0, r.err
    qemu("check", "-q", out)
    assert qemu("compare", "-q", sources["raw"], out, check=False).rc == 0


def test_compressed_keeps_incompressible_plain(sources, tmp_path):
    out = tmp_path / "c.qcow2"
    assert run_qimg("convert", "-c", "-O", "qcow2", sources["raw"], out).rc == 0
    m = json.loads(qemu("map", "--output=json", out).out)
    # random data at 5 MiB does not shrink: stored plainly (host offset shown); text is compressed (none)
    plain = [e for e in m if e["data"] and "offset" in e]
    comp = [e for e in m if e["data"] and "offset" not in e]
    assert any(e["start"] <= 5 * MiB < e["start"] + e["length"] for e in plain)
    assert any(e["start"] <= 9 * MiB < e["start"] + e["length"] for e in comp)


@pytest.mark.parametrize("opts", [[], ["-o", "extended_l2=on"], ["-c"], ["-o", "compat=0.10,cluster_size=4k"]])
def test_convert_with_backing_output(sources, tmp_path, monkeypatch, opts):
    monkeypatch.chdir(tmp_path)
    import shutil

    shutil.copy(sources["base"], "base.qcow2")
    r = run_qimg("convert", "-O", "qcow2", *opts, "-B", "base.qcow2", "-F", "qcow2", sources["ovl"], "out.qcow2")
    assert r.rc == 0, r.err
    qemu("check", "-q", "out.qcow2")
    assert qemu("compare", "-q", sources["ovl"], "out.qcow2", check=False).rc == 0
    info = json.loads(qemu("info", "--output=json", "out.qcow2").out)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"


@pytest.mark.parametrize("target_opts", ["", "extended_l2=on", "compat=0.10", "cluster_size=4k"])
def test_convert_into_existing(sources, tmp_path, target_opts):
    tgt = tmp_path / "t.qcow2"
    args = ["-o", target_opts] if target_opts else []
    qemu("create", "-q", "-f", "qcow2", *args, tgt, str(12 * MiB + 4096))
    subprocess.run(["qemu-io", "-c", "write -P 0xee 0 13M", str(tgt)], check=False, capture_output=True)
    subprocess.run(["qemu-io", "-c", "write -P 0xee 0 12M", str(tgt)], check=True, capture_output=True)
    qemu("snapshot", "-c", "keep", tgt)
    before = tmp_path / "keep.raw"
    qemu("convert", "-l", "keep", "-O", "raw", tgt, before)
    r = run_qimg("convert", "-n", "-O", "qcow2", sources["comp"], tgt)
    assert r.rc == 0, r.err
    qemu("check", "-q", tgt)
    assert qemu("compare", "-q", sources["raw"], tgt, check=False).rc == 0
    after = tmp_path / "keep2.raw"
    qemu("convert", "-l", "keep", "-O", "raw", tgt, after)
    assert before.read_bytes() == after.read_bytes()


# ---------------------------------------------------------------- random writes through the driver

WRITE_CASES = [
    ("", False), ("", True), ("cluster_size=4k", True), ("cluster_size=512,refcount_bits=2", False),
    ("extended_l2=on", False), ("extended_l2=on", True), ("extended_l2=on,cluster_size=16k", True),
    ("compat=0.10", True), ("data_file=t.dat", False), ("data_file=t.dat", True),
    ("data_file=t.dat,data_file_raw=on", False), ("refcount_bits=64,cluster_size=2M", False),
]


@pytest.mark.parametrize("opts,backing", WRITE_CASES)
def test_random_writes(tmp_path, oracle, monkeypatch, opts, backing):
    """Odd-sized writes, zero writes (unmapping or not) and compressed writes against a bytearray model."""

    monkeypatch.chdir(tmp_path)
    size = 3 * MiB + 1536
    model = bytearray(size)
    args = []
    if backing:
        oracle("create", "-q", "-f", "qcow2", "b.qcow2", size)
        subprocess.run(["qemu-io", "-c", f"write -P 0x5a 0 {size}", "b.qcow2"], check=True, capture_output=True)
        model[:] = b"\x5a" * size
        args = ["-b", "b.qcow2", "-F", "qcow2"]
    r = run_qimg("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), *args, "t.qcow2", size)
    assert r.rc == 0, r.err
    rnd = random.Random(opts + str(backing))
    with open_rw("t.qcow2", "qcow2") as drv:
        cs = drv.cluster_size
        for i in range(80):
            off = rnd.randrange(0, size)
            n = rnd.randrange(1, min(200000, size - off) + 1)
            if rnd.random() < 0.3:
                off = off // 4096 * 4096
                n = min(size - off, max(4096, n // 4096 * 4096))
            op = rnd.random()
            if op < 0.55:
                data = rnd.randbytes(n) if rnd.random() < 0.3 else bytes([rnd.randrange(1, 256)]) * n
                drv.pwrite(off, data)
                model[off:off + n] = data
            elif op < 0.8:
                drv.write_zeroes(off, n, rnd.random() < 0.5)
                model[off:off + n] = bytes(n)
            elif "data_file" not in opts:
                off = off // cs * cs
                n = min(size - off, max(cs, n // cs * cs))
                data = bytes(rnd.randrange(0, 3) for _ in range(64)) * (n // 64) + bytes(n % 64)
                drv.write_compressed(off, data)
                model[off:off + n] = data
            if rnd.random() < 0.1:
                drv.flush()
            if rnd.random() < 0.15:
                o = rnd.randrange(0, size)
                k = min(size - o, 70000)
                from qimg.core.chain import Chain  # noqa: F401  (the driver's own view, no backing)
                if not backing:
                    assert drv.pread(o, k) == bytes(model[o:o + k])
    oracle("check", "-q", "t.qcow2")
    oracle("convert", "-O", "raw", "t.qcow2", "o.raw")
    assert _read("o.raw") == bytes(model)


def test_write_past_end_refused(tmp_path, oracle):
    from qimg.core import registry
    from qimg.errors import QimgError

    p = tmp_path / "t.qcow2"
    assert run_qimg("create", "-q", "-f", "qcow2", p, "1M").rc == 0
    with registry.open_image(str(p), "qcow2", writable=True) as drv, pytest.raises(QimgError):
        drv.pwrite(MiB - 10, b"x" * 20)
    oracle("check", "-q", p)


# ---------------------------------------------------------------- LUKS encryption

SECRET = ["--object", "secret,id=s0,data=pw"]
ENC_OPTS = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"


def test_create_encrypted(tmp_path, oracle, monkeypatch):
    """qemu-img opens the LUKS image qimg made (layout and size as its own), reads and writes it."""
    monkeypatch.chdir(tmp_path)
    r = run_qimg("create", *SECRET, "-f", "qcow2", "-o", ENC_OPTS, "m.qcow2", "8M")
    assert r.rc == 0, r.err
    assert "fmt=qcow2 encrypt.format=luks encrypt.key-secret=s0 encrypt.iter-time=10 cluster_size" in r.out
    info = json.loads(oracle("info", "--output=json", "m.qcow2").out)
    assert info["encrypted"] is True
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
    assert info["format-specific"]["data"]["encrypt"]["slots"][0]["active"] is True
    qemu_create_pbkdf("-q", "-f", "qcow2", *SECRET, "-o", ENC_OPTS, "q.qcow2", "8M")
    assert os.path.getsize("m.qcow2") == os.path.getsize("q.qcow2")
    spec = "driver=qcow2,file.filename=m.qcow2,encrypt.key-secret=s0"
    p = subprocess.run(["qemu-io", *SECRET, "--image-opts", "-c", "write -P 0x42 1000 100000", "-c",
                        "read -P 0x42 1000 100000", "-c", "read -P 0 200k 100k", spec],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("src", ["raw", "ovl"])
def test_convert_to_encrypted(sources, tmp_path, monkeypatch, src):
    monkeypatch.chdir(tmp_path)
    r = run_qimg("convert", *SECRET, "-O", "qcow2", "-o", ENC_OPTS, sources[src], "enc.qcow2")
    assert r.rc == 0, r.err
    sec_spec = "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s0"
    fmt = "raw" if src == "raw" else "qcow2"
    c = subprocess.run(["qemu-img", "compare", *SECRET, "--image-opts", f"driver={fmt},file.filename={sources[src]}",
                        sec_spec], capture_output=True, text=True, check=False)
    assert c.returncode == 0, c.stdout + c.stderr
    c = subprocess.run(["qemu-img", "check", *SECRET, "--image-opts", sec_spec], capture_output=True, text=True,
                       check=False)
    assert c.returncode == 0, c.stdout + c.stderr
    r = run_qimg("convert", "-c", *SECRET, "-O", "qcow2", "-o", ENC_OPTS, sources[src], "enc2.qcow2")
    assert r.rc == 1 and r.err == "qimg: Compression and encryption not supported at the same time\n"  # as qemu-img


def test_encrypted_random_writes(tmp_path, oracle, monkeypatch):
    from qimg import objects

    monkeypatch.chdir(tmp_path)
    objects.add_object("secret,id=s0,data=pw")
    size = 2 * MiB + 512
    assert run_qimg("create", "-q", *SECRET, "-f", "qcow2", "-o", ENC_OPTS, "t.qcow2", size).rc == 0
    model = bytearray(size)
    rnd = random.Random(5)
    with open_rw("t.qcow2", "qcow2", options={"encrypt.key-secret": "s0"}) as drv:
        for _ in range(40):
            off = rnd.randrange(0, size)
            n = rnd.randrange(1, min(150000, size - off) + 1)
            if rnd.random() < 0.7:
                data = rnd.randbytes(n)
                drv.pwrite(off, data)
                model[off:off + n] = data
            else:
                drv.write_zeroes(off, n, rnd.random() < 0.5)
                model[off:off + n] = bytes(n)
        assert drv.pread(0, size) == bytes(model)
    spec = "driver=qcow2,file.filename=t.qcow2,encrypt.key-secret=s0"
    subprocess.run(["qemu-img", "convert", *SECRET, "--image-opts", spec, "-O", "raw", "o.raw"], check=True)
    assert _read("o.raw") == bytes(model)


@pytest.mark.parametrize("backing", [False, True])
def test_write_over_mixed_allocation_goes_in_runs(tmp_path, oracle, monkeypatch, backing):
    """A write across clusters written in place, never-written clusters and a zero cluster is split
    at the allocation changes, one host write per run (as qemu-img splits a request), not one per
    cluster; the guest view and qemu-img check agree."""
    from qimg.io.store import FileStore

    monkeypatch.chdir(tmp_path)
    if backing:
        qemu("create", "-q", "-f", "qcow2", "base.qcow2", "8M")
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 8M", "base.qcow2"], check=True,
                       capture_output=True)
        qemu("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "t.qcow2", "8M")
    else:
        qemu("create", "-q", "-f", "qcow2", "t.qcow2", "8M")
    # clusters 0-3 and 8-9 written (in place, contiguous), 12 a zero cluster, the rest never written
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 256k", "-c", "write -P 2 512k 128k",
                    "-c", "write -z 768k 64k", "t.qcow2"], check=True, capture_output=True)
    data = bytes(range(256)) * (2 << 20 >> 8)  # 2 MiB over clusters 0-31
    writes = []
    orig = FileStore.pwrite

    def counted(self, offset, buf):
        writes.append((offset, len(memoryview(buf))))
        return orig(self, offset, buf)

    with open_rw("t.qcow2", "qcow2") as drv:
        monkeypatch.setattr(FileStore, "pwrite", counted)
        drv.pwrite(0, data)
        monkeypatch.setattr(FileStore, "pwrite", orig)
    data_writes = [w for w in writes if w[1] >= 65536]
    # runs: 0-3 in place, 4-7 new, 8-9 in place, 10-11 new, 12 (zero) alone, 13-31 new
    assert len(data_writes) == 6, writes
    assert sum(n for _, n in data_writes) == len(data)
    assert qemu("check", "t.qcow2").rc == 0
    expect = tmp_path / "expect.raw"
    expect.write_bytes(data + (b"\x07" if backing else b"\0") * ((8 << 20) - len(data)))
    assert qemu("compare", "-f", "qcow2", "-F", "raw", "t.qcow2", str(expect), check=False).rc == 0
