"""LUKS1 headers and key slots: parse (with limits), build, unlock, add and erase slots.

References: LUKS On-Disk Format Specification 1.2.3: phdr (592 bytes, big endian: magic "LUKS\\xba\\xbe",
version, cipher-name, cipher-mode, hash-spec, payload-offset, key-bytes, mk-digest, mk-digest-salt,
mk-digest-iter, uuid, 8 key slots of {active, iterations, salt, key-material-offset, stripes}),
"Master key recovery" (PBKDF2 + AF merge + digest check) and "New key setup".
Layout of new images follows what qemu-img 7.2 writes: key material from sector 8, each slot's area rounded
up to 4 KiB, payload right after the last slot.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import uuid as uuidlib
from dataclasses import dataclass, field

from ..errors import CorruptImage, OpenError, QimgError, check_limit
from .afsplit import af_merge, af_split
from .cipher import CIPHER_ALGS, SECTOR_SIZE, SectorCipher, hash_digest_size

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_VERSION = 1
LUKS_NUMKEYS = 8
LUKS_KEY_ENABLED = 0x00AC71F3
LUKS_KEY_DISABLED = 0x0000DEAD
LUKS_DIGESTSIZE = 20
LUKS_SALTSIZE = 32
LUKS_STRIPES = 4000
LUKS_HEADER_SIZE = 592
LUKS_SLOT_SIZE = 48
#: sector of the first key material area, and the alignment of every area, in new images
LUKS_KEY_MATERIAL_START_SECTORS = 8
LUKS_ALIGN_BYTES = 4096
LUKS_MKDIGEST_ITERATIONS_MIN = 1000

#: limits for fields read from an image
MAX_KEY_BYTES = 64
MAX_STRIPES = LUKS_STRIPES
MAX_PBKDF2_ITERATIONS = 1 << 26

_HDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")


@dataclass
class KeySlot:
    active: bool
    iterations: int
    salt: bytes
    key_offset_sectors: int
    stripes: int
    raw_active: int = LUKS_KEY_DISABLED


@dataclass
class LuksHeader:
    cipher_name: str
    cipher_mode_spec: str
    hash_spec: str
    payload_offset_sectors: int
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: str
    slots: list = field(default_factory=list)
    version: int = LUKS_VERSION
    # parsed
    cipher_alg: str = ""
    cipher_mode: str = ""
    ivgen_alg: str | None = None
    ivgen_hash_alg: str | None = None

    @property
    def payload_offset(self) -> int:
        return self.payload_offset_sectors * SECTOR_SIZE

    @property
    def split_key_bytes(self) -> int:
        return self.key_bytes * LUKS_STRIPES

    def pack(self) -> bytes:
        out = _HDR.pack(LUKS_MAGIC, self.version, self.cipher_name.encode(), self.cipher_mode_spec.encode(),
                        self.hash_spec.encode(), self.payload_offset_sectors, self.key_bytes, self.mk_digest,
                        self.mk_digest_salt, self.mk_digest_iter, self.uuid.encode())
        for s in self.slots:
            out += _SLOT.pack(LUKS_KEY_ENABLED if s.active else LUKS_KEY_DISABLED, s.iterations, s.salt,
                              s.key_offset_sectors, s.stripes)
        assert len(out) == LUKS_HEADER_SIZE
        return out

    def cipher(self, key: bytes) -> SectorCipher:
        return SectorCipher(self.cipher_alg, self.cipher_mode, self.ivgen_alg, self.ivgen_hash_alg, key)

    def info(self) -> dict:
        """qemu's QCryptoBlockInfoLUKS."""
        d = {"cipher-alg": self.cipher_alg, "cipher-mode": self.cipher_mode, "ivgen-alg": self.ivgen_alg}
        if self.ivgen_hash_alg:
            d["ivgen-hash-alg"] = self.ivgen_hash_alg
        d["hash-alg"] = self.hash_spec
        d["payload-offset"] = self.payload_offset
        d["master-key-iters"] = self.mk_digest_iter
        d["uuid"] = self.uuid
        slots = []
        for s in self.slots:
            e = {"active": s.active}
            if s.active:
                e["iters"] = s.iterations
                e["stripes"] = s.stripes
            e["key-offset"] = s.key_offset_sectors * SECTOR_SIZE
            slots.append(e)
        d["slots"] = slots
        return d


def _cstr(b: bytes, what: str) -> str:
    s = b.split(b"\0", 1)[0]
    try:
        return s.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptImage(f"LUKS {what} is not an ASCII string") from None


