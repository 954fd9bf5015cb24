"""qcow2 reading against the real qemu-img: every variant reads byte-identical, maps and infos alike."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import decompress_to, guest_sha256, qemu, qemu_create_pbkdf, qemu_img_path, run_qimg

MiB = 1 << 20

# qemu-io scripts: odd offsets, zero writes (allocated and not), discards, subcluster-sized pieces
IO_SCRIPT = [
    "write -P 0x11 0 64k", "write -P 0x22 100k 3k", "write -z 1M 128k", "write -P 0x33 1500k 600k",
    "discard 1536k 64k", "write -P 0x44 3M 4k", "write -z -u 4M 64k", "write -P 0x55 5243392 1000",
    "write -P 0x66 7340032 1048576",
]

VARIANTS = {
    "std": "cluster_size=64k",
    "c512": "cluster_size=512",
    "c4k_rc1": "cluster_size=4k,refcount_bits=1",
    "c2m_rc64": "cluster_size=2M,refcount_bits=64",
    "v2": "compat=0.10",
    "v2_4k": "compat=0.10,cluster_size=4k",
    "xl2": "extended_l2=on",
    "xl2_2m": "extended_l2=on,cluster_size=2M",
    "xl2_16k": "extended_l2=on,cluster_size=16k,refcount_bits=8",
    "datafile": "data_file=datafile.dat",
    "datafile_raw": "data_file=datafile_raw.dat,data_file_raw=on",
    "datafile_xl2": "data_file=datafile_xl2.dat,extended_l2=on,cluster_size=2M",
    "lazy": "lazy_refcounts=on",
}


def _io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(path)], check=True, capture_output=True, cwd=Path(path).parent)


def _q(*args, cwd=None, check=True):
    """The real qemu-img, run from the images' directory (relative data file names resolve there)."""
    p = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, cwd=cwd, check=False)
    if check and p.returncode:
        raise AssertionError(f"qemu-img {args} failed: {p.stderr}")
    return p


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A directory of qcow2 images made by qemu-img/qemu-io, one per variant."""
    if qemu_img_path() is None:
        pytest.skip("qemu-img not installed")
    d = tmp_path_factory.mktemp("qcow2img")
    out = {}
    for name, opts in VARIANTS.items():
        p = d / f"{name}.qcow2"
        # qemu-img creates a relative data file name from the current directory
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p.name, "9M"], cwd=d, check=True)
        _io(p, *IO_SCRIPT)
        out[name] = p
    # odd virtual size
    p = d / "odd.qcow2"
    qemu("create", "-q", "-f", "qcow2", p, "9999872")
    _io(p, "write -P 0x77 0 100k", "write -P 0x78 9900000 99872")
    out["odd"] = p
    # compressed clusters (zlib, zstd, small clusters, extended L2)
    src = d / "src.raw"
    with open(src, "wb") as f:
        f.truncate(6 * MiB)
        f.write(b"compressible " * 100000)
        f.seek(3 * MiB)
        f.write(random.Random(3).randbytes(MiB))
        f.seek(5 * MiB + 12345)
        f.write(b"\x01" * 70000)
    out["src_raw"] = src
    for name, opts in (("comp", "cluster_size=64k"), ("compz", "compression_type=zstd"),
                       ("comp4k", "cluster_size=4k"), ("compx", "extended_l2=on")):
        p = d / f"{name}.qcow2"
        qemu("convert", "-c", "-O", "qcow2", "-o", opts, src, p)
        out[name] = p
    # backing chains, including an extended-L2 overlay with subcluster writes
    for name, opts in (("ovl", "cluster_size=64k"), ("ovlx", "extended_l2=on")):
        p = d / f"{name}.qcow2"
        qemu("create", "-q", "-f", "qcow2", "-b", "std.qcow2", "-F", "qcow2", "-o", opts, p)
        _io(p, "write -P 0x99 60k 8k", "write -z 1500k 10k", "write -P 0x98 3M 100k", "write -z 5M 2k")
        out[name] = p
    # internal snapshots
    p = d / "snap.qcow2"
    qemu("create", "-q", "-f", "qcow2", p, "4M")
    _io(p, "write -P 0x01 0 1M")
    qemu("snapshot", "-c", "first", p)
    _io(p, "write -P 0x02 512k 1M", "write -z 0 64k")
    qemu("snapshot", "-c", "second", p)
    _io(p, "write -P 0x03 64k 64k")
    out["snap"] = p
    # preallocation
    for name, opts in (("pmeta", "preallocation=metadata"), ("pmetax", "preallocation=metadata,extended_l2=on"),
                       ("pfalloc", "preallocation=falloc")):
        p = d / f"{name}.qcow2"
        qemu("create", "-q", "-f", "qcow2", "-o", opts, p, "4M")
        _io(p, "write -P 1 0 4k")
        out[name] = p
    return out


def _raw_bytes(path, tmp_path, *extra):
    out = tmp_path / (Path(path).stem + ".raw")
    _q("convert", *extra, "-O", "raw", path, out, cwd=Path(path).parent)
    return out.read_bytes()


READ_CASES = sorted(set(VARIANTS) | {"odd", "comp", "compz", "comp4k", "compx", "ovl", "ovlx", "snap", "pmeta",
                                     "pmetax", "pfalloc"})


@pytest.mark.parametrize("name", READ_CASES)
def test_read_matches_qemu(images, tmp_path, name):
    from qimg.core.chain import Chain

    path = images[name]
    ref = _raw_bytes(path, tmp_path)
    assert guest_sha256(path) == hashlib.sha256(ref).hexdigest()
    rnd = random.Random(name)
    with Chain.open(str(path)) as chain:
        size = chain.virtual_size
        assert size == len(ref)
        for _ in range(60):
            # reads crossing cluster and subcluster boundaries
            off = rnd.randrange(0, size)
            n = rnd.choice([1, 511, 513, 2047, 4097, 65537, 200000])
            n = min(n, size - off)
            assert chain.read(off, n) == ref[off:off + n], (off, n)


def _qemu_map(path):
    return json.loads(_q("map", "--output=json", path, cwd=Path(path).parent).stdout)


def _chain_map(path):
    from qimg.core.chain import Chain
    from qimg.core.extent import coalesce

    out = []
    with Chain.open(str(path)) as chain:
        for e in coalesce(chain.extents()):
            d = {"start": e.start, "length": e.length, "depth": e.depth, "present": e.present, "zero": e.zero,
                 "data": e.data}
            if e.offset is not None:
                d["offset"] = e.offset
            out.append(d)
    return out


@pytest.mark.parametrize("name", READ_CASES)
def test_block_status_matches_qemu_map(images, name):
    """Extents (merged) equal qemu-img map's JSON, host offsets included."""
    assert _chain_map(images[name]) == _qemu_map(images[name])


