"""qemu-img measure for qcow2 output: the size a new image needs.

References: QEMU docs/interop/qcow2.txt (metadata layout); qemu-img 7.2's observed
``measure -O qcow2`` results: fully-allocated = header + L2 tables + L1 table + refcount
metadata (a fixed point: refcount blocks count themselves) + data; required = that minus
the data clusters the source does not allocate; "bitmaps" = room for the source's
persistent bitmaps when both sides can hold them.
"""

from __future__ import annotations

from ...errors import QimgError
from ...options import parse_bool, parse_opt_size
from ...units import round_up
from .create import COMPAT_VERSIONS

L1E_SIZE = 8
MAX_L1_SIZE = 32 << 20
LUKS_HEADER_SECTOR = 4096
LUKS_STRIPES = 4000
LUKS_KEY_SLOTS = 8


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount table + blocks needed to count ``clusters`` clusters and themselves."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    n = -1
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def prealloc_size(total: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """Size of a fully allocated image of ``total`` guest bytes (metadata plus data)."""
    aligned = round_up(total, cluster_size)
    l2e = 16 if extended_l2 else 8
    meta = cluster_size  # header
    nl2e = round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = round_up(nl2e * l2e // cluster_size, cluster_size // L1E_SIZE)
    meta += nl1e * L1E_SIZE
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def _luks_payload(options: dict, cluster_size: int) -> int:
    alg = options.get("encrypt.cipher-alg", "aes-256")
    mode = options.get("encrypt.cipher-mode", "xts")
    key = {"aes-128": 16, "aes-192": 24, "aes-256": 32, "cast5-128": 16, "serpent-128": 16, "serpent-192": 24,
           "serpent-256": 32, "twofish-128": 16, "twofish-192": 24, "twofish-256": 32, "sm4": 16}.get(alg, 32)
    if mode == "xts":
        key *= 2
    slot = round_up(key * LUKS_STRIPES, LUKS_HEADER_SECTOR)
    return round_up(LUKS_HEADER_SECTOR + LUKS_KEY_SLOTS * slot, cluster_size)


def _source_layer(src):
    """The top driver of a measured source (an engine ``ChainSource``)."""
    return src.chain.top


def bitmaps_size(layer, cluster_size: int) -> int:
    """Room for the persistent bitmaps of a qcow2 source in an image of ``cluster_size``."""
    info = layer.info_specific()
    bitmaps = (info or {}).get("data", {}).get("bitmaps") or []
    total = 0
    size = layer.virtual_size
    for bm in bitmaps:
        bits = -(-size // bm["granularity"])
        nbytes = -(-bits // 8)
        clusters = -(-nbytes // cluster_size)
        total += round_up(clusters * 8, cluster_size) + clusters * cluster_size
    if bitmaps:
        directory = 0
        for bm in bitmaps:
            directory += round_up(24 + len(bm["name"].encode()), 8)
        total += round_up(directory, cluster_size)
    return total


def measure(options: dict, size: int, src=None) -> dict:
    """{"required", "fully-allocated"[, "bitmaps"]} for a qcow2 image of these options."""
    o = dict(options or {})
    extended = parse_bool("extended_l2", o["extended_l2"]) if "extended_l2" in o else False
    cs = parse_opt_size("cluster_size", o["cluster_size"]) if "cluster_size" in o else 65536
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise QimgError("Cluster size must be a power of two between 512 and 2048k")
    if extended and cs < 16384:
        raise QimgError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    compat = o.get("compat")
    version = 3
    if compat is not None:
        if compat not in COMPAT_VERSIONS:
            raise QimgError(f"Invalid compatibility level: '{compat}'")
        version = COMPAT_VERSIONS[compat]
    rb = 16
    if "refcount_bits" in o:
        try:
            rb = int(o["refcount_bits"], 0)
        except ValueError:
            raise QimgError("Parameter 'refcount_bits' expects a number") from None
        if rb < 1 or rb > 64 or rb & (rb - 1):
            raise QimgError("Refcount width must be a power of two and may not exceed 64 bits")
        if version < 3 and rb != 16:
            raise QimgError("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                            "(use compat=1.1 or greater)")
    prealloc = o.get("preallocation", "off")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise QimgError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    has_backing = bool(o.get("backing_file"))
    luks = _luks_payload(o, cs) if o.get("encrypt.format") == "luks" else 0
    refcount_order = rb.bit_length() - 1

    vsize = round_up(size or 0, cs)
    l2e = 16 if extended else 8
    l2_tables = -(-(vsize // cs) // (cs // l2e))
    if l2_tables * L1E_SIZE > MAX_L1_SIZE:
        raise QimgError("The image size is too large (try using a larger cluster size)")
    required = 0
    if src is not None:
        ssize = src.virtual_size
        vsize = round_up(ssize, cs)
        if has_backing:
            required = vsize
        else:
            required = _data_bytes(src, ssize, cs)
    if prealloc in ("full", "falloc"):
        required = vsize
    full = luks + prealloc_size(vsize, cs, refcount_order, extended)
    out = {"required": full - vsize + required, "fully-allocated": full}
    if src is not None and version >= 3:
        layer = _source_layer(src)
        if layer.format_name == "qcow2" and layer.h.version >= 3:
            out["bitmaps"] = bitmaps_size(layer, cs)
    return out


def _data_bytes(src, ssize: int, cs: int) -> int:
    """Bytes of target clusters holding the source's allocated data (counted as qemu-img does)."""
    total = 0
    pos = 0
    cur = None  # merge adjacent extents of one kind first (block status runs)

    def emit(start, end, kind):
        nonlocal total, pos
        if end <= pos:
            return
        start = max(start, pos)
        if kind == "data":
            stop = round_up(end, cs)
            total += start % cs + (stop - start)
            pos = stop
        else:
            pos = end

    for ext in src.extents(0, ssize):
        if ext.zero:
            kind = "zero"
        elif ext.data and ext.present:
            kind = "data"
        else:
            kind = "other"
        if cur is not None and cur[2] == kind and cur[1] == ext.start:
            cur[1] = ext.end
            continue
        if cur is not None:
            emit(*cur)
        cur = [ext.start, ext.end, kind]
    if cur is not None:
        emit(*cur)
    return total
