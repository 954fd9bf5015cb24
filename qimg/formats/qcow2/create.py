"""Creating qcow2 images: options as qemu-img 7.2 takes them, the "Formatting" line, the layout.

References: QEMU docs/interop/qcow2.txt; qemu-img 7.2's ``create -f qcow2 -o help`` and its
observed messages and layout (header, refcount table, one refcount block, then the L1
table; preallocation allocates each L2 table followed by its data clusters).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...errors import QimgError
from ...options import BACKING_FILE_OPT, BACKING_FMT_OPT, SIZE_OPT, OptSpec, parse_bool, parse_opt_size
from .header import (
    COMPRESSION_TYPE_ZLIB,
    COMPRESSION_TYPE_ZSTD,
    MAX_BACKING_NAME,
    MAX_L1_SIZE_BYTES,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_EXTL2,
    QCOW_CRYPT_AES,
    QCOW_CRYPT_LUKS,
    Header,
)

CREATE_OPTS = (
    SIZE_OPT,
    OptSpec("compat", "string", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    BACKING_FILE_OPT,
    BACKING_FMT_OPT,
    OptSpec("data_file", "string", "File name of an external data file"),
    OptSpec("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    OptSpec("encryption", "bool", "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    OptSpec("encrypt.format", "string", "Encrypt the image, format choices: 'aes', 'luks'"),
    OptSpec("encrypt.key-secret", "string", "ID of secret providing qcow AES key or LUKS passphrase"),
    OptSpec("encrypt.cipher-alg", "string", "Name of encryption cipher algorithm"),
    OptSpec("encrypt.cipher-mode", "string", "Name of encryption cipher mode"),
    OptSpec("encrypt.ivgen-alg", "string", "Name of IV generator algorithm"),
    OptSpec("encrypt.ivgen-hash-alg", "string", "Name of IV generator hash algorithm"),
    OptSpec("encrypt.hash-alg", "string", "Name of encryption hash algorithm"),
    OptSpec("encrypt.iter-time", "number", "Time to spend in PBKDF in milliseconds"),
    OptSpec("cluster_size", "size", "qcow2 cluster size"),
    OptSpec("preallocation", "string", "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    OptSpec("lazy_refcounts", "bool", "Postpone refcount updates"),
    OptSpec("refcount_bits", "number", "Width of a reference count entry in bits"),
    OptSpec("compression_type", "string", "Compression method used for image cluster compression"),
    OptSpec("extended_l2", "bool", "Extended L2 tables"),
)

_ENCRYPT_KEYS = ("encryption", "encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode",
                 "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "encrypt.iter-time")
#: the compat option's spellings and the header versions they stand for
COMPAT_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}

_V3_MSG = "only supported with compatibility level 1.1 and above (use version=v3 or greater)"
PREALLOC_MODES = ("off", "metadata", "falloc", "full")
DEFAULT_CLUSTER_SIZE = 65536


@dataclass
class Qcow2CreateSpec:
    """Validated creation parameters."""

    size: int
    version: int = 3
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    refcount_bits: int = 16
    lazy_refcounts: bool = False
    extended_l2: bool = False
    compression_type: int = COMPRESSION_TYPE_ZLIB
    preallocation: str = "off"
    backing_file: str | None = None
    backing_fmt: str | None = None
    data_file: str | None = None
    data_file_raw: bool = False
    encrypt: tuple | None = None  # (key secret id, (alg, mode, ivgen, ivgen hash, hash, iter-time ms))


def _number(name: str, value: str) -> int:
    try:
        return int(str(value), 0)
    except ValueError:
        raise QimgError(f"Parameter '{name}' expects a number") from None


def parse_spec(size: int, options: dict, backing_file=None, backing_fmt=None, check_encryption=True
               ) -> Qcow2CreateSpec:
    """Turn -o options into a spec, with qemu-img's messages for bad values and combinations."""
    o = options
    spec = Qcow2CreateSpec(size=size or 0, backing_file=backing_file, backing_fmt=backing_fmt)
    if "cluster_size" in o:
        spec.cluster_size = parse_opt_size("cluster_size", o["cluster_size"])
    if "lazy_refcounts" in o:
        spec.lazy_refcounts = parse_bool("lazy_refcounts", o["lazy_refcounts"])
    if "extended_l2" in o:
        spec.extended_l2 = parse_bool("extended_l2", o["extended_l2"])
    if "data_file_raw" in o:
        spec.data_file_raw = parse_bool("data_file_raw", o["data_file_raw"])
    if "refcount_bits" in o:
        spec.refcount_bits = _number("refcount_bits", o["refcount_bits"])
    if "encryption" in o:
        parse_bool("encryption", o["encryption"])
    if "encrypt.iter-time" in o:
        _number("encrypt.iter-time", o["encrypt.iter-time"])
    compat = o.get("compat")
    if compat is not None:
        if compat not in COMPAT_VERSIONS:
            raise QimgError(f"Parameter 'version' does not accept value '{compat}'")
        spec.version = COMPAT_VERSIONS[compat]
    prealloc = o.get("preallocation", "off")
    if prealloc not in PREALLOC_MODES:
        raise QimgError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    spec.preallocation = prealloc
    ctype = o.get("compression_type")
    if ctype is not None:
        if ctype == "zlib":
            spec.compression_type = COMPRESSION_TYPE_ZLIB
        elif ctype == "zstd":
            spec.compression_type = COMPRESSION_TYPE_ZSTD
        else:
            raise QimgError(f"Parameter 'compression-type' does not accept value '{ctype}'")
    spec.data_file = o.get("data_file") or None
    cs = spec.cluster_size
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise QimgError("Cluster size must be a power of two between 512 and 2048k")
    rb = spec.refcount_bits
    if rb < 1 or rb > 64 or rb & (rb - 1):
        raise QimgError("Refcount width must be a power of two and may not exceed 64 bits")
    if spec.version < 3:
        if rb != 16:
            raise QimgError("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                            "(use version=v3 or greater)")
        if spec.lazy_refcounts:
            raise QimgError("Lazy refcounts " + _V3_MSG)
        if spec.extended_l2:
            raise QimgError("Extended L2 entries are " + _V3_MSG)
        if spec.data_file:
            raise QimgError("External data files are " + _V3_MSG)
        if spec.compression_type != COMPRESSION_TYPE_ZLIB:
            raise QimgError("Non-zlib compression type is " + _V3_MSG)
    if spec.extended_l2 and cs < 16384:
        raise QimgError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    if spec.data_file_raw and not spec.data_file:
        raise QimgError("data-file-raw requires data-file")
    if spec.data_file_raw and backing_file:
        raise QimgError("Backing file and data-file-raw cannot be used at the same time")
    if backing_file and len(backing_file.encode()) > MAX_BACKING_NAME:
        raise QimgError(f"Could not assign backing file '{backing_file}' with format '{backing_fmt or ''}': "
                        "Invalid argument")
    if check_encryption:
        enc_format = o.get("encrypt.format")
        if "encryption" in o and parse_bool("encryption", o["encryption"]):
            if enc_format is not None:
                raise QimgError("'encrypt.format' and its alias 'encryption' can't be used at the same time")
            enc_format = "aes"
        if enc_format == "aes":
            # legacy AES (crypt_method 1): qemu-img 7.2 still creates it; it takes only the key secret
            for k in _ENCRYPT_KEYS[3:]:
                if k in o:
                    raise QimgError(f"Parameter '{k}' is unexpected")
            if "encrypt.key-secret" not in o:
                raise QimgError("Parameter 'encrypt.key-secret' is required for cipher")
            from ...crypto.cipher import legacy_aes_key
            from ...objects import get_secret

            # "No secret with id ...", then the passphrase's own check, as qemu-img
            legacy_aes_key(get_secret(o["encrypt.key-secret"]), o["encrypt.key-secret"])
            spec.encrypt = (o["encrypt.key-secret"], None)
        elif enc_format is not None:
            if "encrypt.key-secret" not in o:
                raise QimgError("Parameter 'encrypt.key-secret' is required for cipher")
            from ...objects import get_secret

            get_secret(o["encrypt.key-secret"])  # "No secret with id ..." as qemu-img
            if enc_format != "luks":
                raise QimgError(f"Parameter 'encrypt.format' does not accept value '{enc_format}'")
            from ..luks import LuksDriver

            luks_opts = {k[len("encrypt."):]: v for k, v in o.items()
                         if k.startswith("encrypt.") and k not in ("encrypt.format", "encrypt.key-secret")}
            spec.encrypt = (o["encrypt.key-secret"], LuksDriver._create_params(luks_opts))
    return spec


def format_line_options(opts) -> list[tuple[str, str]]:
    """The key=value pairs of "Formatting ..." in qemu-img 7.2's order.

    Typed values (sizes, booleans, numbers) are parsed first: qemu-img refuses a malformed one
    before it prints the line.
    """
    o = opts.options
    for spec in CREATE_OPTS:
        if spec.name in o and spec.name != "size":
            if spec.kind == "size":
                parse_opt_size(spec.name, o[spec.name])
            elif spec.kind == "bool":
                parse_bool(spec.name, o[spec.name])
            elif spec.kind == "number":
                _number(spec.name, o[spec.name])
    out = []
    for k in _ENCRYPT_KEYS:
        if k in o:
            out.append((k, str(o[k])))
    cs = o.get("cluster_size")
    if cs is None:
        cs_s = str(DEFAULT_CLUSTER_SIZE)
    else:
        cs_s = str(parse_opt_size("cluster_size", cs))
    out.append(("cluster_size", cs_s))
    out.append(("extended_l2", str(o.get("extended_l2", "off"))))
    if "preallocation" in o:
        out.append(("preallocation", str(o["preallocation"])))
    out.append(("compression_type", str(o.get("compression_type", "zlib"))))
    out.append(("size", str(opts.size or 0)))
    if "compat" in o:
        out.append(("compat", str(o["compat"])))
    if opts.backing_file:
        out.append(("backing_file", opts.backing_file))
    if opts.backing_fmt:
        out.append(("backing_fmt", opts.backing_fmt))
    if "data_file" in o:
        out.append(("data_file", str(o["data_file"])))
    if "data_file_raw" in o:
        out.append(("data_file_raw", str(o["data_file_raw"])))
    out.append(("lazy_refcounts", str(o.get("lazy_refcounts", "off"))))
    rb = o.get("refcount_bits")
    out.append(("refcount_bits", "16" if rb is None else str(rb)))
    return out


def _format_luks(store, offset: int, length: int, encrypt: tuple, alloc_len: int) -> None:
    """A LUKS1 header with key slot 0 for the secret, inside the image at ``offset``."""
    from ...crypto import luks1
    from ...objects import get_secret

    secret, (alg, mode, ivgen, ivhash, hash_alg, iter_time) = encrypt
    region = luks1.RegionStore(store, offset, length)
    # qemu-img writes the whole header region (unused key slots as zeros): the same allocated size
    zero = bytes(min(alloc_len, 1 << 20))
    for pos in range(0, alloc_len, len(zero)):
        store.pwrite(offset + pos, zero[:alloc_len - pos])
    hdr, mk = luks1.new_header(alg, mode, ivgen, ivhash, hash_alg)
    luks1.finish_master_key(hdr, mk, iter_time)
    luks1.write_slot(region, hdr, 0, mk, get_secret(secret), iter_time)
    region.pwrite(0, hdr.pack())


def _qemu_layout(cs: int, per_block: int, l1_clusters: int, extra: int = 0):
    """qemu-img's layout: header, table, block 0, L1, then the blocks the L1 needed, in the order it asks.

    A new refcount block goes to the first free cluster; when that cluster belongs to another missing
    block's range, that block is placed next (describing itself).  None if one table cluster is too few.
    """
    blocks = {0: 2}
    nxt = 3 + l1_clusters

    def ensure(idx):
        nonlocal nxt
        while idx not in blocks:
            at = nxt
            nxt += 1
            blocks[idx] = at
            idx = at // per_block

    for c in range(3, 3 + l1_clusters, 1):
        if c % per_block == 0 or c == 3:
            ensure(c // per_block)
    extra_at = nxt
    nxt += extra
    for c in range(extra_at, extra_at + extra):
        if c % per_block == 0 or c == extra_at:
            ensure(c // per_block)
    if max(blocks) >= cs // 8:
        return None
    return 1, blocks, 3, nxt, extra_at


def _packed_layout(cs: int, per_block: int, l1_clusters: int, extra: int = 0):
    """Header, a refcount table and blocks big enough for everything, then the L1 table."""
    t_clusters, b_count = 1, 1
    while True:
        total = 1 + t_clusters + b_count + l1_clusters + extra
        need_b = -(-total // per_block)
        need_t = -(-need_b * 8 // cs)
        if need_b <= b_count and need_t <= t_clusters:
            break
        b_count, t_clusters = max(b_count, need_b), max(t_clusters, need_t)
    blocks = {i: 1 + t_clusters + i for i in range(b_count)}
    return t_clusters, blocks, 1 + t_clusters + b_count, total, total - extra


def create(cls, filename: str, opts, opener) -> None:
    """Write a new empty qcow2 image (and its external data file) as qemu-img does."""
    spec = parse_spec(opts.size or 0, dict(opts.options), opts.backing_file, opts.backing_fmt)
    write_new_image(cls, filename, spec, opener)


def write_new_image(cls, filename: str, spec: Qcow2CreateSpec, opener) -> None:
    """Header, refcount table and one block; then the L1 table and any preallocation."""
    cs = spec.cluster_size
    cluster_bits = cs.bit_length() - 1
    refcount_order = spec.refcount_bits.bit_length() - 1
    h = Header(version=spec.version, cluster_bits=cluster_bits, size=spec.size, refcount_order=refcount_order,
               refcount_table_offset=cs, refcount_table_clusters=1, compression_type=spec.compression_type)
    if spec.version >= 3:
        if spec.lazy_refcounts:
            h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS
        if spec.extended_l2:
            h.incompatible_features |= QCOW2_INCOMPAT_EXTL2
        if spec.compression_type != COMPRESSION_TYPE_ZLIB:
            h.incompatible_features |= QCOW2_INCOMPAT_COMPRESSION
        if spec.data_file:
            h.incompatible_features |= QCOW2_INCOMPAT_DATA_FILE
            h.data_file = spec.data_file
            if spec.data_file_raw:
                h.autoclear_features |= QCOW2_AUTOCLEAR_DATA_FILE_RAW
    if spec.backing_file:
        h.backing_file = spec.backing_file
        h.backing_format = spec.backing_fmt
    if spec.data_file:
        # qemu-img creates (and later opens) a relative data file name from the current directory
        with opener.open_file(spec.data_file, writable=True, create=True, resolved=spec.data_file) as ds:
            ds.truncate(spec.size)
    # layout: header, refcount table, refcount blocks, L1 table (sized so the blocks cover all of it)
    l2_entries = cs // (16 if spec.extended_l2 else 8)
    l1_size = -(-spec.size // (cs * l2_entries))
    if l1_size * 8 > MAX_L1_SIZE_BYTES:
        raise QimgError("The image size is too large for file format 'qcow2' (try using a larger cluster size)")
    l1_clusters = -(-l1_size * 8 // cs)
    per_block = cs * 8 // spec.refcount_bits
    crypto_len = crypto_clusters = 0
    if spec.encrypt and spec.encrypt[1] is not None:
        from ...crypto import luks1

        alg, mode = spec.encrypt[1][0], spec.encrypt[1][1]
        crypto_len = luks1.header_size(alg, mode)
        crypto_clusters = -(-crypto_len // cs)
    layout = _qemu_layout(cs, per_block, l1_clusters, crypto_clusters)
    if layout is None:
        layout = _packed_layout(cs, per_block, l1_clusters, crypto_clusters)
    t_clusters, blocks, l1_at, total, crypto_at = layout
    if spec.encrypt and spec.encrypt[1] is None:
        h.crypt_method = QCOW_CRYPT_AES
    elif spec.encrypt:
        h.crypt_method = QCOW_CRYPT_LUKS
        h.crypto_header = (crypto_at * cs, crypto_len)
    h.refcount_table_clusters = t_clusters
    h.l1_size = l1_size
    h.l1_table_offset = l1_at * cs if l1_size else 0
    with opener.open_file(filename, writable=True, create=True) as store:
        head = h.pack()
        store.pwrite(0, head + bytes(cs - len(head)))
        table = bytearray(t_clusters * cs)
        for idx, at in blocks.items():
            struct.pack_into(">Q", table, idx * 8, at * cs)
        store.pwrite(cs, bytes(table))
        if l1_size:
            store.pwrite(h.l1_table_offset, bytes(l1_size * 8))
        for idx, at in sorted(blocks.items(), key=lambda kv: kv[1]):
            ones = min(max(total - idx * per_block, 0), per_block)  # clusters 0..total-1 have refcount 1
            store.pwrite(at * cs, _refcount_block_of_ones(ones, per_block, spec.refcount_bits))
        if store.size() < total * cs and (not l1_size or l1_at + l1_clusters < total):
            store.truncate(total * cs)
        if spec.encrypt and spec.encrypt[1] is not None:
            _format_luks(store, crypto_at * cs, crypto_len, spec.encrypt, crypto_clusters * cs)
    prealloc = spec.preallocation
    if prealloc == "off" and spec.data_file_raw:
        prealloc = "mapping"  # data-file-raw: every cluster maps to the same offset of the data file
    if prealloc == "off" or not spec.size:
        return
    # the key travels with the open (preallocating an encrypted image writes encrypted zeros)
    keys = {"encrypt.key-secret": spec.encrypt[0]} if spec.encrypt else {}
    drv = cls.open(opener.open_file(filename, writable=True), filename, writable=True, opener=opener,
                   options=keys)
    try:
        drv._preallocate(prealloc)
        drv._flush_metadata(sync=False)
    finally:
        drv.close()


def _refcount_block_of_ones(ones: int, per_block: int, bits: int) -> bytes:
    """A refcount block whose first ``ones`` entries are 1 and the rest 0."""
    if bits >= 8:
        width = bits // 8
        one = (1).to_bytes(width, "big")
        return one * ones + bytes(width * (per_block - ones))
    import numpy as np

    from .refcount import encode_block

    refs = np.zeros(per_block, dtype=np.uint64)
    refs[:ones] = 1
    return encode_block(refs, bits)
