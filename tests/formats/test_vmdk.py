"""VMDK: reading what qemu-img writes, writing what qemu-img accepts, the corpus, hostile input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import struct

import pytest

from tests.conftest import decompress_to, open_rw, oracle_raw, qemu, run_qimg, sha256_file, write_pattern

MiB = 1 << 20
GRAIN = 65536
SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"]


def _pattern(path, size=6 * MiB):
    """Data runs that start and end inside grains, plus a run spanning many grains."""
    return write_pattern(path, size, [(0, 4096), (GRAIN - 512, 70000), (MiB + 123, 3 * GRAIN),
                                      (2 * MiB, MiB), (size - 5000, 5000)])


def _qimg_sha(path, fmt="vmdk"):
    from qimg.core.chain import Chain

    h = hashlib.sha256()
    with Chain.open(str(path), fmt) as chain:
        pos = 0
        while pos < chain.virtual_size:
            n = min(4 * MiB, chain.virtual_size - pos)
            h.update(chain.read(pos, n))
            pos += n
    return h.hexdigest()


def _random_reads(path, raw, count=60, seed=3):
    """Reads crossing grain boundaries agree with qemu-img's raw conversion."""
    from qimg.core.chain import Chain

    data = open(raw, "rb").read()
    rnd = random.Random(seed)
    with Chain.open(str(path), "vmdk") as chain:
        for _ in range(count):
            g = rnd.randrange(0, max(1, len(data) // GRAIN))
            off = max(0, g * GRAIN - rnd.randrange(0, 3000))
            n = min(rnd.randrange(1, 3 * GRAIN), len(data) - off)
            assert chain.read(off, n) == data[off:off + n], (off, n)


def _map(args_tool, path):
    if args_tool == "qemu":
        return qemu("map", "-f", "vmdk", "--output=json", str(path)).out
    r = run_qimg("map", "-f", "vmdk", "--output=json", str(path))
    assert r.rc == 0, r.err
    return r.out


def _info_json(path, tool):
    if tool == "qemu":
        return json.loads(qemu("info", "-f", "vmdk", "--output=json", str(path)).out)
    r = run_qimg("info", "-f", "vmdk", "--output=json", str(path))
    assert r.rc == 0, r.err
    return json.loads(r.out)


def _mask_cid(data: bytes) -> bytes:
    """File bytes with the random CIDs masked (the embedded descriptor area compared as text)."""
    def mask(t):
        return re.sub(rb"CID=[0-9a-f]+", b"CID=X", re.sub(rb"parentCID=[0-9a-f]+", b"parentCID=X", t))
    if data[:4] == b"KDMV":
        return data[:512] + mask(data[512:21 * 512].rstrip(b"\0")) + data[21 * 512:]
    return mask(data)


# ---------------------------------------------------------------- reading qemu-img's images

QEMU_VARIANTS = [
    ("monolithicSparse", ""),
    ("monolithicSparse", "zeroed_grain=on"),
    ("monolithicSparse", "adapter_type=lsilogic,hwversion=7,toolsversion=11"),
    ("monolithicSparse", "compat6=on"),
    ("monolithicFlat", "adapter_type=buslogic"),
    ("twoGbMaxExtentSparse", ""),
    ("twoGbMaxExtentFlat", "compat6=on"),
    ("streamOptimized", ""),
    ("streamOptimized", "adapter_type=legacyESX"),
]


@pytest.mark.parametrize("subformat,extra", QEMU_VARIANTS)
def test_reads_qemu_written_images(oracle, tmp_path, subformat, extra):
    src = _pattern(tmp_path / "src.raw")
    img = tmp_path / "img.vmdk"
    opts = f"subformat={subformat}" + (f",{extra}" if extra else "")
    oracle("convert", "-f", "raw", "-O", "vmdk", "-o", opts, src, img)
    raw = oracle_raw(img, tmp_path, "vmdk")
    assert _qimg_sha(img) == sha256_file(raw)
    _random_reads(img, raw)
    assert _map("qimg", img) == _map("qemu", img)
    mine, theirs = _info_json(img, "qimg"), _info_json(img, "qemu")
    assert mine["format-specific"] == theirs["format-specific"]
    assert mine.get("cluster-size") == theirs.get("cluster-size")
    assert mine["virtual-size"] == theirs["virtual-size"]


def test_reads_qemu_io_writes_zeroed_grain_and_backing(oracle, tmp_path):
    base = tmp_path / "base.vmdk"
    oracle("create", "-q", "-f", "vmdk", base, "4M")
    subprocess_io(base, "write -P 0x11 0 4M")
    top = tmp_path / "top.vmdk"
    oracle("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", "base.vmdk", "-F", "vmdk", top)
    subprocess_io(top, "write -P 0x22 1000 70000", "write -z 1M 128k", "write -P 0x33 3M 512")
    raw = oracle_raw(top, tmp_path, "vmdk")
    assert _qimg_sha(top) == sha256_file(raw)
    _random_reads(top, raw)
    assert _map("qimg", top) == _map("qemu", top)
    info = _info_json(top, "qimg")
    assert info["backing-filename"] == "base.vmdk"
    assert info["backing-filename-format"] == "vmdk"
    assert info["format-specific"] == _info_json(top, "qemu")["format-specific"]


def subprocess_io(path, *cmds):
    import subprocess

    args = ["qemu-io", "-f", "vmdk"]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(args + [str(path)], capture_output=True, text=True)
    assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr


def test_reads_flat_with_separate_descriptor_in_other_dir(oracle, tmp_path):
    sub = tmp_path / "d"
    sub.mkdir()
    src = _pattern(tmp_path / "src.raw", 2 * MiB)
    oracle("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", src, sub / "f.vmdk")
    img = sub / "f.vmdk"
    assert _qimg_sha(img) == sha256_file(src)
    mine, theirs = _info_json(img, "qimg"), _info_json(img, "qemu")
    assert mine["format-specific"] == theirs["format-specific"]
    assert mine["format-specific"]["data"]["extents"][0]["filename"] == str(sub / "f-flat.vmdk")


def test_vmfs_and_multi_extent_descriptor(oracle, tmp_path):
    _pattern(tmp_path / "x.raw", 4 * MiB)
    oracle("create", "-q", "-f", "vmdk", tmp_path / "s.vmdk", "2M")
    subprocess_io(tmp_path / "s.vmdk", "write -P 0x5a 64k 100k")
    (tmp_path / "d.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n'
        '# Extent description\nRW 4096 FLAT "x.raw" 0\nRW 4096 SPARSE "s.vmdk"\nRW 2048 FLAT "x.raw" 2048\n')
    img = tmp_path / "d.vmdk"
    raw = oracle_raw(img, tmp_path, "vmdk")
    assert _qimg_sha(img) == sha256_file(raw)
    _random_reads(img, raw)
    assert _info_json(img, "qimg")["format-specific"] == _info_json(img, "qemu")["format-specific"]
    (tmp_path / "v.vmdk").write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
                                     'createType="vmfs"\n\n# Extent description\nRW 4096 VMFS "x.raw"\n')
    assert _qimg_sha(tmp_path / "v.vmdk") == sha256_file(oracle_raw(tmp_path / "v.vmdk", tmp_path, "vmdk", "v.raw"))
    assert (_info_json(tmp_path / "v.vmdk", "qimg")["format-specific"]
            == _info_json(tmp_path / "v.vmdk", "qemu")["format-specific"])


def _make_cowd(path, sectors=4096, granularity=16, seed=5):
    """A VMDK3 (COWD) sparse file: header, one grain directory, 4096-entry grain tables, grains."""
    rnd = random.Random(seed)
    gt_span = 4096 * granularity
    gd_entries = -(-sectors // gt_span)
    gd_offset = 4
    gt_offset = gd_offset + 1
    data_sector = gt_offset + gd_entries * 32
    grains = sectors // granularity
    gts = [0] * (gd_entries * 4096)
    blobs = []
    for g in rnd.sample(range(grains), min(grains, 40)):
        gts[g] = data_sector
        blobs.append((data_sector, rnd.randbytes(granularity * 512)))
        data_sector += granularity
    with open(path, "wb") as f:
        f.write(struct.pack("<IIIIIIII", 0x44574F43, 1, 3, sectors, granularity, gd_offset, gd_entries, data_sector))
        f.seek(512)
        f.write(b"CID=2345abcd\nparentCID=ffffffff\n")  # qemu-img looks for the CIDs at offset 512
        f.seek(gd_offset * 512)
        f.write(struct.pack(f"<{gd_entries}I", *[gt_offset + i * 32 for i in range(gd_entries)]))
        f.seek(gt_offset * 512)
        f.write(struct.pack(f"<{len(gts)}I", *gts))
        for sec, blob in blobs:
            f.seek(sec * 512)
            f.write(blob)
        f.truncate(data_sector * 512)


def test_reads_vmdk3_cowd(oracle, tmp_path):
    img = tmp_path / "cowd.vmdk"
    _make_cowd(img)
    raw = oracle_raw(img, tmp_path, "vmdk")
    assert _qimg_sha(img) == sha256_file(raw)
    _random_reads(img, raw)
    assert _map("qimg", img) == _map("qemu", img)
    # as the extent of a vmfsSparse descriptor
    (tmp_path / "d.vmdk").write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                                     'createType="vmfsSparse"\n# Extent description\nRW 4096 VMFSSPARSE "cowd.vmdk"\n')
    assert _qimg_sha(tmp_path / "d.vmdk") == sha256_file(raw)
    assert (_info_json(tmp_path / "d.vmdk", "qimg")["format-specific"]
            == _info_json(tmp_path / "d.vmdk", "qemu")["format-specific"])


# ---------------------------------------------------------------- writing

@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_convert_output_accepted_by_qemu(oracle, tmp_path, subformat):
    src = _pattern(tmp_path / "src.raw")
    out = tmp_path / "out.vmdk"
    r = run_qimg("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", src, out)
    assert r.rc == 0, r.err
    assert "No errors were found" in oracle("check", "-f", "vmdk", out).out
    assert oracle("compare", "-f", "raw", "-F", "vmdk", src, out).rc == 0
    info = _info_json(out, "qemu")
    assert info["format-specific"]["data"]["create-type"] == subformat
    assert _qimg_sha(out) == sha256_file(src)
    assert _map("qimg", out) == _map("qemu", out)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".qimg-partial")]


