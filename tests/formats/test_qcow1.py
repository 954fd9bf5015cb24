"""qcow (version 1): create, read, write, compression, backing files, AES, hostile headers."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from tests.conftest import guest_sha256, open_rw, qemu, run_qimg, sha256_file, write_pattern

KEY = ["--object", "secret,id=s0,data=abc"]


def qimg_map(path, fmt=None):
    """The merged map of an image as qemu-img map --output=json lists it."""
    from qimg.core.chain import Chain
    from qimg.core.extent import coalesce

    out = []
    with Chain.open(str(path), fmt) as chain:
        for e in coalesce(chain.extents()):
            d = {"start": e.start, "length": e.length, "depth": e.depth, "present": e.present,
                 "zero": e.zero, "data": e.data}
            if e.offset is not None and (e.data or e.zero and e.present):
                d["offset"] = e.offset
            out.append(d)
    return out


def qemu_map(path, *extra):
    return json.loads(qemu("map", "--output=json", *extra, str(path)).out)


def make_src(tmp_path):
    src = tmp_path / "src.raw"
    write_pattern(src, 4 << 20, [(1 << 20, 100000)])
    with open(src, "r+b") as f:
        f.write(b"hello world " * 1000)
        f.seek(3 << 20)
        f.write(bytes(range(256)) * 64)
    return src


def test_probe_and_header_limits():
    from qimg.formats.qcow import QcowDriver

    hdr = struct.pack(">II", 0x514649FB, 1)
    assert QcowDriver.probe(hdr + bytes(40), "x") == 100
    assert QcowDriver.probe(struct.pack(">II", 0x514649FB, 2) + bytes(40), "x") == 0
    assert QcowDriver.probe(b"", "x") == 0


def test_create_matches_qemu(tmp_path, oracle):
    r = run_qimg("create", "-f", "qcow", tmp_path / "a.qcow", "10M")
    assert r.rc == 0
    assert r.out == f"Formatting '{tmp_path / 'a.qcow'}', fmt=qcow size=10485760\n"
    oracle("create", "-f", "qcow", tmp_path / "b.qcow", "10M")
    assert (tmp_path / "a.qcow").read_bytes() == (tmp_path / "b.qcow").read_bytes()
    # with a backing file: 512-byte clusters, name after the header
    r = run_qimg("create", "-f", "qcow", "-b", "a.qcow", "-F", "qcow", tmp_path / "o1.qcow")
    assert r.rc == 0, r.err
    assert "backing_file=a.qcow backing_fmt=qcow" in r.out
    oracle("create", "-f", "qcow", "-b", "a.qcow", "-F", "qcow", tmp_path / "o2.qcow")
    assert (tmp_path / "o1.qcow").read_bytes() == (tmp_path / "o2.qcow").read_bytes()
    # sizes round up to 512
    run_qimg("create", "-f", "qcow", tmp_path / "u.qcow", "1000")
    assert "(1024 bytes)" in run_qimg("info", tmp_path / "u.qcow").out


def test_create_help_and_bad_option(tmp_path, oracle):
    ours = run_qimg("create", "-f", "qcow", "-o", "help")
    assert ours.rc == 0
    assert ours.out == oracle("create", "-f", "qcow", "-o", "help").out
    r = run_qimg("create", "-f", "qcow", "-o", "cluster_size=4k", tmp_path / "x.qcow", "1M")
    assert r.rc == 1 and "Invalid parameter 'cluster_size'" in r.err


def test_info_matches_qemu(tmp_path, oracle):
    img = tmp_path / "q.qcow"
    oracle("create", "-f", "qcow", img, "10M")
    subprocess_io(img, "write -P 0x11 4k 8k", "write -P 0x22 5M 100k")
    for args in ([], ["--output=json"]):
        assert run_qimg("info", *args, img).out == oracle("info", *args, img).out


def subprocess_io(img, *cmds, extra=()):
    import subprocess

    args = ["qemu-io", *extra]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(img)], check=True, capture_output=True)


def test_read_qemu_written_image_and_overlay(tmp_path, oracle):
    base = tmp_path / "base.qcow"
    oracle("create", "-f", "qcow", base, "10M")
    subprocess_io(base, "write -P 0x11 4k 8k", "write -P 0x22 5M 100k", "write -P 0x33 10239k 1k")
    top = tmp_path / "top.qcow"
    oracle("create", "-f", "qcow", "-b", "base.qcow", "-F", "qcow", top)
    subprocess_io(top, "write -P 0x44 6k 1k", "write -P 0x55 5200k 3k")
    for img in (base, top):
        raw = tmp_path / (img.name + ".raw")
        oracle("convert", "-O", "raw", img, raw)
        assert guest_sha256(img) == sha256_file(raw)
        assert qimg_map(img) == qemu_map(img)


def test_convert_compressed(tmp_path, oracle):
    src = make_src(tmp_path)
    out = tmp_path / "c.qcow"
    r = run_qimg("convert", "-c", "-O", "qcow", src, out)
    assert r.rc == 0, r.err
    assert oracle("compare", src, out).rc == 0
    m = qemu_map(out)
    # compressed clusters have no offset; incompressible random clusters stay plain
    assert m[0]["data"] and "offset" not in m[0]
    assert any("offset" in e for e in m)
    assert guest_sha256(out) == sha256_file(src)
    # qemu-img's own compressed image reads the same
    qc = tmp_path / "qc.qcow"
    oracle("convert", "-c", "-O", "qcow", src, qc, check=False)
    assert guest_sha256(qc) == sha256_file(src)
    assert qimg_map(qc) == qemu_map(qc)


def test_convert_plain_and_back(tmp_path, oracle):
    src = make_src(tmp_path)
    out = tmp_path / "p.qcow"
    assert run_qimg("convert", "-O", "qcow", src, out).rc == 0
    assert oracle("compare", src, out).rc == 0
    assert oracle("compare", "-f", "raw", "-F", "qcow", src, out).rc == 0
    back = tmp_path / "back.raw"
    assert run_qimg("convert", "-f", "qcow", "-O", "raw", out, back).rc == 0
    assert sha256_file(back) == sha256_file(src)


def test_overlay_partial_cluster_writes(tmp_path, oracle):

    base = tmp_path / "base.qcow"
    src = make_src(tmp_path)
    oracle("convert", "-O", "qcow", src, base)
    top = tmp_path / "top.qcow"
    assert run_qimg("create", "-f", "qcow", "-b", "base.qcow", "-F", "qcow", top).rc == 0
    expect = bytearray(src.read_bytes())
    writes = [(100, b"A" * 50), (1 << 20, b"B" * 7000), ((2 << 20) - 10, b"C" * 20), (4190000, b"D" * 4304)]
    drv = open_rw(str(top), "qcow")
    try:
        for off, data in writes:
            drv.pwrite(off, data)
            expect[off:off + len(data)] = data
        drv.write_zeroes(3 << 20, 1000)
        expect[3 << 20:(3 << 20) + 1000] = bytes(1000)
    finally:
        drv.close()
    want = tmp_path / "want.raw"
    want.write_bytes(expect)
    assert oracle("compare", "-F", "raw", top, want).rc == 0
    assert guest_sha256(top) == hashlib.sha256(expect).hexdigest()


def test_commit_style_make_empty(tmp_path, oracle):

    img = tmp_path / "m.qcow"
    src = make_src(tmp_path)
    oracle("convert", "-O", "qcow", src, img)
    drv = open_rw(str(img), "qcow")
    drv.make_empty()
    drv.close()
    assert qemu_map(img) == [{"start": 0, "length": 4 << 20, "depth": 0, "present": False, "zero": True,
                              "data": False}]


def test_aes_roundtrip(tmp_path, oracle):
    src = make_src(tmp_path)
    img = tmp_path / "e.qcow"
    r = run_qimg("convert", *KEY, "-O", "qcow", "-o", "encrypt.format=aes,encrypt.key-secret=s0", src, img)
    assert r.rc == 0, r.err
    io = f"driver=qcow,encrypt.key-secret=s0,file.filename={img}"
    back = tmp_path / "back.raw"
    oracle("convert", *KEY, "--image-opts", io, "-O", "raw", back)
    assert sha256_file(back) == sha256_file(src)
    info = run_qimg("info", img)
    assert info.rc == 0 and "encrypted: yes" in info.out
    # qemu-written encrypted data reads back through qimg with the key
    q = tmp_path / "q.qcow"
    oracle("create", "-f", "qcow", *KEY, "-o", "encrypt.format=aes,encrypt.key-secret=s0", q, "1M")
    import subprocess

    subprocess.run(["qemu-io", *KEY, "--image-opts", f"driver=qcow,encrypt.key-secret=s0,file.filename={q}",
                    "-c", "write -P 0x5a 1000 5000"], check=True, capture_output=True)
    qraw = tmp_path / "q.raw"
    oracle("convert", *KEY, "--image-opts", f"driver=qcow,encrypt.key-secret=s0,file.filename={q}", "-O", "raw",
           qraw)
    ours = tmp_path / "ours.raw"
    r = run_qimg("convert", *KEY, "--image-opts", f"driver=qcow,encrypt.key-secret=s0,file.filename={q}", "-O",
                 "raw", ours)
    assert r.rc == 0, r.err
    assert sha256_file(ours) == sha256_file(qraw)
    # without the key: qemu-img's message, exit 1
    r = run_qimg("convert", "-O", "raw", q, tmp_path / "nokey.raw")
    assert r.rc == 1 and "Parameter 'encrypt.key-secret' is required for cipher" in r.err


def test_aes_partial_writes(tmp_path, oracle):
    """Writes into an encrypted image go out as whole encrypted clusters, old content merged in."""
    from qimg.objects import add_object

    src = make_src(tmp_path)
    img = tmp_path / "e.qcow"
    assert run_qimg("convert", *KEY, "-O", "qcow", "-o", "encrypt.format=aes,encrypt.key-secret=s0", src, img).rc == 0
    add_object("secret,id=s0,data=abc")
    expect = bytearray(src.read_bytes())
    drv = open_rw(str(img), "qcow", options={"encrypt.key-secret": "s0"})
    try:
        for off, data in ((100, b"A" * 50), ((1 << 20) + 4000, b"B" * 70000), ((2 << 20) - 10, b"C" * 20)):
            drv.pwrite(off, data)
            expect[off:off + len(data)] = data
    finally:
        drv.close()
    back = tmp_path / "back.raw"
    oracle("convert", *KEY, "--image-opts", f"driver=qcow,encrypt.key-secret=s0,file.filename={img}", "-O", "raw",
           back)
    assert back.read_bytes() == bytes(expect)


@pytest.mark.parametrize("patch,needle", [
    ((32, b"\x14"), "Cluster size must be between 512 and 64k"),
    ((33, b"\x14"), "L2 table size must be between 512 and 64k"),
    ((24, b"\x00\x7f" + b"\xff" * 6), "L1 table entries"),
    ((24, b"\xff" * 8), "Image too large"),
    ((8, struct.pack(">QI", 48, 4096)), "backing file name length 4096"),
    ((36, b"\x00\x00\x00\x05"), "invalid encryption method"),
    ((40, struct.pack(">Q", 1 << 40)), "L1 table offset"),
])
def test_hostile_headers(tmp_path, patch, needle):
    img = tmp_path / "h.qcow"
    assert run_qimg("create", "-f", "qcow", img, "10M").rc == 0
    data = bytearray(img.read_bytes())
    off, b = patch
    data[off:off + len(b)] = b
    img.write_bytes(data)
    r = run_qimg("info", "-f", "qcow", img)
    assert r.rc == 1
    assert needle in r.err
    assert r.err.count("\n") == 1 and "Traceback" not in r.err


def test_hostile_l2_offset(tmp_path):
    img = tmp_path / "h.qcow"
    src = make_src(tmp_path)
    assert run_qimg("convert", "-O", "qcow", src, img).rc == 0
    data = bytearray(img.read_bytes())
    data[48:56] = struct.pack(">Q", 1 << 50)
    img.write_bytes(data)
    r = run_qimg("convert", "-f", "qcow", "-O", "raw", img, tmp_path / "o.raw")
    assert r.rc == 1 and "L2 table offset" in r.err and "Traceback" not in r.err


def test_cli_map_and_encrypted_info(tmp_path, oracle):
    img = tmp_path / "q.qcow"
    oracle("create", "-f", "qcow", img, "10M")
    subprocess_io(img, "write -P 0x11 4k 8k", "write -P 0x22 5M 100k")
    top = tmp_path / "t.qcow"
    oracle("create", "-f", "qcow", "-b", "q.qcow", "-F", "qcow", top)
    subprocess_io(top, "write -P 0x33 6k 1k")
    for path in (img, top):
        for args in ([], ["--output=json"]):
            assert run_qimg("map", *args, path).out == oracle("map", *args, path).out
    enc = tmp_path / "e.qcow"
    r = run_qimg("create", "-f", "qcow", *KEY, "-o", "encryption=on,encrypt.key-secret=s0", enc, "1M")
    assert r.rc == 0, r.err
    assert "encryption=on encrypt.key-secret=s0" in r.out
    for args in ([], ["--output=json"]):
        assert run_qimg("info", *args, enc).out == oracle("info", *args, enc).out
    r = run_qimg("create", "-f", "qcow", "-o", "encryption=on", tmp_path / "n.qcow", "1M")
    assert r.rc == 1 and "Parameter 'encrypt.key-secret' is required for cipher" in r.err
