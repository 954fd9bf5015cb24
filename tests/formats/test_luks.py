"""luks: LUKS1 read/write/create/amend, checked against cryptsetup's compat image and the real qemu-img."""

from __future__ import annotations

import hashlib
import struct

import pytest

from tests.conftest import decompress_to, qemu, qemu_create_pbkdf, run_qimg, sha256_file, write_pattern

SECRET = "--object", "secret,id=s0,data=abc"
SIZE = 3 << 20
EXTENTS = [(0, 4096), (5000, 70000), (1 << 20, 1 << 20), (SIZE - 700, 700)]


def _opts(path, secret="s0"):
    return f"driver=luks,key-secret={secret},file.filename={path}"


def _qimg_read(tmp_path, image, secret_obj="secret,id=s0,data=abc", name="qimg.raw"):
    out = tmp_path / name
    r = run_qimg("convert", "--object", secret_obj, "--image-opts", _opts(image), out)
    assert r.rc == 0, r.err
    return out


def _qemu_read(tmp_path, image, secret_obj="secret,id=s0,data=abc", name="qemu.raw"):
    out = tmp_path / name
    qemu("convert", "--object", secret_obj, "--image-opts", _opts(image), out)
    return out


# ----- the crypto primitives -----

@pytest.mark.parametrize("mode,ivgen", [("xts", "plain64"), ("xts", "essiv"), ("cbc", "plain"), ("cbc", "essiv")])
def test_sector_cipher_matches_per_sector_reference(mode, ivgen):
    import os

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from qimg.crypto.cipher import SectorCipher

    key = os.urandom(64 if mode == "xts" else 32)
    sc = SectorCipher("aes-256", mode, ivgen, "sha256" if ivgen == "essiv" else None, key)
    data = os.urandom(512 * 9)
    first = 0xFFFFFFFC  # crosses the 32-bit boundary where plain wraps
    ref = b""
    for i in range(9):
        s = first + i
        if ivgen == "plain":
            s &= 0xFFFFFFFF
        iv = s.to_bytes(16, "little")
        if ivgen == "essiv":
            iv = Cipher(algorithms.AES(hashlib.sha256(key).digest()), modes.ECB()).encryptor().update(iv)
        m = modes.XTS(iv) if mode == "xts" else modes.CBC(iv)
        ref += Cipher(algorithms.AES(key), m).encryptor().update(data[i * 512:(i + 1) * 512])
    assert sc.encrypt(first, data) == ref
    assert sc.decrypt(first, ref) == data


def test_af_split_roundtrip():
    from qimg.crypto.afsplit import af_merge, af_split

    key = bytes(range(32))
    split = af_split(key, 4000, "sha256")
    assert len(split) == 32 * 4000
    assert af_merge(split, 32, 4000, "sha256") == key


# ----- cryptsetup's image -----

@pytest.fixture(scope="module")
def compat(shared_images, tmp_path_factory):
    src = shared_images / "luks" / "compatimage.img.xz"
    if not src.exists():
        pytest.skip("compatimage.img.xz not available")
    return decompress_to(src, tmp_path_factory.mktemp("luks"))


def test_compat_image_reads(compat, expected_images, tmp_path):
    exp = expected_images["luks/compatimage.img.xz"] if "luks/compatimage.img.xz" in expected_images \
        else expected_images["images"]["luks/compatimage.img.xz"]
    out = _qimg_read(tmp_path, compat, "secret,id=s0,data=compatkey")
    assert out.stat().st_size == exp["virtual_size"]
    assert sha256_file(out) == exp["raw_sha256"]


def test_compat_image_info_matches_qemu(compat, oracle):
    for extra in ([], ["--output=json"]):
        mine = run_qimg("info", "-f", "luks", *extra, compat)
        assert mine.rc == 0, mine.err
        assert mine.out == oracle("info", "-f", "luks", *extra, compat).out


def test_wrong_password(compat, tmp_path):
    r = run_qimg("convert", "--object", "secret,id=s0,data=nope", "--image-opts", _opts(compat), tmp_path / "x")
    assert r.rc == 1
    assert r.err.strip().endswith("Invalid password, cannot unlock any keyslot")
    assert "Traceback" not in r.err