def test_convert_options_show_in_qemu_info(oracle, tmp_path):
    src = _pattern(tmp_path / "src.raw", 3 * MiB)
    out = tmp_path / "o.vmdk"
    r = run_qimg("convert", "-f", "raw", "-O", "vmdk", "-o",
                 "adapter_type=lsilogic,hwversion=7,toolsversion=123,zeroed_grain=on", src, out)
    assert r.rc == 0, r.err
    oracle("compare", "-f", "raw", "-F", "vmdk", src, out)
    text = open(out, "rb").read(64 * 1024)
    assert b'ddb.adapterType = "lsilogic"' in text
    assert b'ddb.virtualHWVersion = "7"' in text
    assert b'ddb.toolsVersion = "123"' in text
    assert struct.unpack_from("<I", text, 8)[0] & 4  # zeroed-grain flag


def test_stream_layout_is_vmware_style(oracle, tmp_path):
    src = _pattern(tmp_path / "src.raw", 40 * MiB)
    out = tmp_path / "s.vmdk"
    assert run_qimg("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, out).rc == 0
    data = open(out, "rb").read()
    magic, version, flags = struct.unpack_from("<III", data)
    assert (magic, version, flags) == (0x564D444B, 3, 0x30001)
    assert struct.unpack_from("<Q", data, 56)[0] == 0xFFFFFFFFFFFFFFFF  # GD_AT_END in the header
    assert struct.unpack_from("<QII", data, len(data) - 1536) == (1, 0, 3)  # footer marker
    assert data[-512:] == bytes(512)  # end of stream
    footer_gd = struct.unpack_from("<Q", data, len(data) - 1024 + 56)[0]
    assert struct.unpack_from("<QII", data, (footer_gd - 1) * 512)[2] == 2  # GD marker before the GD
    desc = data[512:1536]
    for key in (b"ddb.longContentID", b"ddb.toolsVersion", b"ddb.virtualHWVersion", b"ddb.adapterType"):
        assert key in desc
    # grains appear in guest order, each grain table after its grains
    pos, lbas, kinds = 128 * 512, [], []
    while pos < len(data) - 1536:
        val, size = struct.unpack_from("<QI", data, pos)
        if size:
            lbas.append(val)
            pos += -(-(12 + size) // 512) * 512
        else:
            mtype = struct.unpack_from("<I", data, pos + 12)[0]
            kinds.append(mtype)
            pos += 512 + val * 512
    assert lbas == sorted(lbas) and lbas
    assert kinds[-1] == 2 and kinds.count(1) == 2  # 640 grains: two grain tables
    oracle("compare", "-f", "raw", "-F", "vmdk", src, out)


def test_stream_incompressible_and_compressible_data(oracle, tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(3 * GRAIN))
        f.write(b"abc" * 50000)
        f.write(os.urandom(100) + bytes(GRAIN - 100))
    out = tmp_path / "s.vmdk"
    assert run_qimg("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, out).rc == 0
    oracle("check", "-f", "vmdk", out)
    oracle("compare", "-f", "raw", "-F", "vmdk", src, out)
    assert os.path.getsize(out) < os.path.getsize(src)


def test_convert_with_backing_overlay(oracle, tmp_path):
    base_raw = _pattern(tmp_path / "b.raw", 4 * MiB)
    base = tmp_path / "base.vmdk"
    assert run_qimg("convert", "-f", "raw", "-O", "vmdk", base_raw, base).rc == 0
    top_raw = tmp_path / "t.raw"
    data = bytearray(open(base_raw, "rb").read())
    data[1000:1000 + 5000] = os.urandom(5000)
    data[3 * MiB + 7:3 * MiB + 7 + 70000] = os.urandom(70000)
    top_raw.write_bytes(bytes(data))
    top = tmp_path / "top.vmdk"
    r = run_qimg("convert", "-f", "raw", "-O", "vmdk", "-B", "base.vmdk", "-F", "vmdk", top_raw, top)
    assert r.rc == 0, r.err
    oracle("check", "-f", "vmdk", top)
    oracle("compare", "-f", "raw", "-F", "vmdk", top_raw, top)
    info = _info_json(top, "qemu")
    assert info["backing-filename"] == "base.vmdk"
    assert info["format-specific"]["data"]["parent-cid"] == info_cid(base)


def info_cid(path):
    return _info_json(path, "qemu")["format-specific"]["data"]["cid"]


def test_partial_grain_writes_copy_from_backing(oracle, tmp_path):

    base = tmp_path / "base.vmdk"
    oracle("create", "-q", "-f", "vmdk", base, "2M")
    subprocess_io(base, "write -P 0x44 0 2M")
    top = tmp_path / "top.vmdk"
    assert run_qimg("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", top).rc == 0
    drv = open_rw(str(top), "vmdk")
    try:
        drv.pwrite(GRAIN + 100, b"\x55" * 300)
        drv.pwrite(3 * GRAIN - 10, b"\x66" * 20)
        drv.write_zeroes(5 * GRAIN + 512, 1024)
    finally:
        drv.close()
    oracle("check", "-f", "vmdk", top)
    expect = bytearray(b"\x44" * (2 * MiB))
    expect[GRAIN + 100:GRAIN + 400] = b"\x55" * 300
    expect[3 * GRAIN - 10:3 * GRAIN + 10] = b"\x66" * 20
    expect[5 * GRAIN + 512:5 * GRAIN + 1536] = bytes(1024)
    assert sha256_file(oracle_raw(top, tmp_path, "vmdk")) == hashlib.sha256(expect).hexdigest()
    assert _qimg_sha(top) == hashlib.sha256(expect).hexdigest()


def test_zeroed_grain_write_zeroes(oracle, tmp_path):

    img = tmp_path / "z.vmdk"
    assert run_qimg("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", img, "2M").rc == 0
    drv = open_rw(str(img), "vmdk")
    try:
        drv.pwrite(0, b"\x77" * (4 * GRAIN))
        drv.write_zeroes(GRAIN, 2 * GRAIN)
    finally:
        drv.close()
    oracle("check", "-f", "vmdk", img)
    assert _map("qimg", img) == _map("qemu", img)
    assert '"zero": true, "data": false, "offset"' not in _map("qimg", img)
    expect = b"\x77" * GRAIN + bytes(2 * GRAIN) + b"\x77" * GRAIN + bytes(2 * MiB - 4 * GRAIN)
    assert _qimg_sha(img) == hashlib.sha256(expect).hexdigest()


# ---------------------------------------------------------------- create

CREATE_CASES = [
    ["4M"],
    ["-o", "subformat=monolithicFlat", "4M"],
    ["-o", "subformat=twoGbMaxExtentSparse", "5G"],
    ["-o", "subformat=twoGbMaxExtentFlat,compat6=on", "5G"],
    ["-o", "zeroed_grain=on,adapter_type=lsilogic,hwversion=7,toolsversion=9", "100G"],
    ["-o", "adapter_type=buslogic,preallocation=falloc,subformat=monolithicFlat", "1M"],
    ["-o", "subformat=streamOptimized", "10M"],
]


@pytest.mark.parametrize("args", CREATE_CASES)
def test_create_matches_qemu(oracle, tmp_path, args):
    q, m = tmp_path / "q", tmp_path / "m"
    q.mkdir()
    m.mkdir()
    qline = oracle("create", "-f", "vmdk", q / "x.vmdk", *args).out
    r = run_qimg("create", "-f", "vmdk", m / "x.vmdk", *args)
    assert r.rc == 0, r.err
    assert r.out == qline.replace(str(q), str(m))
    assert sorted(os.listdir(q)) == sorted(os.listdir(m))
    stream = "streamOptimized" in " ".join(args)
    for name in os.listdir(q):
        if stream:
            continue  # a different (VMware-style) layout on purpose
        if os.path.getsize(q / name) > 64 * MiB:
            assert os.path.getsize(q / name) == os.path.getsize(m / name)
            continue
        assert _mask_cid((q / name).read_bytes()) == _mask_cid((m / name).read_bytes()), name
    oracle("check", "-f", "vmdk", m / "x.vmdk")
    assert _info_json(m / "x.vmdk", "qemu")["virtual-size"] == _info_json(q / "x.vmdk", "qemu")["virtual-size"]


def test_create_with_backing_matches_qemu(oracle, tmp_path):
    oracle("create", "-q", "-f", "vmdk", tmp_path / "base.vmdk", "3M")
    qline = oracle("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", tmp_path / "q.vmdk").out
    r = run_qimg("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", tmp_path / "m.vmdk")
    assert r.rc == 0, r.err
    assert r.out == qline.replace("q.vmdk", "m.vmdk")
    q = (tmp_path / "q.vmdk").read_bytes().replace(b'"q.vmdk"', b'"m.vmdk"')
    assert _mask_cid(q) == _mask_cid((tmp_path / "m.vmdk").read_bytes())
    assert info_cid(tmp_path / "base.vmdk") == _info_json(tmp_path / "m.vmdk", "qemu")["format-specific"][
        "data"]["parent-cid"]


@pytest.mark.parametrize("opts,msg", [
    ("adapter_type=foo", "invalid parameter value: foo"),
    ("subformat=foo", "invalid parameter value: foo"),
    ("compat6=on,hwversion=6", "compat6 cannot be enabled with hwversion set"),
    ("preallocation=metadata", "Unsupported preallocation mode: metadata"),
])
def test_create_errors(oracle, tmp_path, opts, msg):
    q = oracle("create", "-f", "vmdk", "-o", opts, tmp_path / "q.vmdk", "1M", check=False)
    r = run_qimg("create", "-f", "vmdk", "-o", opts, tmp_path / "m.vmdk", "1M")
    assert q.rc == r.rc == 1
    assert msg in q.err and msg in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_overlay_refuses_a_parent_whose_cid_changed(oracle, tmp_path):
    """As qemu-img: reads that fall through to a parent written since the overlay was made fail
    (convert 1, compare 4); metadata commands still work; allocated overlay data still reads."""
    import subprocess

    base, ovl = tmp_path / "b.vmdk", tmp_path / "o.vmdk"
    qemu("create", "-q", "-f", "vmdk", base, "1M")
    qemu("create", "-q", "-f", "vmdk", "-b", "b.vmdk", "-F", "vmdk", ovl)
    ref = tmp_path / "ref.raw"
    qemu("create", "-q", "-f", "raw", ref, "1M")
    assert run_qimg("compare", ovl, ref).rc == 0
    subprocess.run(["qemu-io", "-c", "write -P 7 0 4k", str(base)], check=True, capture_output=True)
    for tool in (qemu, run_qimg):
        conv = tool("convert", "-O", "raw", ovl, tmp_path / "out.raw", **({"check": False} if tool is qemu else {}))
        assert conv.rc == 1
        cmp = tool("compare", ovl, ref, **({"check": False} if tool is qemu else {}))
        assert cmp.rc == 4 and cmp.err.startswith(("qemu-img: Error while reading offset 0 of",
                                                    "qimg: Error while reading offset 0 of"))
        assert tool("map", "--output=json", ovl, **({"check": False} if tool is qemu else {})).rc == 0
        assert tool("check", ovl, **({"check": False} if tool is qemu else {})).rc == 0
    assert "has changed" in run_qimg("convert", "-O", "raw", ovl, tmp_path / "o2.raw").err


def test_create_backing_must_be_vmdk(oracle, tmp_path):
    oracle("create", "-q", "-f", "raw", tmp_path / "r.raw", "1M")
    r = run_qimg("create", "-f", "vmdk", "-b", "r.raw", "-F", "raw", tmp_path / "m.vmdk")
    assert r.rc == 1 and "backing_file must be a vmdk image" in r.err


def test_options_help_matches_qemu(oracle):
    r = run_qimg("create", "-f", "vmdk", "-o", "help")
    assert r.rc == 0
    assert r.out == oracle("create", "-f", "vmdk", "-o", "help").out


def test_failed_split_convert_removes_extents(tmp_path):
    r = run_qimg("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=twoGbMaxExtentFlat",
                 tmp_path / "missing.raw", tmp_path / "o.vmdk")
    assert r.rc == 1
    assert os.listdir(tmp_path) == []
    from qimg.formats.vmdk import VmdkDriver

    assert VmdkDriver.creates_single_file({"subformat": "streamOptimized"})
    assert not VmdkDriver.creates_single_file({"subformat": "twoGbMaxExtentSparse"})


# ---------------------------------------------------------------- corpus

def _expected(expected_images, key):
    return expected_images["images"][key]


def test_corpus_image_vmdk(shared_images, expected_images):
    e = _expected(expected_images, "vmdk/image.vmdk")
    assert _qimg_sha(shared_images / "vmdk/image.vmdk") == e["raw_sha256"]
    info = _info_json(shared_images / "vmdk/image.vmdk", "qimg")
    data = info["format-specific"]["data"]
    exp = e["qemu_info"]["format-specific"]["data"]
    assert (data["cid"], data["parent-cid"], data["create-type"]) == (exp["cid"], exp["parent-cid"],
                                                                      exp["create-type"])


def test_corpus_stream_version3(shared_images, expected_images, tmp_path):
    key = "vmdk/iotest-version3.vmdk.bz2"
    e = _expected(expected_images, key)
    img = decompress_to(shared_images / key, tmp_path)
    from qimg.core.chain import Chain

    with Chain.open(str(img), "vmdk") as chain:
        assert chain.virtual_size == e["virtual_size"]
        head = chain.read(0, 64 * MiB)
    assert hashlib.sha256(head).hexdigest() == e["raw_head_64MiB_sha256"]
    info = _info_json(img, "qimg")
    exp = e["qemu_info"]["format-specific"]
    exp["data"]["extents"][0]["filename"] = str(img)
    assert info["format-specific"] == exp
    from qimg.core import registry

    drv = registry.open_image(str(img), "vmdk")
    try:
        res = drv.check()
    finally:
        drv.close()
    assert res.corruptions == 0 and res.check_errors == 0 and res.exit_code == 0


def test_corpus_sesparse(shared_images, expected_images, tmp_path):
    d = shared_images / "vmdk/sesparse-esxi"
    decompress_to(d / "sesparse.vmdk.gz", tmp_path)
    desc = decompress_to(d / "sesparse-descriptor.vmdk", tmp_path)
    e = _expected(expected_images, "vmdk/sesparse-esxi/sesparse-descriptor.vmdk")
    assert _qimg_sha(desc) == e["raw_sha256"]
    info = _info_json(desc, "qimg")
    assert info["cluster-size"] == 4096
    ext = info["format-specific"]["data"]["extents"][0]
    assert (ext["format"], ext["cluster-size"], ext["virtual-size"]) == ("SESPARSE", 4096, 536870912)


def test_corpus_afl9_refused(shared_images, tmp_path):
    img = decompress_to(shared_images / "vmdk/afl9.vmdk.bz2", tmp_path)
    r = run_qimg("info", "-f", "vmdk", img)
    assert r.rc == 1
    assert r.err == f"qimg: Could not open '{img}': L1 size too big\n"


# ---------------------------------------------------------------- check

def test_check_reports_grain_past_eof(oracle, tmp_path, capsys):
    img = tmp_path / "c.vmdk"
    oracle("create", "-q", "-f", "vmdk", img, "4M")
    subprocess_io(img, "write -P 1 0 256k")
    from qimg.core import registry
    from qimg.errors import QimgError

    drv = registry.open_image(str(img), "vmdk")
    try:
        res = drv.check()
    finally:
        drv.close()
    assert (res.corruptions, res.leaks, res.check_errors, res.exit_code) == (0, 0, 0, 0)
    data = bytearray(img.read_bytes())
    gd = struct.unpack_from("<Q", data, 56)[0]
    gt = struct.unpack_from("<I", data, gd * 512)[0]
    struct.pack_into("<I", data, gt * 512 + 4 * 2, 100000)  # grain 2 far beyond EOF
    img.write_bytes(bytes(data))
    q = oracle("check", "-f", "vmdk", img, check=False)
    assert q.rc == 1 and "Check failed: Invalid argument" in q.err
    drv = registry.open_image(str(img), "vmdk")
    try:
        with pytest.raises(QimgError, match="Check failed: Invalid argument") as info:
            drv.check()
    finally:
        drv.close()
    # the driver prints nothing: the finding travels with the error, and the command line writes it first
    assert capsys.readouterr().err == ""
    finding = "ERROR: cluster offset for sector 256 points after EOF"
    assert info.value.diagnostics == (q.err.splitlines()[0],) == (finding,)
    r = run_qimg("check", "-f", "vmdk", str(img))
    assert (r.rc, r.err.splitlines()) == (1, q.err.replace("qemu-img:", "qimg:").splitlines())


# ---------------------------------------------------------------- hostile input

def _sparse_header(**kw):
    f = dict(magic=0x564D444B, version=1, flags=3, capacity=2048, grain=128, desc_off=1, desc_size=20, gtes=512,
             rgd=21, gd=26, overhead=128)
    f.update(kw)
    return struct.pack("<IIIQQQQIQQQB4sH", f["magic"], f["version"], f["flags"], f["capacity"], f["grain"],
                       f["desc_off"], f["desc_size"], f["gtes"], f["rgd"], f["gd"], f["overhead"], 0,
                       b"\n \r\n", 0).ljust(512, b"\0")


HOSTILE_HEADERS = [
    ("capacity", dict(capacity=1 << 62), "L1 size too big"),
    ("grain", dict(grain=1 << 30), "Invalid granularity"),
    ("gtes", dict(gtes=1 << 20), "L2 table size too big"),
    ("zero_l1_entry", dict(gtes=0), "L1 entry size is invalid"),
    ("gd_beyond_eof", dict(gd=1 << 40), "l1 table"),
    ("version", dict(version=9), "Unsupported VMDK version 9"),
    ("desc_size", dict(desc_size=1 << 40), "limit"),
    ("truncated", dict(overhead=1 << 20), "File truncated"),
]


@pytest.mark.parametrize("name,fields,msg", HOSTILE_HEADERS, ids=[h[0] for h in HOSTILE_HEADERS])
def test_hostile_sparse_headers(tmp_path, name, fields, msg):
    img = tmp_path / "h.vmdk"
    img.write_bytes(_sparse_header(**fields) + bytes(65536 - 512))
    r = run_qimg("info", "-f", "vmdk", img)
    assert r.rc == 1, r.out
    assert len(r.err.splitlines()) == 1 and msg in r.err and "Traceback" not in r.err


def test_hostile_grain_table_and_stream(tmp_path):
    # a grain table pointer past EOF: open works, reading fails with one line
    data = bytearray(_sparse_header() + bytes(65536 - 512))
    struct.pack_into("<I", data, 26 * 512, 1 << 30)
    img = tmp_path / "gt.vmdk"
    img.write_bytes(bytes(data))
    r = run_qimg("convert", "-f", "vmdk", "-O", "raw", img, tmp_path / "o.raw")
    assert r.rc == 1 and len(r.err.splitlines()) == 1 and "grain table" in r.err
    # a stream image whose footer is garbage
    s = tmp_path / "s.vmdk"
    s.write_bytes(_sparse_header(flags=0x30001, gd=0xFFFFFFFFFFFFFFFF) + bytes(4096))
    r = run_qimg("info", "-f", "vmdk", s)
    assert r.rc == 1 and "Invalid footer" in r.err and len(r.err.splitlines()) == 1


def test_hostile_compressed_grain_size(oracle, tmp_path):
    src = _pattern(tmp_path / "src.raw", MiB)
    img = tmp_path / "s.vmdk"
    assert run_qimg("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, img).rc == 0
    data = bytearray(img.read_bytes())
    struct.pack_into("<I", data, 128 * 512 + 8, 0x7FFFFFFF)  # first grain marker claims 2 GiB
    img.write_bytes(bytes(data))
    r = run_qimg("convert", "-f", "vmdk", "-O", "raw", img, tmp_path / "o.raw")
    assert r.rc == 1 and "exceeds the limit" in r.err and len(r.err.splitlines()) == 1


@pytest.mark.parametrize("body,msg", [
    ('createType="foo"\n\nRW 8 FLAT "x.raw" 0\n', "Unsupported image type 'foo'"),
    ('\nRW 8 FLAT "x.raw" 0\n', "invalid VMDK image descriptor"),
    ('createType="monolithicFlat"\n\nRW 8 FLAT "x.raw"\n', "Invalid extent line"),
    ('createType="monolithicFlat"\n\nRW 8 FLAT "missing.raw" 0\n', "No such file"),
    ('createType="monolithicFlat"\n\nRW 8 FLAT "d.vmdk" 0\n', "descriptor itself"),
    ('createType="monolithicFlat"\n\nRW 99999999999999999999 FLAT "x.raw" 0\n', "limit"),
    ('createType="twoGbMaxExtentSparse"\n\nRW 8 SPARSE "x.raw"\n', "Invalid VMDK magic"),
])
def test_hostile_descriptors(tmp_path, body, msg):
    (tmp_path / "x.raw").write_bytes(bytes(4096))
    (tmp_path / "d.vmdk").write_text("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n" + body)
    r = run_qimg("info", "-f", "vmdk", tmp_path / "d.vmdk")
    assert r.rc == 1, r.out
    assert msg in r.err and len(r.err.splitlines()) == 1 and "Traceback" not in r.err


def test_hostile_cowd_and_sesparse(tmp_path):
    img = tmp_path / "c.vmdk"
    img.write_bytes(struct.pack("<IIIIIIII", 0x44574F43, 1, 3, 1 << 31, 16, 4, 1 << 30, 0) + bytes(4096))
    r = run_qimg("info", "-f", "vmdk", img)
    assert r.rc == 1 and "L1 size too big" in r.err and len(r.err.splitlines()) == 1
    img.write_bytes(struct.pack("<IIIIIIII", 0x44574F43, 1, 3, 4096, 16, 1 << 28, 1, 0) + bytes(4096))
    r = run_qimg("info", "-f", "vmdk", img)
    assert r.rc == 1 and "l1 table" in r.err
    se = tmp_path / "se.raw"
    se.write_bytes(struct.pack("<QQQQQQ", 0xCAFEBABE, 0x200000001, 8, 8, 64, 0) + bytes(4096))
    (tmp_path / "d.vmdk").write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
                                     'createType="seSparse"\n\nRW 8 SESPARSE "se.raw"\n')
    r = run_qimg("info", "-f", "vmdk", tmp_path / "d.vmdk")
    assert r.rc == 1 and len(r.err.splitlines()) == 1 and "Traceback" not in r.err


def test_probe():
    from qimg.formats.vmdk import VmdkDriver

    assert VmdkDriver.probe(b"KDMV" + bytes(508), "x") == 100
    assert VmdkDriver.probe(b"COWD" + bytes(508), "x") == 100
    assert VmdkDriver.probe(b"# Disk DescriptorFile\nversion=1\nCID=1\n", "x") == 100
    assert VmdkDriver.probe(b"# comment\nfoo=1\nversion=1\n", "x") == 0
    assert VmdkDriver.probe(bytes(512), "x") == 0


def test_hostile_extent_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "f.vmdk").write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
                                     'createType="monolithicFlat"\n# Extent description\nRW 8 FLAT "fifo" 0\n')
    r = run_qimg("info", "-f", "vmdk", tmp_path / "f.vmdk")
    assert r.rc == 1 and "not a regular file" in r.err and len(r.err.splitlines()) == 1
    # one sparse file with a 4 MiB grain directory named by 100 extent lines
    big = tmp_path / "big.vmdk"
    with open(big, "wb") as f:
        f.write(_sparse_header(capacity=1 << 36, rgd=0, flags=1, gd=1, overhead=0, desc_off=0, desc_size=0))
        f.truncate(512 + (4 << 20))
    lines = "".join(f'RW {1 << 36} SPARSE "big.vmdk"\n' for _ in range(100))
    (tmp_path / "m.vmdk").write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
                                     'createType="twoGbMaxExtentSparse"\n# Extent description\n' + lines)
    r = run_qimg("info", "-f", "vmdk", tmp_path / "m.vmdk")
    assert r.rc == 1 and "exceed the limit" in r.err and len(r.err.splitlines()) == 1