def probe(head: bytes) -> int:
    if head[:6] == LUKS_MAGIC and len(head) >= 8 and struct.unpack(">H", head[6:8])[0] == LUKS_VERSION:
        return 100
    return 0


def parse_cipher_mode(spec: str) -> tuple[str, str | None, str | None]:
    """'xts-plain64' -> ('xts', 'plain64', None); 'cbc-essiv:sha256' -> ('cbc', 'essiv', 'sha256')."""
    mode, _, iv = spec.partition("-")
    ivgen, _, ivhash = iv.partition(":")
    return mode, (ivgen or None), (ivhash or None)


def parse_header(buf: bytes, file_size: int) -> LuksHeader:
    """Decode and validate a LUKS1 header; every field is checked before use."""
    if len(buf) < LUKS_HEADER_SIZE:
        raise CorruptImage(f"LUKS header truncated ({len(buf)} of {LUKS_HEADER_SIZE} bytes)")
    (magic, version, cname, cmode, hspec, payload, key_bytes, mkd, mks, mki, uid) = _HDR.unpack_from(buf, 0)
    if magic != LUKS_MAGIC:
        raise OpenError("Volume is not in LUKS format")
    if version != LUKS_VERSION:
        raise OpenError(f"LUKS version {version} is not supported")
    hdr = LuksHeader(_cstr(cname, "cipher name"), _cstr(cmode, "cipher mode"), _cstr(hspec, "hash spec"),
                     payload, key_bytes, mkd, mks, mki, _cstr(uid, "uuid"), version=version)
    check_limit("LUKS key bytes", key_bytes, MAX_KEY_BYTES)
    check_limit("LUKS master key digest iterations", mki, MAX_PBKDF2_ITERATIONS)
    if mki == 0:
        raise CorruptImage("LUKS master key digest iterations is zero")
    if hdr.cipher_name != "aes":
        raise OpenError(f"Cipher '{hdr.cipher_name}' is not supported")
    mode, ivgen, ivhash = parse_cipher_mode(hdr.cipher_mode_spec)
    if mode not in ("xts", "cbc", "ecb"):
        raise OpenError(f"Cipher mode '{mode}' is not supported")
    if mode == "ecb":
        ivgen = ivhash = None
    elif ivgen not in ("plain", "plain64", "essiv"):
        raise OpenError(f"IV generator '{ivgen}' is not supported")
    if ivgen == "essiv" and not ivhash:
        raise OpenError("Missing IV generator hash specification")
    if ivhash:
        hash_digest_size(ivhash)
    hash_digest_size(hdr.hash_spec)
    aes_bytes = key_bytes // 2 if mode == "xts" else key_bytes
    alg = next((n for n, k in CIPHER_ALGS.items() if k == aes_bytes and aes_bytes * (2 if mode == "xts" else 1)
                == key_bytes), None)
    if alg is None:
        raise OpenError(f"No AES cipher with key size {key_bytes} available for mode '{mode}'")
    hdr.cipher_alg, hdr.cipher_mode, hdr.ivgen_alg, hdr.ivgen_hash_alg = alg, mode, ivgen, ivhash
    header_sectors = -(-LUKS_HEADER_SIZE // SECTOR_SIZE)
    split_sectors = -(-key_bytes * LUKS_STRIPES // SECTOR_SIZE)
    for i in range(LUKS_NUMKEYS):
        active, iters, salt, koff, stripes = _SLOT.unpack_from(buf, _HDR.size + i * LUKS_SLOT_SIZE)
        if active not in (LUKS_KEY_ENABLED, LUKS_KEY_DISABLED):
            raise CorruptImage(f"Keyslot {i} state (active/disable) is corrupted")
        slot = KeySlot(active == LUKS_KEY_ENABLED, iters, salt, koff, stripes, active)
        hdr.slots.append(slot)
        if stripes != LUKS_STRIPES:
            raise CorruptImage(f"Keyslot {i} is corrupted (stripes {stripes} != {LUKS_STRIPES})")
        if koff < header_sectors:
            raise CorruptImage(f"Keyslot {i} is overlapping with the LUKS header")
        if koff + split_sectors > payload:
            raise CorruptImage(f"Keyslot {i} is overlapping with the encrypted payload")
        if slot.active:
            check_limit(f"Keyslot {i} iterations", iters, MAX_PBKDF2_ITERATIONS)
            if iters == 0:
                raise CorruptImage(f"Keyslot {i} iterations is zero")
    for i in range(LUKS_NUMKEYS):
        for j in range(i + 1, LUKS_NUMKEYS):
            a, b = hdr.slots[i], hdr.slots[j]
            if a.key_offset_sectors < b.key_offset_sectors + split_sectors and \
                    b.key_offset_sectors < a.key_offset_sectors + split_sectors:
                raise CorruptImage(f"Keyslots {i} and {j} are overlapping in the header")
    if hdr.payload_offset > file_size:
        raise CorruptImage(f"LUKS payload offset {hdr.payload_offset} is beyond the end of the file "
                           f"({file_size} bytes)")
    return hdr


def _pbkdf2(hash_name: str, password: bytes, salt: bytes, iters: int, n: int) -> bytes:
    return hashlib.pbkdf2_hmac(hash_name, password, salt, iters, n)


def _read_material(store, hdr: LuksHeader, slot: KeySlot) -> bytes:
    n = -(-hdr.split_key_bytes // SECTOR_SIZE) * SECTOR_SIZE
    return store.pread_full(slot.key_offset_sectors * SECTOR_SIZE, n)


def _check_master_key(hdr: LuksHeader, mk: bytes) -> bool:
    d = _pbkdf2(hdr.hash_spec, mk, hdr.mk_digest_salt, hdr.mk_digest_iter, LUKS_DIGESTSIZE)
    return d == hdr.mk_digest


def try_slot(store, hdr: LuksHeader, index: int, password: bytes) -> bytes | None:
    """The master key if ``password`` opens slot ``index``, else None."""
    slot = hdr.slots[index]
    if not slot.active:
        return None
    derived = _pbkdf2(hdr.hash_spec, password, slot.salt, slot.iterations, hdr.key_bytes)
    material = _read_material(store, hdr, slot)
    plain = hdr.cipher(derived).decrypt(0, material)
    mk = af_merge(plain, hdr.key_bytes, slot.stripes, hdr.hash_spec)
    return mk if _check_master_key(hdr, mk) else None


def unlock(store, hdr: LuksHeader, password: bytes) -> tuple[bytes, int]:
    """(master key, slot index) for ``password``; qemu's error when no slot opens."""
    for i in range(LUKS_NUMKEYS):
        mk = try_slot(store, hdr, i, password)
        if mk is not None:
            return mk, i
    raise QimgError("Invalid password, cannot unlock any keyslot")


def pbkdf2_iterations(hash_name: str, iter_time_ms: int, key_len: int) -> int:
    """Iterations that take about ``iter_time_ms`` here (measured), at least the LUKS minimum."""
    n = 1 << 12
    while True:
        t0 = time.perf_counter()
        _pbkdf2(hash_name, b"benchmark", bytes(LUKS_SALTSIZE), n, key_len)
        dt = time.perf_counter() - t0
        if dt >= 0.02 or n >= 1 << 24:
            break
        n <<= 1
    rate = n / max(dt, 1e-6)
    return max(LUKS_MKDIGEST_ITERATIONS_MIN, min(int(rate * iter_time_ms / 1000), MAX_PBKDF2_ITERATIONS))


def write_slot(store, hdr: LuksHeader, index: int, mk: bytes, password: bytes, iter_time_ms: int) -> None:
    """Fill key slot ``index`` with ``mk`` locked by ``password`` (header itself written by the caller)."""
    slot = hdr.slots[index]
    iters = pbkdf2_iterations(hdr.hash_spec, iter_time_ms, hdr.key_bytes)
    salt = os.urandom(LUKS_SALTSIZE)
    derived = _pbkdf2(hdr.hash_spec, password, salt, iters, hdr.key_bytes)
    split = af_split(mk, LUKS_STRIPES, hdr.hash_spec)
    pad = -len(split) % SECTOR_SIZE
    store.pwrite(slot.key_offset_sectors * SECTOR_SIZE, hdr.cipher(derived).encrypt(0, split + os.urandom(pad)))
    slot.active, slot.iterations, slot.salt, slot.stripes = True, iters, salt, LUKS_STRIPES


def erase_slot(store, hdr: LuksHeader, index: int) -> None:
    """Overwrite a slot's key material with random bytes and mark it inactive."""
    slot = hdr.slots[index]
    n = -(-hdr.split_key_bytes // SECTOR_SIZE) * SECTOR_SIZE
    store.pwrite(slot.key_offset_sectors * SECTOR_SIZE, os.urandom(n))
    slot.active, slot.iterations, slot.salt = False, 0, bytes(LUKS_SALTSIZE)


def new_header(cipher_alg: str, cipher_mode: str, ivgen_alg: str | None, ivgen_hash_alg: str | None,
               hash_alg: str) -> tuple[LuksHeader, bytes]:
    """A fresh header (no active slot yet) and a random master key."""
    aes_bytes = CIPHER_ALGS[cipher_alg]
    key_bytes = aes_bytes * (2 if cipher_mode == "xts" else 1)
    mode_spec = cipher_mode
    if ivgen_alg:
        mode_spec += "-" + ivgen_alg + (":" + ivgen_hash_alg if ivgen_hash_alg else "")
    area = -(-key_bytes * LUKS_STRIPES // LUKS_ALIGN_BYTES) * LUKS_ALIGN_BYTES // SECTOR_SIZE
    slots = [KeySlot(False, 0, bytes(LUKS_SALTSIZE), LUKS_KEY_MATERIAL_START_SECTORS + i * area, LUKS_STRIPES)
             for i in range(LUKS_NUMKEYS)]
    payload = LUKS_KEY_MATERIAL_START_SECTORS + LUKS_NUMKEYS * area
    mk = os.urandom(key_bytes)
    hdr = LuksHeader("aes", mode_spec, hash_alg, payload, key_bytes, b"", os.urandom(LUKS_SALTSIZE), 0,
                     str(uuidlib.uuid4()), slots, cipher_alg=cipher_alg, cipher_mode=cipher_mode,
                     ivgen_alg=ivgen_alg, ivgen_hash_alg=ivgen_hash_alg)
    return hdr, mk


def finish_master_key(hdr: LuksHeader, mk: bytes, iter_time_ms: int) -> None:
    """Set the master key digest (iterations: an eighth of the slot's time, at least the minimum)."""
    iters = pbkdf2_iterations(hdr.hash_spec, iter_time_ms, LUKS_DIGESTSIZE) // 8
    hdr.mk_digest_iter = max(LUKS_MKDIGEST_ITERATIONS_MIN, iters)
    hdr.mk_digest = _pbkdf2(hdr.hash_spec, mk, hdr.mk_digest_salt, hdr.mk_digest_iter, LUKS_DIGESTSIZE)


class RegionStore:
    """A window ``[base, base + length)`` of another store: a LUKS header kept inside a container (qcow2)."""

    def __init__(self, store, base: int, length: int):
        self.store, self.base, self.length = store, base, length

    def size(self) -> int:
        return self.length

    def pread_full(self, offset: int, n: int) -> bytes:
        n_in = max(0, min(n, self.length - offset))
        data = self.store.pread_full(self.base + offset, n_in) if n_in else b""
        return data + bytes(n - len(data))

    pread = pread_full

    def pwrite(self, offset: int, data) -> None:
        if offset + len(data) > self.length:
            raise QimgError(f"LUKS write at {offset}+{len(data)} is beyond its region of {self.length} bytes")
        self.store.pwrite(self.base + offset, data)


def open_volume(store, password: bytes, size: int | None = None) -> tuple[LuksHeader, SectorCipher]:
    """Parse and unlock the LUKS1 header at the start of ``store``: (header, payload cipher)."""
    hdr = parse_header(store.pread_full(0, LUKS_HEADER_SIZE), store.size() if size is None else size)
    mk, _slot = unlock(store, hdr, password)
    return hdr, hdr.cipher(mk)


def format_volume(store, password: bytes, cipher_alg: str = "aes-256", cipher_mode: str = "xts",
                  ivgen_alg: str | None = "plain64", ivgen_hash_alg: str | None = None, hash_alg: str = "sha256",
                  iter_time_ms: int = 2000) -> tuple[LuksHeader, SectorCipher]:
    """Write a new LUKS1 header with key slot 0 for ``password`` into ``store`` (its length:
    ``header.payload_offset`` bytes); returns (header, payload cipher)."""
    hdr, mk = new_header(cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg, hash_alg)
    finish_master_key(hdr, mk, iter_time_ms)
    write_slot(store, hdr, 0, mk, password, iter_time_ms)
    store.pwrite(0, hdr.pack())
    return hdr, hdr.cipher(mk)


def header_size(cipher_alg: str, cipher_mode: str) -> int:
    """Bytes a new header with its 8 key slots occupies (where the payload starts)."""
    return header_size_for_key(CIPHER_ALGS[cipher_alg] * (2 if cipher_mode == "xts" else 1))


def header_size_for_key(key_bytes: int) -> int:
    """Bytes a new header with 8 key slots for a ``key_bytes`` master key occupies."""
    area = -(-key_bytes * LUKS_STRIPES // LUKS_ALIGN_BYTES) * LUKS_ALIGN_BYTES
    return LUKS_KEY_MATERIAL_START_SECTORS * SECTOR_SIZE + LUKS_NUMKEYS * area
