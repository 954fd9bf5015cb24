"""luks: a LUKS1 encrypted volume whose payload is the guest disk.

References:
  - LUKS On-Disk Format Specification 1.2.3 (header, key slots, AF splitter, PBKDF2 key derivation).
  - IEEE Std 1619-2007 (XTS-AES); NIST SP 800-38A (CBC); dm-crypt IV generators plain/plain64/essiv.
  - Observed qemu-img 7.2 behaviour: ``-o help`` list, the "Formatting" line, info's QCryptoBlockInfoLUKS keys,
    ``info`` works without the secret (no key is needed to describe the header), every data access needs
    ``key-secret``, amend's keyslot rules and messages.
The crypto lives in ``qimg.crypto`` so qcow2's ``encrypt.format=luks`` can reuse it.
"""

from __future__ import annotations

from ..core.driver import CreateOptions, Driver
from ..core.extent import Extent
from ..crypto import luks1
from ..crypto.cipher import SECTOR_SIZE
from ..errors import OpenError, QimgError
from ..options import NO_IO, SIZE_OPT, OptSpec
from ..units import round_up

#: the enum values qemu accepts for each create option (QCryptoCipherAlgorithm, ...Mode, IVGen, Hash)
CIPHER_ALG_VALUES = ("aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128", "serpent-128", "serpent-192",
                     "serpent-256", "twofish-128", "twofish-192", "twofish-256", "sm4")
#: master key bytes of the ciphers whose name does not end in their key bits
_KEY_BYTES = {"des": 8, "3des": 24, "sm4": 16}
CIPHER_MODE_VALUES = ("ecb", "cbc", "xts", "ctr")
IVGEN_VALUES = ("plain", "plain64", "essiv")
HASH_VALUES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160", "sm3")
DEFAULT_ITER_TIME_MS = 2000
#: upper bound for iter-time (ms) so a typo cannot make create spin for hours
MAX_ITER_TIME_MS = 1 << 20
#: bytes decrypted per call on the read path
IO_CHUNK = 4 << 20

_CREATE_ORDER = ("key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg", "iter-time")


def _enum(options: dict, name: str, values, default):
    v = options.get(name)
    if v is None:
        return default
    if v not in values:
        raise QimgError(f"Parameter '{name}' does not accept value '{v}'")
    return v


def _iter_time(options: dict) -> int:
    v = options.get("iter-time")
    if v is None:
        return DEFAULT_ITER_TIME_MS
    try:
        n = int(v, 0)
    except (TypeError, ValueError):
        raise QimgError("Parameter 'iter-time' expects a number") from None
    if n < 1 or n > MAX_ITER_TIME_MS:
        raise QimgError(f"PBKDF iter-time {n} ms is out of range (1..{MAX_ITER_TIME_MS})")
    return n


def _secret(ident: str) -> bytes:
    from ..objects import get_secret

    return get_secret(ident)