def test_read_only_open_never_writes(tmp_path):
    src = _pattern(tmp_path / "src.raw", MiB)
    img = tmp_path / "s.vmdk"
    assert run_qimg("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, img).rc == 0
    before = sha256_file(img)
    assert run_qimg("info", "-f", "vmdk", img).rc == 0
    assert run_qimg("convert", "-f", "vmdk", "-O", "raw", img, tmp_path / "o.raw").rc == 0
    assert sha256_file(img) == before
    assert sha256_file(tmp_path / "o.raw") == sha256_file(src)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "monolithicFlat"])
def test_first_write_changes_cid(oracle, tmp_path, subformat):

    img = tmp_path / "c.vmdk"
    assert run_qimg("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", img, "1M").rc == 0
    before = info_cid(img)
    drv = open_rw(str(img), "vmdk")
    try:
        drv.pwrite(0, b"\x01" * 512)
        drv.pwrite(512, b"\x02" * 512)
    finally:
        drv.close()
    after = info_cid(img)
    assert after != before and after == _info_json(img, "qimg")["format-specific"]["data"]["cid"]
    oracle("check", "-f", "vmdk", img)
    assert sha256_file(oracle_raw(img, tmp_path, "vmdk")) == hashlib.sha256(
        b"\x01" * 512 + b"\x02" * 512 + bytes(MiB - 1024)).hexdigest()


