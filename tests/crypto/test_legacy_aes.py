"""The one legacy AES (qcow and qcow2 crypt_method 1): key handling and data, both ways, against qemu-img."""

from __future__ import annotations

import base64
import subprocess

import pytest

from qimg.crypto.cipher import legacy_aes_key
from qimg.errors import QimgError
from tests.conftest import run_qimg, sha256_file, write_pattern

#: longer than the 16 key bytes, with a multi-byte UTF-8 character inside them
LONG = "pä55word-longer-than-16-bytes"
FORMATS = ["qcow", "qcow2"]


def _secret(ident, passphrase: bytes):
    return ["--object", f"secret,id={ident},data={base64.b64encode(passphrase).decode()},format=base64"]


def _opts(fmt, img):
    return ["--image-opts", f"driver={fmt},encrypt.key-secret=s0,file.filename={img}"]


def test_key_is_the_first_16_bytes_zero_padded():
    assert legacy_aes_key(b"abc", "s") == b"abc" + bytes(13)
    assert legacy_aes_key(LONG.encode(), "s") == LONG.encode()[:16]
    for bad in (b"ab\0cd", b"ab\xffcd"):
        with pytest.raises(QimgError, match="^Data from secret s is not valid UTF-8$"):
            legacy_aes_key(bad, "s")


@pytest.mark.parametrize("fmt", FORMATS)
def test_long_passphrase_reads_and_writes_like_qemu(tmp_path, oracle, fmt):
    key = _secret("s0", LONG.encode())
    theirs = tmp_path / f"theirs.{fmt}"
    oracle("create", "-f", fmt, *key, "-o", "encrypt.format=aes,encrypt.key-secret=s0", theirs, "4M")
    subprocess.run(["qemu-io", *key, *_opts(fmt, theirs), "-c", "write -P 0x5a 4096 1M"], check=True,
                   capture_output=True)
    want, got = tmp_path / "want.raw", tmp_path / "got.raw"
    oracle("convert", *key, *_opts(fmt, theirs), "-O", "raw", want)
    r = run_qimg("convert", *key, *_opts(fmt, theirs), "-O", "raw", got)
    assert r.rc == 0, r.err
    assert sha256_file(got) == sha256_file(want)
    # and the other way: what qimg encrypts, qemu-img decrypts
    src = tmp_path / "src.raw"
    write_pattern(src, 4 << 20, [(0, 5000), (70000, 200000), (3 << 20, 1 << 20)], seed=3)
    ours = tmp_path / f"ours.{fmt}"
    r = run_qimg("convert", *key, "-O", fmt, "-o", "encrypt.format=aes,encrypt.key-secret=s0", src, ours)
    assert r.rc == 0, r.err
    back = tmp_path / "back.raw"
    oracle("convert", *key, *_opts(fmt, ours), "-O", "raw", back)
    assert sha256_file(back) == sha256_file(src)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("passphrase", [b"ab\0cd", b"ab\xffcd"], ids=["nul", "not-utf8"])
def test_passphrase_that_is_not_utf8_text_is_refused_like_qemu(tmp_path, oracle, fmt, passphrase):
    key = _secret("s0", passphrase)
    ours = run_qimg("create", "-f", fmt, *key, "-o", "encrypt.format=aes,encrypt.key-secret=s0",
                    tmp_path / f"a.{fmt}", "1M")
    theirs = oracle("create", "-f", fmt, *key, "-o", "encrypt.format=aes,encrypt.key-secret=s0",
                    tmp_path / f"b.{fmt}", "1M", check=False)
    assert (ours.rc, ours.out) == (theirs.rc, theirs.out.replace("b." + fmt, "a." + fmt)) == (1, ours.out)
    assert ours.err.replace("qimg:", "qemu-img:") == theirs.err.replace("b." + fmt, "a." + fmt)
    # an image made with a good key, opened with a bad one
    img = tmp_path / f"ok.{fmt}"
    oracle("create", "-f", fmt, *_secret("s0", b"abc"), "-o", "encrypt.format=aes,encrypt.key-secret=s0", img, "1M")
    ours = run_qimg("convert", *key, *_opts(fmt, img), "-O", "raw", tmp_path / "o1.raw")
    theirs = oracle("convert", *key, *_opts(fmt, img), "-O", "raw", tmp_path / "o2.raw", check=False)
    assert (ours.rc, ours.err.replace("qimg:", "qemu-img:")) == (theirs.rc, theirs.err) == (
        1, f"qemu-img: Could not open 'driver={fmt},encrypt.key-secret=s0,file.filename={img}': "
           "Data from secret s0 is not valid UTF-8\n")