class LuksDriver(Driver):
    """LUKS1: header + key slots + encrypted payload; guest offset 0 is the first payload sector."""

    format_name = "luks"
    lock_passthrough = True  # locked as the guest's bytes, like raw (qemu's luks passes permissions on)
    create_opts = (
        SIZE_OPT,
        OptSpec("key-secret", "string", "ID of the secret that provides the keyslot passphrase"),
        OptSpec("cipher-alg", "string", "Name of encryption cipher algorithm"),
        OptSpec("cipher-mode", "string", "Name of encryption cipher mode"),
        OptSpec("ivgen-alg", "string", "Name of IV generator algorithm"),
        OptSpec("ivgen-hash-alg", "string", "Name of IV generator hash algorithm"),
        OptSpec("hash-alg", "string", "Name of encryption hash algorithm"),
        OptSpec("iter-time", "number", "Time to spend in PBKDF in milliseconds"),
    )
    amend_opts = (
        OptSpec("state", "string", "Select new state of affected keyslots (active/inactive)"),
        OptSpec("keyslot", "number", "Select a single keyslot to modify explicitly"),
        OptSpec("old-secret", "string", "Select all keyslots that match this password"),
        OptSpec("new-secret", "string", "New secret to set in the matching keyslots. Empty string to erase"),
        OptSpec("iter-time", "number", "Time to spend in PBKDF in milliseconds"),
    )

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return luks1.probe(head)

    def _open(self, options: dict) -> None:
        size = self.store.size()
        self.header = luks1.parse_header(self.store.pread(0, luks1.LUKS_HEADER_SIZE), size)
        self.payload = self.header.payload_offset
        self.virtual_size = round_up(size - self.payload, SECTOR_SIZE)
        self.master_key = None
        self._cipher = None
        self._key_secret = options.get("key-secret")
        # qemu-img info opens without I/O and so without unlocking; everything else needs the key now
        if not options.get(NO_IO):
            self._unlock()

    def _unlock(self) -> None:
        if self._cipher is not None:
            return
        if self._key_secret is None:
            raise OpenError(f"Could not open '{self.filename}': Parameter 'key-secret' is required for cipher")
        self.master_key, _slot = luks1.unlock(self.store, self.header, _secret(self._key_secret))
        self._cipher = self.header.cipher(self.master_key)

    # ----- read side -----
    def block_status(self, offset: int, length: int) -> Extent:
        self._unlock()
        n = max(min(length, self.virtual_size - offset), 1)
        return Extent(offset, n, data=True, zero=False, present=True)

    def info_specific(self) -> dict:
        return {"type": "luks", "data": self.header.info()}

    def info_extra(self) -> dict:
        return {"encrypted": True}

    def _read_sectors(self, first: int, count: int) -> bytes:
        raw = self.store.pread_full(self.payload + first * SECTOR_SIZE, count * SECTOR_SIZE)
        return self._cipher.decrypt(first, raw)

    @staticmethod
    def _sector_spans(offset: int, total: int):
        """Cut a byte range into cipher batches: (pos, first sector, skip into it, bytes, sector count)."""
        pos = 0
        while pos < total:
            off = offset + pos
            first = off // SECTOR_SIZE
            skip = off - first * SECTOR_SIZE
            n = min(total - pos, IO_CHUNK - skip)
            yield pos, first, skip, n, -(-(skip + n) // SECTOR_SIZE)
            pos += n

    def readinto(self, offset: int, buf) -> None:
        self._unlock()
        view = memoryview(buf).cast("B")
        for pos, first, skip, n, count in self._sector_spans(offset, len(view)):
            plain = self._read_sectors(first, count)
            view[pos:pos + n] = plain[skip:skip + n]

    # ----- write side -----
    def pwrite(self, offset: int, data) -> None:
        self._unlock()
        mv = memoryview(data).cast("B")
        for pos, first, skip, n, count in self._sector_spans(offset, len(mv)):
            if skip or n % SECTOR_SIZE:
                # partial sectors: decrypt what is there, patch, re-encrypt
                plain = bytearray(self._read_sectors(first, count))
                plain[skip:skip + n] = mv[pos:pos + n]
            else:
                plain = mv[pos:pos + n]
            self.store.pwrite(self.payload + first * SECTOR_SIZE, self._cipher.encrypt(first, plain))

    def truncate(self, size: int, shrink: bool = False, prealloc: str = "off") -> None:
        if size < self.virtual_size and not shrink:
            raise QimgError("Use the --shrink option to perform a shrink operation.")
        self.store.truncate(self.payload + size)
        self.virtual_size = round_up(size, SECTOR_SIZE)

    # ----- create -----
    @classmethod
    def _create_params(cls, options: dict):
        alg = _enum(options, "cipher-alg", CIPHER_ALG_VALUES, "aes-256")
        mode = _enum(options, "cipher-mode", CIPHER_MODE_VALUES, "xts")
        ivgen = _enum(options, "ivgen-alg", IVGEN_VALUES, "plain64")
        ivhash = _enum(options, "ivgen-hash-alg", HASH_VALUES, None)
        hash_alg = _enum(options, "hash-alg", HASH_VALUES, "sha256")
        iter_time = _iter_time(options)
        if ivgen == "essiv" and ivhash is None:
            ivhash = "sha256"
        if ivgen != "essiv":
            ivhash = None
        if not alg.startswith("aes-"):
            raise QimgError(f"Cipher algorithm '{alg}' is not supported")
        if mode not in ("xts", "cbc"):
            raise QimgError(f"Cipher mode '{mode}' is not supported")
        from ..crypto.cipher import aes_alg_for_key, hash_digest_size

        hash_digest_size(hash_alg)
        if ivhash:
            aes_alg_for_key(hash_digest_size(ivhash))
        return alg, mode, ivgen, ivhash, hash_alg, iter_time

    @classmethod
    def create(cls, filename: str, opts: CreateOptions, opener) -> None:
        options = opts.options
        params = cls._create_params(options)
        if "key-secret" not in options:
            raise QimgError("Parameter 'key-secret' is required for cipher")
        password = _secret(options["key-secret"])
        alg, mode, ivgen, ivhash, hash_alg, iter_time = params
        hdr, mk = luks1.new_header(alg, mode, ivgen, ivhash, hash_alg)
        luks1.finish_master_key(hdr, mk, iter_time)
        with opener.open_file(filename, writable=True, create=True) as store:
            store.truncate(0)
            luks1.write_slot(store, hdr, 0, mk, password, iter_time)
            store.pwrite(0, hdr.pack())
            store.truncate(hdr.payload_offset + (opts.size or 0))

    @classmethod
    def measure(cls, options: dict, size: int, src=None) -> dict:
        """The header with its eight key slots, then the whole payload (a LUKS volume has no holes of its
        own): what the options given would create, checked as create checks them (key secret included)."""
        alg = _enum(options, "cipher-alg", CIPHER_ALG_VALUES, "aes-256")
        mode = _enum(options, "cipher-mode", CIPHER_MODE_VALUES, "xts")
        for name, values in (("ivgen-alg", IVGEN_VALUES), ("ivgen-hash-alg", HASH_VALUES), ("hash-alg", HASH_VALUES)):
            _enum(options, name, values, None)
        _iter_time(options)
        if "key-secret" not in options:
            raise QimgError("Parameter 'key-secret' is required for cipher")
        _secret(options["key-secret"])
        # measuring needs no cipher implementation: only the master key's length sizes the header
        key_bytes = _KEY_BYTES.get(alg) or int(alg.rsplit("-", 1)[1]) // 8
        total = luks1.header_size_for_key(key_bytes * (2 if mode == "xts" else 1)) + size
        return {"required": total, "fully-allocated": total}

    @classmethod
    def format_line_options(cls, opts: CreateOptions) -> list[tuple[str, str]]:
        out = [("size", str(opts.size or 0))]
        for k in _CREATE_ORDER:
            if k in opts.options:
                out.append((k, str(opts.options[k])))
        return out

    # ----- amend: key slot management -----
    @classmethod
    def amend_help(cls) -> str:
        """``qemu-img amend -f luks -o help``."""
        kinds = {"number": "<num>", "string": "<str>"}
        lines = [f"Amend options for '{cls.format_name}':"]
        for spec in sorted(cls.amend_opts, key=lambda o: o.name):
            lines.append(f"  {spec.name + '=' + kinds[spec.kind]:<22} - {spec.help}")
        return "\n".join(lines) + "\n"

    def amend(self, options: dict, force: bool = False) -> None:
        """qemu-img amend -o state=active|inactive[,keyslot=N][,old-secret=ID][,new-secret=ID][,iter-time=MS]."""
        known = {s.name for s in self.amend_opts}
        for k in options:
            if k not in known:
                raise QimgError(f"Invalid parameter '{k}'")
        state = options.get("state")
        if state is None:
            raise QimgError("Parameter 'state' is missing")
        if state not in ("active", "inactive"):
            raise QimgError(f"Parameter 'state' does not accept value '{state}'")
        keyslot = options.get("keyslot")
        if keyslot is not None:
            try:
                keyslot = int(keyslot, 0)
            except (TypeError, ValueError):
                raise QimgError("Parameter 'keyslot' expects a number") from None
            if not 0 <= keyslot < luks1.LUKS_NUMKEYS:
                raise QimgError(f"Invalid keyslot {keyslot} specified, must be between 0 and "
                                f"{luks1.LUKS_NUMKEYS - 1}")
        iter_time = _iter_time(options)
        self._unlock()
        hdr, store = self.header, self.store
        if state == "active":
            if "old-secret" in options:
                raise QimgError("'old-secret' must not be given when activating keyslots")
            if "new-secret" not in options:
                raise QimgError("'new-secret' is required to activate a keyslot")
            password = _secret(options["new-secret"])
            if keyslot is None:
                free = [i for i, s in enumerate(hdr.slots) if not s.active]
                if not free:
                    raise QimgError("Can't add a keyslot - all keyslots are in use")
                keyslot = free[0]
            elif hdr.slots[keyslot].active:
                raise QimgError(f"Refusing to overwrite active keyslot {keyslot} - please erase it first")
            luks1.write_slot(store, hdr, keyslot, self.master_key, password, iter_time)
        else:
            if "new-secret" in options:
                raise QimgError("'new-secret' must not be given when erasing keyslots")
            old = _secret(options["old-secret"]) if "old-secret" in options else None
            active = [i for i, s in enumerate(hdr.slots) if s.active]
            if keyslot is not None:
                if not hdr.slots[keyslot].active:
                    raise QimgError(f"Given keyslot {keyslot} is already erased (inactive) ")
                if old is not None and luks1.try_slot(store, hdr, keyslot, old) is None:
                    raise QimgError(f"Given keyslot {keyslot} doesn't contain the given old password "
                                    "for erase operation")
                if active == [keyslot]:
                    raise QimgError(f"Attempt to erase the only active keyslot {keyslot} which will erase all "
                                    "the data in the image irreversibly - refusing operation")
                victims = [keyslot]
            elif old is not None:
                victims = [i for i in active if luks1.try_slot(store, hdr, i, old) is not None]
                if not victims:
                    raise QimgError("No keyslots match given (old) password for erase operation")
                if len(victims) == len(active):
                    raise QimgError("All the active keyslots match the (old) password that was given and erasing "
                                    "them will erase all the data in the image irreversibly - refusing operation")
            else:
                raise QimgError("To erase keyslot(s), either explicit keyslot index or the password currently "
                                "contained in them must be given")
            for i in victims:
                luks1.erase_slot(store, hdr, i)
        store.pwrite(0, hdr.pack())
        store.flush()
