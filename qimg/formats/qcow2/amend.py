"""qcow2 amend: compat 0.10 <-> 1.1, lazy_refcounts, refcount_bits, size, backing and data file names.

References:
  qcow2 specification (qemu docs/interop/qcow2.txt): "Header" (version 2 and 3 fields, feature bits,
  refcount_order), "Header extensions" (feature name table, backing format, external data file),
  "Cluster mapping" (the all-zeroes flag that version 2 does not have).
  Observed qemu-img 7.2 behaviour and error messages of ``qemu-img amend``.

Everything is written copy-on-write through ``lifecycle.commit``.
"""

from __future__ import annotations

from array import array
from itertools import compress, repeat
from operator import and_, not_

from ...errors import QimgError
from ...options import parse_bool
from . import lifecycle as lc
from .create import COMPAT_VERSIONS
from .header import (
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_EXT_MAGIC_CRYPTO_HEADER,
    QCOW2_EXT_MAGIC_DATA_FILE,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_EXTL2,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
    V3_HEADER_LENGTH_COMPRESSION,
    feature_table_bytes,
)
from .resize import apply_size
from .snapshot_ops import refuse_if_corrupt
from .tables import L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO

AMEND_OPTS = {
    "backing_file": "File name of a base image",
    "backing_fmt": "Image format of the base image",
    "compat": "Compatibility level (v2 [0.10] or v3 [1.1])",
    "data_file": "File name of an external data file",
    "data_file_raw": "The external data file must stay valid as a raw image",
    "encrypt.iter-time": "Time to spend in PBKDF in milliseconds",
    "encrypt.keyslot": "Select a single keyslot to modify explicitly",
    "encrypt.new-secret": "New secret to set in the matching keyslots. Empty string to erase",
    "encrypt.old-secret": "Select all keyslots that match this password",
    "encrypt.state": "Select new state of affected keyslots (active/inactive)",
    "lazy_refcounts": "Postpone refcount updates",
    "refcount_bits": "Width of a reference count entry in bits",
    "size": "Virtual disk size",
}
AMEND_KINDS = {"data_file_raw": "bool (on/off)", "lazy_refcounts": "bool (on/off)", "refcount_bits": "num",
               "size": "size", "encrypt.iter-time": "num", "encrypt.keyslot": "num"}
CREATE_ONLY = ("cluster_size", "preallocation", "encryption", "encrypt.format", "encrypt.cipher-alg",
               "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg",
               "encrypt.key-secret", "extended_l2", "compression_type", "encrypt.iter-time")


def amend_help() -> str:
    lines = ["Amend options for 'qcow2':"]
    for name, text in AMEND_OPTS.items():
        kind = AMEND_KINDS.get(name, "str")
        left = f"  {name}=<{kind}>"
        lines.append(f"{left:<24} - {text}" if len(left) < 24 else f"{left} - {text}")
    return "\n".join(lines) + "\n"


def validate(options: dict) -> None:
    for key in options:
        if key in AMEND_OPTS:
            continue
        if key in CREATE_ONLY or key.startswith("encrypt."):
            raise QimgError(f"Invalid parameter '{key}'\nThis option is only supported for image creation")
        raise QimgError(f"Invalid parameter '{key}'")