def test_missing_secret(compat, tmp_path):
    r = run_qimg("convert", "-f", "luks", compat, tmp_path / "x")
    assert r.rc == 1
    assert r.err == f"qimg: Could not open '{compat}': Parameter 'key-secret' is required for cipher\n"


# ----- create -----

def test_create_help_matches_qemu(oracle):
    assert run_qimg("create", "-f", "luks", "-o", "help").out == oracle("create", "-f", "luks", "-o", "help").out


def test_create_line_and_missing_secret(tmp_path):
    r = run_qimg("create", *SECRET, "-f", "luks", "-o",
                 "key-secret=s0,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,"
                 "hash-alg=sha1,iter-time=10", tmp_path / "a.luks", "1M")
    assert r.rc == 0, r.err
    assert r.out == (f"Formatting '{tmp_path / 'a.luks'}', fmt=luks size=1048576 key-secret=s0 cipher-alg=aes-128 "
                     "cipher-mode=cbc ivgen-alg=essiv ivgen-hash-alg=sha256 hash-alg=sha1 iter-time=10\n")
    r = run_qimg("create", "-f", "luks", tmp_path / "b.luks", "1M")
    assert r.rc == 1 and r.err.endswith("Parameter 'key-secret' is required for cipher\n")
    r = run_qimg("create", *SECRET, "-f", "luks", "-o", "key-secret=s0,cipher-mode=foo", tmp_path / "c.luks", "1M")
    assert r.rc == 1 and r.err.endswith("Parameter 'cipher-mode' does not accept value 'foo'\n")
    r = run_qimg("create", *SECRET, "-f", "luks", "-o", "key-secret=s0,ivgen-alg=essiv,ivgen-hash-alg=sha1",
                 tmp_path / "d.luks", "1M")
    assert r.rc == 1 and r.err.endswith("No AES cipher with key size 20 available\n")


COMBOS = [
    "cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256",
    "cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=essiv,hash-alg=sha1",
    "cipher-alg=aes-192,cipher-mode=xts,ivgen-alg=plain,hash-alg=sha512",
    "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha256",
    "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha1",
]


@pytest.mark.parametrize("combo", COMBOS)
def test_qimg_created_roundtrip_with_qemu(combo, tmp_path, oracle):
    src = write_pattern(tmp_path / "src.raw", SIZE, EXTENTS)
    img = tmp_path / "x.luks"
    r = run_qimg("convert", *SECRET, "-f", "raw", "-O", "luks", "-o", f"key-secret=s0,iter-time=5,{combo}", src, img)
    assert r.rc == 0, r.err
    # qemu decrypts what qimg wrote
    assert sha256_file(_qemu_read(tmp_path, img)) == sha256_file(src)
    # qemu writes other data, qimg decrypts it
    src2 = write_pattern(tmp_path / "src2.raw", SIZE, [(512, 9000), (2 << 20, 300000)], seed=7)
    oracle("convert", *SECRET, "-n", "-f", "raw", "--target-image-opts", src2, _opts(img))
    assert sha256_file(_qimg_read(tmp_path, img)) == sha256_file(src2)
    # the header describes the choice, as qemu reads it
    mine = run_qimg("info", "-f", "luks", "--output=json", img)
    assert mine.out == oracle("info", "--output=json", img).out


def test_qemu_created_image(tmp_path, oracle):
    img = tmp_path / "q.luks"
    qemu_create_pbkdf(*SECRET, "-q", "-f", "luks", "-o", "key-secret=s0,iter-time=10", img, "2M")
    src = write_pattern(tmp_path / "src.raw", 2 << 20, [(0, 100000), (1 << 20, 4096)])
    oracle("convert", *SECRET, "-n", "-f", "raw", "--target-image-opts", src, _opts(img))
    for extra in ([], ["--output=json"]):
        assert run_qimg("info", *extra, "-f", "luks", img).out == oracle("info", *extra, img).out
    assert sha256_file(_qimg_read(tmp_path, img)) == sha256_file(src)


