"""qcow2 encryption: legacy AES (crypt_method 1) and LUKS, checked byte for byte against qemu-img and qemu-io."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import open_rw, qemu, qemu_create_pbkdf, run_qimg, sha256_file, write_pattern

KEY = "secret,id=s0,data=x"
WRONG = "secret,id=s0,data=not-the-key"
SIZE = 2 << 20
EXTENTS = [(0, 4096), (5000, 70000), (1 << 20, 300000), (SIZE - 700, 700)]


def _opts(path):
    return f"driver=qcow2,encrypt.key-secret=s0,file.filename={path}"


@pytest.fixture
def qemu_io(qemu_img):
    path = shutil.which("qemu-io")
    if path is None:
        pytest.skip("qemu-io not installed")

    def run(image, *cmds, secret=KEY):
        args = [path, "--object", secret, "--image-opts", _opts(image)]
        for c in cmds:
            args += ["-c", c]
        p = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
        assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr
    return run


_TEMPLATES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _template_dir(tmp_path_factory):
    """qemu-img's PBKDF benchmark makes each LUKS create slow: new images are copies of one per option set."""
    _TEMPLATES.clear()
    _TEMPLATES["dir"] = tmp_path_factory.mktemp("templates")
    yield
    _TEMPLATES.clear()


def _qemu_create(path, opts, size=SIZE, cache=True):
    key = (opts, str(size))
    if key not in _TEMPLATES or not cache:
        tpl = _TEMPLATES["dir"] / f"t{len(_TEMPLATES)}.qcow2" if cache else path
        qemu_create_pbkdf("-q", "-f", "qcow2", "--object", KEY, "-o", opts, tpl, size)
        if not cache:
            return
        _TEMPLATES[key] = tpl
    shutil.copyfile(_TEMPLATES[key], path)


def _qimg_raw(image, out, secret=KEY):
    r = run_qimg("convert", "--object", secret, "--image-opts", _opts(image), "-O", "raw", out)
    assert r.rc == 0, r.err
    return sha256_file(out)


def _qemu_raw(image, out, secret=KEY):
    qemu("convert", "--object", secret, "--image-opts", _opts(image), "-O", "raw", out)
    return sha256_file(out)


WRITES = ["write -P 0x33 0 128k", "write -P 0x44 1000 3000", "write -P 0x55 1536k 100k",
          "write -z 64k 64k", "write -P 0x66 2047k 1k"]


# ----- legacy AES -----

@pytest.mark.parametrize("opts", ["encrypt.format=aes,encrypt.key-secret=s0", "encryption=on,encrypt.key-secret=s0",
                                  "encrypt.format=aes,encrypt.key-secret=s0,extended_l2=on,cluster_size=32k",
                                  "encrypt.format=aes,encrypt.key-secret=s0,compat=0.10"])
def test_aes_written_by_qemu_reads_identical(tmp_path, qemu_io, opts):
    img = tmp_path / "a.qcow2"
    _qemu_create(img, opts)
    qemu_io(img, *WRITES)
    mine = _qimg_raw(img, tmp_path / "mine.raw")
    assert mine == _qemu_raw(img, tmp_path / "ref.raw")
    # the wrong key gives garbage in qemu-img too (legacy AES has no key check): the same garbage
    assert _qimg_raw(img, tmp_path / "w1.raw", WRONG) == _qemu_raw(img, tmp_path / "w2.raw", WRONG) != mine
    # map: encrypted clusters have no host offset
    m1 = run_qimg("map", "--output=json", "--object", KEY, "--image-opts", _opts(img))
    m2 = qemu("map", "--output=json", "--object", KEY, "--image-opts", _opts(img))
    assert m1.rc == 0 and m1.out == m2.out