def amend(store, options: dict, force: bool = False) -> None:
    """Apply ``-o`` options (raw strings) to the qcow2 image in ``store``."""
    from ...units import parse_size

    validate(options)
    if any(k.startswith("encrypt.") for k in options):
        raise QimgError("Changing the encryption keyslots of a qcow2 image is not supported by qimg")
    meta = lc.Qcow2Meta(store)
    refs = refuse_if_corrupt(meta)
    h = meta.header
    change = lc.current_plan(meta)
    nh = change.header
    version = h.version
    if "compat" in options:
        v = options["compat"]
        if v not in COMPAT_VERSIONS:
            raise QimgError(f"Invalid compatibility level: '{v}'")
        version = COMPAT_VERSIONS[v]
    lazy = bool(h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS)
    if "lazy_refcounts" in options:
        lazy = parse_bool("lazy_refcounts", options["lazy_refcounts"])
    elif version == 2:
        lazy = False   # a downgrade turns lazy refcounts off unless they are asked for
    refcount_bits = h.refcount_bits
    if "refcount_bits" in options:
        try:
            refcount_bits = int(options["refcount_bits"])
        except ValueError:
            raise QimgError("Parameter 'refcount_bits' expects a number") from None
        if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
            raise QimgError("Refcount width must be a power of two and may not exceed 64 bits")
    if "backing_file" in options and (options["backing_file"] or None) != h.backing_file:
        raise QimgError("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
    if "backing_fmt" in options and (options["backing_fmt"] or None) != h.backing_format:
        raise QimgError("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
    if ("data_file" in options or "data_file_raw" in options) and not h.has_data_file:
        raise QimgError("data-file can only be set for images that use an external data file")
    if "data_file" in options:
        nh.replace_extension(QCOW2_EXT_MAGIC_DATA_FILE, options["data_file"].encode())
    if "data_file_raw" in options:
        if parse_bool("data_file_raw", options["data_file_raw"]):
            nh.autoclear_features |= QCOW2_AUTOCLEAR_DATA_FILE_RAW
        else:
            nh.autoclear_features &= ~QCOW2_AUTOCLEAR_DATA_FILE_RAW
    if version == 2:
        if lazy:
            raise QimgError("Lazy refcounts only supported with compatibility level 1.1 and above "
                            "(use compat=1.1 or greater)")
        if refcount_bits != 16:
            raise QimgError("Refcount widths other than 16 bits require compatibility level 1.1 or above "
                            "(use compat=1.1 or greater)")
    if "size" in options:
        size = parse_size(options["size"])
        if size is None:
            raise QimgError("Parameter 'size' expects a size")
        if size != h.size:
            if version < 3 and h.version < 3 and meta.snapshots:
                raise QimgError("Can't resize a v2 image which has snapshots")
            apply_size(meta, change, size)
    if refcount_bits != h.refcount_bits:
        mx = (1 << refcount_bits) - 1
        if len(refs) and max(refs) > mx:
            c = next(compress(range(len(refs)), map(mx.__lt__, refs)))
            raise QimgError(f"Cannot decrease refcount entry width to {refcount_bits} bits: Cluster at offset "
                            f"{c * meta.cluster_size:#x} has a refcount of {int(refs[c])}")
        nh.refcount_order = refcount_bits.bit_length() - 1
    if lazy:
        nh.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS
    else:
        nh.compatible_features &= ~QCOW2_COMPAT_LAZY_REFCOUNTS
    if version != h.version:
        if version == 2:
            _downgrade(meta, change)
        else:
            nh.version = 3
            nh.header_length = V3_HEADER_LENGTH_COMPRESSION
            nh.header_tail = bytes(V3_HEADER_LENGTH_COMPRESSION - V3_HEADER_LENGTH)
            nh.compression_type = 0
            if nh.ext(QCOW2_EXT_MAGIC_FEATURE_TABLE) is None:
                nh.extensions.append((QCOW2_EXT_MAGIC_FEATURE_TABLE, feature_table_bytes()))
    lc.commit(meta, change, old_refs=refs)


def _downgrade(meta: lc.Qcow2Meta, change: lc.Change) -> None:
    """To version 2: no feature bits, no extended L2, and every all-zeroes cluster written out."""
    h = meta.header
    # version 2 snapshot entries cannot say that their disk size differs from the image's
    if any(sn.disk_size is not None and sn.disk_size != change.header.size for sn in meta.snapshots):
        raise QimgError("Internal snapshots prevent downgrade of image")
    if h.has_data_file:
        raise QimgError("Cannot downgrade an image with a data file")
    if h.extended_l2:
        raise QimgError(f"Cannot downgrade an image with incompatible features {QCOW2_INCOMPAT_EXTL2:#x} set")
    if h.compression_type and _has_compressed(meta):
        raise QimgError(f"Cannot downgrade an image with incompatible features {QCOW2_INCOMPAT_COMPRESSION:#x} set")
    if h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS and h.bitmaps_ext:
        raise QimgError("Cannot downgrade an image with persistent bitmaps")
    nh = change.header
    nh.version = 2
    nh.header_length = V2_HEADER_LENGTH
    nh.header_tail = b""
    nh.incompatible_features = nh.compatible_features = nh.autoclear_features = 0
    nh.refcount_order = 4
    nh.extensions = [(t, d) for t, d in nh.extensions if t == QCOW2_EXT_MAGIC_CRYPTO_HEADER]
    # zero clusters: plain ones without a backing file become unallocated, the others get real zeros
    cs = meta.cluster_size
    bits = meta.cluster_bits
    refs = lc.compute_refs(meta)
    next_free = max(meta.file_clusters, len(refs)) + 16
    reserve_start = next_free
    plans = [change.active] + change.snapshot_plans
    has_backing = bool(h.backing_file)
    for pi, p in enumerate(plans):
        for i in lc.nonzero(p.entries):
            l2 = p.l2_new.get(i)
            if l2 is None:
                l2 = meta.read_l2(p.entries[i])
            # (version 2 has no extended L2: one word per entry)
            zero = list(map(and_, map(not_, map(and_, l2, repeat(QCOW_OFLAG_COMPRESSED))),
                            map(and_, l2, repeat(QCOW_OFLAG_ZERO))))
            if not any(zero):
                continue
            e = array("Q", l2)
            for j in lc.nonzero(zero):
                v = e[j]
                if (v & L2E_OFFSET_MASK) == 0 and not has_backing:
                    e[j] = 0
                else:
                    e[j] = (next_free << bits)
                    next_free += 1
            p.l2_new[i] = e
            if pi > 0:
                p.location = None
    if next_free > reserve_start:
        # fresh clusters past the end of the file read as zeros once the file covers them
        meta.store.truncate(max(meta.store.size(), next_free * cs))


def _has_compressed(meta: lc.Qcow2Meta) -> bool:
    for off in filter(None, lc.masked(meta.l1)):
        if any(map(and_, meta.l2_words(meta.read_l2(off)), repeat(QCOW_OFLAG_COMPRESSED))):
            return True
    return False