def test_unaligned_writes(tmp_path):
    from qimg.core.registry import open_image
    from qimg.objects import add_object

    add_object("secret,id=s0,data=abc")
    img = tmp_path / "u.luks"
    r = run_qimg("create", *SECRET, "-q", "-f", "luks", "-o", "key-secret=s0,iter-time=5", img, "64K")
    assert r.rc == 0, r.err
    ref = bytearray(65536)
    with open_image(str(img), "luks", writable=True, options={"key-secret": "s0"}) as drv:
        drv.pwrite(0, bytes(65536))
        for off, data in ((3, b"abc"), (510, b"x" * 5), (1000, bytes(range(256)) * 20), (65530, b"zzzzzz")):
            drv.pwrite(off, data)
            ref[off:off + len(data)] = data
        assert drv.pread(0, 65536) == bytes(ref)
        assert drv.pread(511, 3) == bytes(ref[511:514])
    with open_image(str(img), "luks", options={"key-secret": "s0"}) as drv:
        assert drv.pread(0, 65536) == bytes(ref)


# ----- amend -----

def test_amend_keyslots(tmp_path, oracle):
    from qimg.core.registry import open_image
    from qimg.errors import QimgError
    from qimg.objects import add_object

    for s in ("secret,id=s0,data=abc", "secret,id=s1,data=def", "secret,id=s2,data=ghi"):
        add_object(s)
    img = tmp_path / "a.luks"
    assert run_qimg("create", *SECRET, "-q", "-f", "luks", "-o", "key-secret=s0,iter-time=5", img, "1M").rc == 0

    def amend(opts, secret="s0"):
        with open_image(str(img), "luks", writable=True, options={"key-secret": secret}) as drv:
            drv.amend(opts)

    def fails(opts, msg, secret="s0"):
        with pytest.raises(QimgError) as e:
            amend(opts, secret)
        assert str(e.value) == msg

    amend({"state": "active", "new-secret": "s1", "iter-time": "5"})
    fails({"state": "active", "new-secret": "s2", "keyslot": "1"},
          "Refusing to overwrite active keyslot 1 - please erase it first")
    fails({"state": "active", "keyslot": "2"}, "'new-secret' is required to activate a keyslot")
    fails({"state": "active", "new-secret": "s2", "old-secret": "s1"},
          "'old-secret' must not be given when activating keyslots")
    fails({"state": "inactive", "keyslot": "7"}, "Given keyslot 7 is already erased (inactive) ")
    fails({"state": "inactive", "old-secret": "s2"}, "No keyslots match given (old) password for erase operation")
    fails({"state": "inactive"}, "To erase keyslot(s), either explicit keyslot index or the password currently "
          "contained in them must be given")
    fails({"new-secret": "s2"}, "Parameter 'state' is missing")
    fails({"state": "active", "new-secret": "s2", "keyslot": "9"},
          "Invalid keyslot 9 specified, must be between 0 and 7")
    # the new slot opens the image, in qemu too
    info = oracle("info", "--output=json", img).out
    assert '"iters"' in info and info.count('"active": true') == 2
    assert _qemu_read(tmp_path, img, "secret,id=s0,data=def").stat().st_size == 1 << 20
    amend({"state": "inactive", "old-secret": "s0"}, secret="s1")
    fails({"state": "inactive", "keyslot": "1"}, "Attempt to erase the only active keyslot 1 which will erase all "
          "the data in the image irreversibly - refusing operation", secret="s1")
    r = run_qimg("convert", "--object", "secret,id=s0,data=abc", "--image-opts", _opts(img), tmp_path / "o.raw")
    assert r.rc == 1 and "Invalid password, cannot unlock any keyslot" in r.err
    r = qemu("convert", "--object", "secret,id=s0,data=def", "--image-opts", _opts(img), tmp_path / "o.raw")
    assert r.rc == 0


# ----- hostile headers -----

def _hdr_image(tmp_path):
    img = tmp_path / "h.luks"
    r = run_qimg("create", *SECRET, "-q", "-f", "luks", "-o", "key-secret=s0,iter-time=5", img, "64K")
    assert r.rc == 0, r.err
    return img