@pytest.mark.parametrize("extra", ["", ",extended_l2=on", ",cluster_size=4096", ",preallocation=metadata"])
def test_aes_written_by_qimg_reads_in_qemu(tmp_path, oracle, extra):
    src = write_pattern(tmp_path / "src.raw", SIZE, EXTENTS)
    img = tmp_path / "out.qcow2"
    r = run_qimg("convert", "--object", KEY, "-O", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=s0" + extra,
                 src, img)
    assert r.rc == 0, r.err
    assert _qemu_raw(img, tmp_path / "ref.raw") == sha256_file(src)
    assert _qimg_raw(img, tmp_path / "mine.raw") == sha256_file(src)
    assert qemu("check", "--object", KEY, "--image-opts", _opts(img), check=False).rc == 0


@pytest.mark.parametrize("fmt", ["aes", "luks"])
@pytest.mark.parametrize("extra", ["", ",extended_l2=on"])
def test_driver_partial_writes_into_qemu_image(tmp_path, qemu_io, fmt, extra):
    """Unaligned writes (read, decrypt, patch, encrypt) into clusters qemu wrote and into fresh ones."""
    from qimg.objects import add_object

    img = tmp_path / "a.qcow2"
    _qemu_create(img, f"encrypt.format={fmt},encrypt.key-secret=s0" + (",encrypt.iter-time=10" if fmt == "luks"
                                                                        else "") + extra)
    qemu_io(img, *WRITES)
    add_object(KEY)
    drv = open_rw(str(img), "qcow2", options={"encrypt.key-secret": "s0"})
    try:
        drv.pwrite(700, b"\x77" * 900)
        drv.pwrite(300000, b"\x88" * 5000)
        drv.pwrite(SIZE - 5, b"\x99" * 5)
    finally:
        drv.close()
    qemu_io(img, "read -P 0x77 700 900", "read -P 0x88 300000 5000", "read -P 0x99 2097147 5",
            "read -P 0x33 0 700", "read -P 0x44 1600 2400")
    assert _qimg_raw(img, tmp_path / "mine.raw") == _qemu_raw(img, tmp_path / "ref.raw")


@pytest.mark.parametrize("opts", ["encrypt.format=aes,encrypt.key-secret=s0", "encryption=on,encrypt.key-secret=s0",
                                  "encryption=off,encrypt.format=aes,encrypt.key-secret=s0",
                                  "encrypt.format=aes,encrypt.key-secret=s0,preallocation=metadata",
                                  "encrypt.format=aes,encrypt.key-secret=s0,compat=0.10"])
def test_aes_create_identical_file_and_info(tmp_path, oracle, opts):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    r = run_qimg("create", "-f", "qcow2", "--object", KEY, "-o", opts, a, "1M")
    q = qemu("create", "-f", "qcow2", "--object", KEY, "-o", opts, b, "1M")
    assert r.rc == 0, r.err
    assert r.out.replace("a.qcow2", "b.qcow2") == q.out
    assert a.read_bytes() == b.read_bytes()
    for out in ("human", "json"):
        mi = run_qimg("info", f"--output={out}", a)
        qi = qemu("info", f"--output={out}", a)
        assert mi.rc == 0 and mi.out == qi.out
        assert "encrypted: yes" in mi.out or '"encrypted": true' in mi.out
    assert '"format": "aes"' in run_qimg("info", "--output=json", a).out


@pytest.mark.parametrize("opts", ["encrypt.format=aes,encrypt.key-secret=s0,encrypt.cipher-alg=aes-256",
                                  "encryption=on,encrypt.format=luks,encrypt.key-secret=s0",
                                  "encryption=on,encrypt.format=aes,encrypt.key-secret=s0",
                                  "encrypt.format=aes", "encrypt.format=aes,encrypt.key-secret=nope"])
def test_aes_create_errors_match(tmp_path, oracle, opts):
    r = run_qimg("create", "-f", "qcow2", "--object", KEY, "-o", opts, tmp_path / "x.qcow2", "1M")
    q = qemu("create", "-f", "qcow2", "--object", KEY, "-o", opts, tmp_path / "x.qcow2", "1M", check=False)
    assert (r.rc, r.out) == (q.rc, q.out) and q.rc == 1
    assert r.err.replace("qimg:", "qemu-img:") == q.err