def test_mutated_images_fail_cleanly(oracle, tmp_path):
    """Random damage to headers, descriptors, directories and footers: rc 0 or 1, one line, no traceback."""
    sp = tmp_path / "sp.vmdk"
    oracle("create", "-q", "-f", "vmdk", sp, "3M")
    subprocess_io(sp, "write -P 3 0 200k", "write -P 4 2M 100k")
    st = tmp_path / "st.vmdk"
    assert run_qimg("convert", "-f", "vmdk", "-O", "vmdk", "-o", "subformat=streamOptimized", sp, st).rc == 0
    rnd = random.Random(12)
    target = tmp_path / "m.vmdk"
    for base in (sp, st):
        data = base.read_bytes()
        for _ in range(40):
            d = bytearray(data)
            lo, hi = rnd.choice([(0, 80), (512, 1400), (10240, 20000), (len(d) - 1536, len(d))])
            for _ in range(rnd.randrange(1, 5)):
                pos = rnd.randrange(lo, min(hi, len(d)))
                d[pos:pos + 4] = bytes(rnd.choice([0, 0xFF, rnd.randrange(256)]) for _ in range(4))
            target.write_bytes(bytes(d))
            for args in (("info", "-f", "vmdk", target), ("convert", "-f", "vmdk", "-O", "raw", target,
                                                           tmp_path / "o.raw")):
                r = run_qimg(*args)
                assert r.rc in (0, 1), r.err
                assert "internal error" not in r.err and len(r.err.strip().splitlines()) <= 1, r.err