def _patch(path, off, fmt, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


SLOT0 = 208  # first key slot in the phdr


@pytest.mark.parametrize("off,fmt,value,msg", [
    (6, ">H", 2, "LUKS version 2 is not supported"),
    (108, ">I", 1 << 20, "LUKS key bytes 1048576 exceeds the limit 64"),
    (164, ">I", 0xFFFFFFFF, "LUKS master key digest iterations 4294967295 exceeds the limit"),
    (SLOT0 + 4, ">I", 0xFFFFFFFF, "Keyslot 0 iterations 4294967295 exceeds the limit"),
    (SLOT0 + 44, ">I", 100000, "Keyslot 0 is corrupted (stripes 100000 != 4000)"),
    (SLOT0 + 40, ">I", 1, "Keyslot 0 is overlapping with the LUKS header"),
    (SLOT0 + 48 + 40, ">I", 8, "Keyslots 0 and 1 are overlapping in the header"),
    (SLOT0, ">I", 7, "Keyslot 0 state (active/disable) is corrupted"),
    (104, ">I", 0xFFFFFF, "LUKS payload offset 8589934080 is beyond the end of the file"),
    (40, ">4s", b"ecb\0", "Keyslot"),
])
def test_hostile_header(tmp_path, off, fmt, value, msg):
    img = _hdr_image(tmp_path)
    _patch(img, off, fmt, value)
    r = run_qimg("convert", "--object", "secret,id=s0,data=abc", "--image-opts", _opts(img), tmp_path / "o.raw")
    assert r.rc == 1
    assert "Traceback" not in r.err and r.err.count("\n") == 1
    if fmt != ">4s":
        assert msg in r.err


def test_truncated_header(tmp_path):
    img = tmp_path / "t.luks"
    img.write_bytes(b"LUKS\xba\xbe\x00\x01" + bytes(100))
    r = run_qimg("info", "-f", "luks", img)
    assert r.rc == 1 and "LUKS header truncated" in r.err


def test_volume_api_for_containers():
    """The entry points a container format (qcow2 encrypt.format=luks) uses: a header inside a region."""
    import os

    from qimg.crypto import luks1
    from qimg.io.store import MemoryStore

    n = luks1.header_size("aes-128", "cbc")
    store = MemoryStore(bytes(4096 + n))
    region = luks1.RegionStore(store, 4096, n)
    hdr, enc = luks1.format_volume(region, b"pw", "aes-128", "cbc", "essiv", "sha256", "sha1", iter_time_ms=5)
    assert hdr.payload_offset == n
    assert store.pread(0, 4096) == bytes(4096)  # nothing written outside the region
    hdr2, dec = luks1.open_volume(region, b"pw")
    assert hdr2.info() == hdr.info()
    data = os.urandom(8192)
    assert bytes(dec.decrypt(77, enc.encrypt(77, data))) == data
    from qimg.errors import QimgError

    with pytest.raises(QimgError, match="Invalid password"):
        luks1.open_volume(region, b"wrong")


def test_secret_from_file(tmp_path, oracle):
    secret = tmp_path / "pw"
    secret.write_bytes(b"file-secret")
    img = tmp_path / "f.luks"
    r = run_qimg("create", "--object", f"secret,id=sf,file={secret}", "-q", "-f", "luks", "-o",
                 "key-secret=sf,iter-time=5", img, "1M")
    assert r.rc == 0, r.err
    # never-written sectors decrypt to noise in both tools (the payload holds zero ciphertext), identically
    theirs = _qemu_read(tmp_path, img, "secret,id=s0,data=file-secret")
    mine = _qimg_read(tmp_path, img, f"secret,id=s0,file={secret}")
    assert sha256_file(mine) == sha256_file(theirs)


def test_amend_cli(tmp_path, oracle):
    img = tmp_path / "c.luks"
    assert run_qimg("create", *SECRET, "-q", "-f", "luks", "-o", "key-secret=s0,iter-time=5", img, "1M").rc == 0
    assert run_qimg("amend", "-f", "luks", "-o", "help", img).out == oracle("amend", "-f", "luks", "-o", "help",
                                                                             img).out
    objs = ("--object", "secret,id=s0,data=abc", "--object", "secret,id=s1,data=def")
    r = run_qimg("amend", *objs, "--image-opts", _opts(img), "-o", "state=active,new-secret=s1,iter-time=5")
    assert r.rc == 0, r.err
    r = run_qimg("amend", *objs, "--image-opts", _opts(img), "-o", "state=inactive,keyslot=0")
    assert r.rc == 0, r.err
    r = run_qimg("amend", *objs, "--image-opts", _opts(img, "s1"), "-o", "bogus=1")
    assert r.rc == 1 and r.err.endswith("Invalid parameter 'bogus'\n")
    info = oracle("info", "--output=json", img).out
    assert info.count('"active": true') == 1
    assert _qemu_read(tmp_path, img, "secret,id=s0,data=def").stat().st_size == 1 << 20