@pytest.mark.parametrize("opts", ["encrypt.format=aes,encrypt.key-secret=s0", "encryption=on,encrypt.key-secret=s0",
                                  "encrypt.format=luks,encrypt.key-secret=s0", "preallocation=metadata"])
def test_compressed_convert_refused_like_qemu(tmp_path, oracle, opts):
    src = write_pattern(tmp_path / "src.raw", SIZE, EXTENTS)
    args = ("convert", "-c", "--object", KEY, "-O", "qcow2", "-o", opts, src)
    r = run_qimg(*args, tmp_path / "a.qcow2")
    q = qemu(*args, tmp_path / "b.qcow2", check=False)
    assert q.rc == 1 and r.rc == 1
    assert r.err.replace("qimg:", "qemu-img:") == q.err
    assert not (tmp_path / "a.qcow2").exists() and not (tmp_path / "b.qcow2").exists()


@pytest.mark.parametrize("fmt", ["aes", "luks"])
@pytest.mark.parametrize("cmd", ["convert", "map", "dd", "measure"])
def test_missing_key_message(tmp_path, oracle, fmt, cmd):
    img = tmp_path / "k.qcow2"
    extra = ",encrypt.iter-time=10" if fmt == "luks" else ""
    _qemu_create(img, f"encrypt.format={fmt},encrypt.key-secret=s0{extra}")
    args = {"convert": ("convert", "-O", "raw", img, tmp_path / "o.raw"), "map": ("map", img),
            "dd": ("dd", f"if={img}", f"of={tmp_path / 'o.raw'}"), "measure": ("measure", "-O", "qcow2", img)}[cmd]
    r = run_qimg(*args)
    q = qemu(*args, check=False)
    assert r.rc == q.rc == 1
    assert r.err.replace("qimg:", "qemu-img:") == q.err
    assert "Parameter 'encrypt.key-secret' is required for cipher" in r.err


# ----- LUKS in qcow2 -----

LUKS = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"


CBC_ESSIV = ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256"


@pytest.mark.parametrize("extra", ["", CBC_ESSIV, ",extended_l2=on"])
def test_luks_written_by_qemu_reads_identical(tmp_path, qemu_io, extra):
    img = tmp_path / "l.qcow2"
    _qemu_create(img, LUKS + extra)
    qemu_io(img, *WRITES)
    assert _qimg_raw(img, tmp_path / "mine.raw") == _qemu_raw(img, tmp_path / "ref.raw")
    for out in ("human", "json"):
        mi = run_qimg("info", f"--output={out}", img)
        qi = qemu("info", f"--output={out}", img)
        assert mi.rc == 0 and mi.out == qi.out


@pytest.mark.parametrize("extra", ["", ",extended_l2=on"])
def test_luks_written_by_qimg_reads_in_qemu(tmp_path, oracle, extra):
    src = write_pattern(tmp_path / "src.raw", SIZE, EXTENTS)
    img = tmp_path / "out.qcow2"
    r = run_qimg("convert", "--object", KEY, "-O", "qcow2", "-o", LUKS + extra, src, img)
    assert r.rc == 0, r.err
    assert _qemu_raw(img, tmp_path / "ref.raw") == sha256_file(src)
    assert _qimg_raw(img, tmp_path / "mine.raw") == sha256_file(src)
    for out in ("human", "json"):
        mi = run_qimg("info", f"--output={out}", img)
        qi = qemu("info", f"--output={out}", img)
        assert mi.rc == 0 and mi.out == qi.out
    assert '"format": "luks"' in mi.out and '"encrypted": true' in mi.out