def test_missing_extent_message_matches_qemu(oracle, tmp_path):
    d = tmp_path / "sub"
    d.mkdir()
    (d / "dm.vmdk").write_text('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                               'createType="monolithicFlat"\n# Extent description\nRW 8192 FLAT "y.raw" 0\n')
    q = oracle("info", "-f", "vmdk", d / "dm.vmdk", check=False)
    r = run_qimg("info", "-f", "vmdk", d / "dm.vmdk")
    assert q.rc == r.rc == 1
    assert r.err.replace("qimg:", "qemu-img:") == q.err


@pytest.mark.parametrize("subformat,names", [
    ("twoGbMaxExtentFlat", ["t.vmdk", "t-f001.vmdk", "t-f002.vmdk", "t-f003.vmdk"]),
    ("monolithicFlat", ["t.vmdk", "t-flat.vmdk"]),
    ("monolithicSparse", ["t.vmdk"]),
])
def test_created_files_named_by_the_descriptor(tmp_path, oracle, monkeypatch, subformat, names):
    """What a failed convert removes: the descriptor and every extent it names (read through the store)."""
    from qimg.formats.vmdk.create import created_files

    monkeypatch.chdir(tmp_path)
    qemu("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", "t.vmdk", "5G")
    assert created_files("t.vmdk", {"subformat": subformat}) == names