@pytest.mark.parametrize("name", ["std", "c512", "v2", "comp", "ovl", "snap", "pmeta", "datafile", "odd"])
def test_map_cli_matches_qemu(images, name):
    path = images[name]
    r = run_qimg("map", "--output=json", path)
    assert r.rc == 0, r.err
    assert r.out == _q("map", "--output=json", path, cwd=Path(path).parent).stdout


@pytest.mark.parametrize("name", READ_CASES)
def test_info_matches_qemu(images, name):
    path = images[name]
    for extra in ((), ("--output=json",)):
        r = run_qimg("info", *extra, path)
        assert r.rc == 0, r.err
        assert r.out == _q("info", *extra, path, cwd=Path(path).parent).stdout


def test_info_bitmaps_and_backing_chain(tmp_path, oracle):
    p = tmp_path / "bm.qcow2"
    oracle("create", "-q", "-f", "qcow2", p, "64M")
    oracle("bitmap", "--add", p, "b0")
    oracle("bitmap", "--add", "-g", "128k", "--disable", p, "b1")
    o = tmp_path / "o.qcow2"
    oracle("create", "-q", "-f", "qcow2", "-b", "bm.qcow2", "-F", "qcow2", o)
    for args in (("--output=json", p), (p,), ("--backing-chain", o), ("--backing-chain", "--output=json", o)):
        r = run_qimg("info", *args)
        assert r.rc == 0, r.err
        assert r.out == oracle("info", *args).out


@pytest.mark.parametrize("spec", [["-l", "first"], ["-l", "second"], ["-l", "snapshot.id=1"],
                                  ["-l", "snapshot.name=second"], ["-l", "snapshot.id=2,snapshot.name=second"],
                                  ["-l", "1"]])
def test_snapshot_view(images, tmp_path, spec):
    path = images["snap"]
    ref = _raw_bytes(path, tmp_path, *spec)  # (qemu-img 7.2 convert has no -s: see test_convert_snapshot.py)
    out = tmp_path / "mine.raw"
    r = run_qimg("convert", *spec, "-O", "raw", path, out)
    assert r.rc == 0, r.err
    assert out.read_bytes() == ref


def test_snapshot_missing(images):
    r = run_qimg("measure", "-l", "nosuch", "-O", "qcow2", images["snap"])
    assert r.rc == 1
    assert r.err.strip() == "qimg: Failed to load snapshot: Can't find snapshot"


def test_snapshot_info_keys(images):
    from qimg.core import registry

    with registry.open_image(str(images["snap"]), "qcow2") as drv:
        snaps = drv.info_extra()["snapshots"]
    assert [s["name"] for s in snaps] == ["first", "second"]
    assert set(snaps[0]) == {"id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec",
                             "vm-clock-nsec", "icount"}