def test_luks_wrong_key(tmp_path, oracle):
    img = tmp_path / "l.qcow2"
    _qemu_create(img, LUKS)
    args = ("convert", "--object", WRONG, "-O", "raw", "--image-opts", _opts(img), tmp_path / "o.raw")
    r = run_qimg(*args)
    q = qemu(*args, check=False)
    assert r.rc == q.rc == 1
    assert q.err.endswith(": Invalid password, cannot unlock any keyslot\n")
    assert r.err.startswith("qimg: Could not open ")
    assert r.err.endswith(": Invalid password, cannot unlock any keyslot\n")
    # info needs no key, even a wrong one
    i1 = run_qimg("info", "--object", WRONG, "--image-opts", _opts(img))
    i2 = qemu("info", "--object", WRONG, "--image-opts", _opts(img))
    assert i1.rc == i2.rc == 0


@pytest.mark.parametrize("prealloc", ["off", "metadata"])
def test_luks_create_like_qemu(tmp_path, oracle, prealloc):
    """Same layout, map and allocated size as qemu-img's own (the LUKS key material itself is random)."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    opts = f"{LUKS},preallocation={prealloc}"
    r = run_qimg("create", "-q", "-f", "qcow2", "--object", KEY, "-o", opts, a, "1M")
    assert r.rc == 0, r.err
    _qemu_create(b, opts, size="1M", cache=False)  # a copy would not keep the allocation
    assert a.stat().st_size == b.stat().st_size
    import json

    sizes = [json.loads(qemu("info", "--output=json", p).out)["actual-size"] for p in (a, b)]
    assert sizes[0] == sizes[1]
    maps = [qemu("map", "--output=json", "--object", KEY, "--image-opts", _opts(p)).out for p in (a, b)]
    assert maps[0] == maps[1]
    assert run_qimg("map", "--output=json", "--object", KEY, "--image-opts", _opts(a)).out == maps[0]
    assert _qimg_raw(a, tmp_path / "mine.raw") == _qemu_raw(a, tmp_path / "ref.raw")
    assert qemu("check", "--object", KEY, "--image-opts", _opts(a), check=False).rc == 0


def test_aes_data_file_and_backing(tmp_path, qemu_io, monkeypatch):
    """AES with an external data file, and an AES overlay whose partial writes copy up from a plain backing file."""
    from qimg.objects import add_object

    monkeypatch.chdir(tmp_path)
    qemu("create", "-q", "-f", "qcow2", "--object", KEY, "-o",
         "encrypt.format=aes,encrypt.key-secret=s0,data_file=d.raw", "e.qcow2", "1M")
    qemu_io("e.qcow2", "write -P 5 1000 70000")
    assert _qimg_raw("e.qcow2", "m.raw") == _qemu_raw("e.qcow2", "r.raw")
    m1 = run_qimg("map", "--output=json", "--object", KEY, "--image-opts", _opts("e.qcow2"))
    assert m1.out == qemu("map", "--output=json", "--object", KEY, "--image-opts", _opts("e.qcow2")).out

    qemu("create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    subprocess.run(["qemu-io", "-c", "write -P 7 0 1M", "base.qcow2"], check=True, capture_output=True)
    for name in ("q.qcow2", "m.qcow2"):
        qemu("create", "-q", "-f", "qcow2", "--object", KEY, "-o", "encrypt.format=aes,encrypt.key-secret=s0",
             "-b", "base.qcow2", "-F", "qcow2", name)
    qemu_io("q.qcow2", "write -P 5 1000 3000")
    add_object(KEY)
    drv = open_rw("m.qcow2", "qcow2", options={"encrypt.key-secret": "s0"})
    try:
        drv.pwrite(1000, b"\x05" * 3000)
    finally:
        drv.close()
    ref = _qemu_raw("q.qcow2", "q.raw")
    assert _qemu_raw("m.qcow2", "m2.raw") == ref == _qimg_raw("q.qcow2", "q2.raw")
