"""Sector ciphers: AES in XTS/CBC/ECB with plain/plain64/essiv IVs, many sectors per library call.

References: IEEE Std 1619-2007 (XTS: tweak T = E_K2(IV), T_j = T * alpha^j in GF(2^128), little endian);
NIST SP 800-38A (CBC); dm-crypt IV generators: ``plain`` (32-bit little-endian sector number),
``plain64`` (64-bit little-endian sector number), ``essiv:H`` (E_{H(key)}(plain64)).

One cryptography call per 512-byte sector is slow (about 70 MB/s), so the tweaks and IVs of a whole batch are
computed with numpy and the bulk work runs as a single AES-ECB call over the batch (rule 8 of PERFORMANCE.md).
"""

from __future__ import annotations

import hashlib

from ..errors import QimgError

SECTOR_SIZE = 512
BLOCKS_PER_SECTOR = SECTOR_SIZE // 16
#: sectors handled per library call (the caller's buffer is split into batches of this many)
BATCH_SECTORS = 4096

CIPHER_ALGS = {"aes-128": 16, "aes-192": 24, "aes-256": 32}
CIPHER_MODES = ("xts", "cbc", "ecb")
IVGEN_ALGS = ("plain", "plain64", "essiv")
HASH_ALGS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
#: XTS reduction polynomial x^128 + x^7 + x^2 + x + 1
XTS_GF_POLY = 0x87


def hash_digest_size(name: str) -> int:
    try:
        return hashlib.new(name).digest_size
    except (ValueError, TypeError):
        raise QimgError(f"Hash algorithm '{name}' not supported") from None


def aes_alg_for_key(nbytes: int) -> str:
    """The AES variant for a key length (qemu: 'No AES cipher with key size N available')."""
    for name, n in CIPHER_ALGS.items():
        if n == nbytes:
            return name
    raise QimgError(f"No AES cipher with key size {nbytes} available")


def _ecb(key: bytes, data, encrypt: bool) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    c = Cipher(algorithms.AES(key), modes.ECB())
    ctx = c.encryptor() if encrypt else c.decryptor()
    return ctx.update(data) + ctx.finalize()