def test_dirty_and_corrupt_bits(images, tmp_path):
    import shutil
    import struct

    for bit, name in ((1, "dirty"), (2, "corrupt")):
        p = tmp_path / f"{name}.qcow2"
        shutil.copy(images["std"], p)
        with open(p, "r+b") as f:
            f.seek(72)
            f.write(struct.pack(">Q", bit))
        for extra in ((), ("--output=json",)):
            r = run_qimg("info", *extra, p)
            assert r.rc == 0
            assert r.out == qemu("info", *extra, p).out
    # a corrupt image is refused for writing
    from qimg.core import registry
    from qimg.errors import QimgError

    with pytest.raises(QimgError, match="Image is corrupt; cannot be opened read/write"):
        registry.open_image(str(tmp_path / "corrupt.qcow2"), "qcow2", writable=True)


def test_unknown_incompatible_feature(images, tmp_path):
    import shutil
    import struct

    p = tmp_path / "unk.qcow2"
    shutil.copy(images["std"], p)
    with open(p, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", (1 << 5) | (1 << 40)))
    r = run_qimg("info", p)
    q = qemu("info", p, check=False)
    assert r.rc == q.rc == 1
    assert r.err.replace("qimg:", "qemu-img:") == q.err


# ---------------------------------------------------------------- the shared corpus

SHARED = ["qcow2/basic.qcow2.gz", "qcow2/basic-zstd.qcow2.gz", "qcow2/snapshot.qcow2.gz", "qcow2/image.qcow2",
          "qcow2/vsstest.qcow2", "qcow2/backing-chain-1.qcow2.gz", "qcow2/data-file.qcow2.gz"]


@pytest.mark.parametrize("name", SHARED)
def test_shared_images(shared_images, expected_images, tmp_path, name):
    exp = expected_images["images"][name]
    path = decompress_to(shared_images / name, tmp_path)
    if "backing-chain" in name:
        for i in (2, 3):
            decompress_to(shared_images / f"qcow2/backing-chain-{i}.qcow2.gz", tmp_path)
    if "data-file" in name:
        decompress_to(shared_images / "qcow2/data-file.bin.gz", tmp_path)
    assert guest_sha256(path) == exp["raw_sha256"]
    r = run_qimg("info", "--output=json", path)
    assert r.rc == 0, r.err
    info = json.loads(r.out)
    for key, value in exp["qemu_info"].items():
        assert info[key] == value, key


def test_luks_encrypted(tmp_path, oracle):
    """info shows the LUKS header like qemu-img; with the key, the guest data decrypts identically."""
    p = tmp_path / "enc.qcow2"
    sec = ["--object", "secret,id=s0,data=pw"]
    qemu_create_pbkdf("-q", "-f", "qcow2", *sec, "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=50",
                      p, "4M")
    spec = f"driver=qcow2,file.filename={p},encrypt.key-secret=s0"
    subprocess.run(["qemu-io", *sec, "--image-opts", "-c", "write -P 0x42 1000 100000", "-c",
                    "write -P 0x43 3M 70000", spec], check=True, capture_output=True)
    for extra in ((), ("--output=json",)):
        r = run_qimg("info", *extra, p)
        assert r.rc == 0, r.err
        assert r.out == oracle("info", *extra, p).out
    ref = tmp_path / "ref.raw"
    oracle("convert", *sec, "--image-opts", spec, "-O", "raw", ref)
    out = tmp_path / "out.raw"
    r = run_qimg("convert", *sec, "--image-opts", spec, "-O", "raw", out)
    assert r.rc == 0, r.err
    assert out.read_bytes() == ref.read_bytes()
    r = run_qimg("convert", "-O", "raw", p, tmp_path / "nokey.raw")
    assert r.rc == 1
    assert "Parameter 'encrypt.key-secret' is required for cipher" in r.err


def test_unknown_header_extension_skipped(images, tmp_path):
    """An extension of an unknown type is skipped (qemu-img reads the image the same)."""
    import shutil
    import struct

    p = tmp_path / "ext.qcow2"
    shutil.copy(images["std"], p)
    data = bytearray(p.read_bytes())
    hl = struct.unpack(">I", data[100:104])[0]
    ext = struct.pack(">II", 0x12345678, 5) + b"hello" + bytes(3)
    rest = data[hl:4096 - len(ext)]
    data[hl:4096] = ext + rest
    p.write_bytes(bytes(data))
    for extra in ((), ("--output=json",)):
        r = run_qimg("info", *extra, p)
        assert r.rc == 0, r.err
        assert r.out == qemu("info", *extra, p).out
    assert guest_sha256(p) == guest_sha256(images["std"])