def _ecb_array(key: bytes, data, encrypt: bool):
    """AES-ECB of ``data`` into a fresh little-endian uint64 numpy array (no intermediate bytes copies)."""
    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if isinstance(data, np.ndarray):
        data = memoryview(np.ascontiguousarray(data)).cast("B")
    n = len(data)
    out = bytearray(n + 15)  # update_into wants room for one more block
    c = Cipher(algorithms.AES(key), modes.ECB())
    ctx = c.encryptor() if encrypt else c.decryptor()
    ctx.update_into(data, out)
    return np.frombuffer(out, dtype="<u8", count=n // 8)


class SectorCipher:
    """Encrypts/decrypts whole 512-byte sectors given the number of the first one."""

    def __init__(self, alg: str, mode: str, ivgen: str | None, ivgen_hash: str | None, key: bytes):
        if alg not in CIPHER_ALGS:
            raise QimgError(f"Cipher algorithm '{alg}' not supported")
        if mode not in CIPHER_MODES:
            raise QimgError(f"Cipher mode '{mode}' not supported")
        nkey = CIPHER_ALGS[alg] * (2 if mode == "xts" else 1)
        if len(key) != nkey:
            raise QimgError(f"Cipher key length {len(key)} does not match {alg}-{mode} ({nkey} bytes)")
        self.alg, self.mode, self.ivgen = alg, mode, ivgen
        if mode == "xts":
            half = len(key) // 2
            self.key, self.tweak_key = key[:half], key[half:]
        else:
            self.key, self.tweak_key = key, None
        self.essiv_key = None
        if ivgen == "essiv":
            if not ivgen_hash:
                raise QimgError("Missing IV generator hash algorithm")
            hash_digest_size(ivgen_hash)
            ek = hashlib.new(ivgen_hash, key).digest()
            aes_alg_for_key(len(ek))
            self.essiv_key = ek
        elif ivgen not in (None, "plain", "plain64"):
            raise QimgError(f"IV generator '{ivgen}' not supported")
        if mode != "ecb" and ivgen is None:
            raise QimgError(f"Cipher mode '{mode}' needs an IV generator")

    # ----- IVs -----
    def _ivs(self, first_sector: int, count: int):
        """IVs of ``count`` sectors as a (count, 2) little-endian uint64 array."""
        import numpy as np

        iv = np.zeros((count, 2), dtype="<u8")
        sectors = np.arange(first_sector, first_sector + count, dtype=np.uint64)
        if self.ivgen == "plain":
            sectors &= np.uint64(0xFFFFFFFF)
        iv[:, 0] = sectors
        if self.essiv_key is not None:
            iv = np.frombuffer(_ecb(self.essiv_key, iv.tobytes(), True), dtype="<u8").reshape(count, 2).copy()
        return iv

    def _xts_tweaks(self, first_sector: int, count: int):
        import numpy as np

        t = np.frombuffer(_ecb(self.tweak_key, self._ivs(first_sector, count).tobytes(), True),
                          dtype="<u8").reshape(count, 2)
        # T * alpha^j for j = 0..31 at once: shift the 128-bit value left by j and fold the bits that fall off
        # the top back in with the XTS polynomial (x^7 + x^2 + x + 1); j < 57 keeps the fold inside 64 bits
        out = np.empty((count, BLOCKS_PER_SECTOR, 2), dtype="<u8")
        lo = t[:, 0:1]
        hi = t[:, 1:2]
        j = np.arange(1, BLOCKS_PER_SECTOR, dtype=np.uint64)
        back = np.uint64(64) - j
        o = hi >> back
        out[:, 0, 0] = t[:, 0]
        out[:, 0, 1] = t[:, 1]
        out[:, 1:, 1] = (hi << j) | (lo >> back)
        out[:, 1:, 0] = (lo << j) ^ o ^ (o << np.uint64(1)) ^ (o << np.uint64(2)) ^ (o << np.uint64(7))
        return out

    # ----- public -----
    def encrypt(self, first_sector: int, data) -> bytes:
        return self._run(first_sector, data, True)

    def decrypt(self, first_sector: int, data) -> bytes:
        return self._run(first_sector, data, False)

    def _run(self, first_sector: int, data, encrypt: bool) -> bytes:
        n = len(data)
        if n % SECTOR_SIZE:
            raise QimgError(f"encrypted I/O of {n} bytes is not a multiple of the sector size {SECTOR_SIZE}")
        if n == 0:
            return b""
        mv = memoryview(data).cast("B")
        step = BATCH_SECTORS * SECTOR_SIZE
        if n <= step:
            return self._batch(first_sector, mv, encrypt)
        parts = []
        for pos in range(0, n, step):
            chunk = mv[pos:pos + step]
            parts.append(self._batch(first_sector + pos // SECTOR_SIZE, chunk, encrypt))
        return b"".join(parts)

    def _batch(self, first_sector: int, data, encrypt: bool) -> bytes:
        import numpy as np

        count = len(data) // SECTOR_SIZE
        if self.mode == "ecb":
            return _ecb(self.key, data, encrypt)
        if self.mode == "xts":
            tw = self._xts_tweaks(first_sector, count).reshape(-1)
            x = np.frombuffer(data, dtype="<u8") ^ tw
            y = _ecb_array(self.key, x, encrypt)
            y ^= tw
            return y.data.cast("B")
        # CBC: decryption is parallel over all blocks; encryption chains one block column at a time
        ivs = self._ivs(first_sector, count)
        blocks = np.frombuffer(data, dtype="<u8").reshape(count, BLOCKS_PER_SECTOR, 2)
        if not encrypt:
            plain = _ecb_array(self.key, data, False).reshape(count, BLOCKS_PER_SECTOR, 2)
            plain[:, 0] ^= ivs
            plain[:, 1:] ^= blocks[:, :-1]
            return plain.reshape(-1).data.cast("B")
        out = np.empty_like(blocks)
        prev = ivs
        for j in range(BLOCKS_PER_SECTOR):
            x = blocks[:, j] ^ prev
            prev = np.frombuffer(_ecb(self.key, x.tobytes(), True), dtype="<u8").reshape(count, 2)
            out[:, j] = prev
        return out.tobytes()


def legacy_aes_key(passphrase: bytes, secret_id: str) -> bytes:
    """The key of the legacy qcow/qcow2 AES cipher (crypt_method 1): the passphrase is UTF-8 text
    (qemu refuses a secret with a NUL or invalid UTF-8 in it), its first 16 bytes zero-padded."""
    passphrase = bytes(passphrase)
    try:
        passphrase.decode("utf-8")
        valid = b"\0" not in passphrase
    except UnicodeDecodeError:
        valid = False
    if not valid:
        raise QimgError(f"Data from secret {secret_id} is not valid UTF-8")
    return passphrase[:16].ljust(16, b"\0")


def legacy_aes_cipher(passphrase: bytes, secret_id: str) -> SectorCipher:
    """The legacy qcow/qcow2 AES cipher: AES-128-CBC per 512-byte sector, IV the plain64 sector number
    (qcow numbers guest sectors, qcow2 too), the key from ``legacy_aes_key``."""
    return SectorCipher("aes-128", "cbc", "plain64", None, legacy_aes_key(passphrase, secret_id))
