"""qcow2 compressed clusters: descriptor decoding, zlib (raw deflate) and zstd codecs.

References: QEMU docs/interop/qcow2.txt, "Compressed Clusters Descriptor" (the host offset
in bits 0..x-1, x = 62 - (cluster_bits - 8), then the count of additional 512-byte
sectors), and "compression type" in the header.  zlib clusters are raw deflate streams
(window bits 12 when written); zstd clusters are single zstd frames.
"""

from __future__ import annotations

import threading

from ...errors import CorruptImage
from .header import COMPRESSION_TYPE_ZSTD

ZLIB_LEVEL = 6
ZLIB_WBITS = -12
ZSTD_LEVEL = 3

#: compared against with ``bytes.startswith``: a copy-free memcmp (calloc'd, costs no memory until read)
_ZEROS = bytes(2 << 20)


def descriptor_layout(cluster_bits: int) -> tuple[int, int]:
    """(csize_shift, offset_mask) of a compressed L2 entry for this cluster size."""
    shift = 62 - (cluster_bits - 8)
    return shift, (1 << shift) - 1


def decode_descriptor(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, bytes to read) of a compressed cluster descriptor."""
    shift, mask = descriptor_layout(cluster_bits)
    offset = entry & mask
    nb_sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    length = nb_sectors * 512 - (offset & 511)
    return offset, length


def encode_descriptor(offset: int, length: int, cluster_bits: int) -> int:
    """The L2 entry bits (without the compressed flag) for ``length`` bytes at ``offset``."""
    shift, _mask = descriptor_layout(cluster_bits)
    nb_sectors = (offset + length - 1) // 512 - offset // 512
    return offset | (nb_sectors << shift)


def decompress(data: bytes, cluster_size: int, compression_type: int, exact: bool = False) -> bytes:
    """Inflate one cluster; exactly ``cluster_size`` bytes or CorruptImage.  Output is bounded by the
    cluster size (a bomb stops there); with ``exact`` (untrusted mode) a stream that would inflate to
    more is refused too."""
    try:
        if compression_type == COMPRESSION_TYPE_ZSTD:
            import zstandard

            # bounded output, and only the first frame: the sectors of a compressed cluster may also hold the
            # start of the next cluster's frame (a read stops where a frame ends)
            with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False) as r:
                out = b""
                while len(out) <= cluster_size:
                    want = cluster_size + 1 - len(out)
                    piece = r.read(want)
                    out += piece
                    if len(piece) < want:
                        break
        else:
            import zlib

            d = zlib.decompressobj(-15)
            out = d.decompress(data, cluster_size + 1)
    except Exception as e:  # noqa: BLE001  (zlib.error, zstandard.ZstdError: hostile data)
        raise CorruptImage(f"Could not decompress a compressed cluster: {e}") from None
    if len(out) < cluster_size:
        raise CorruptImage("Could not decompress a compressed cluster: the data is truncated")
    if exact and len(out) > cluster_size:
        raise CorruptImage(f"Compressed cluster inflates to more than the cluster size ({cluster_size} bytes)")
    return out[:cluster_size]


#: per-thread zstd contexts: building one costs about as much (~12 us) as compressing an incompressible
#: 64 KiB cluster.  (A deflate state is cheap to build, ~1 us, and ``copy()`` of a template costs more.)
_local = threading.local()


def _zstd_compress():
    """The calling thread's ``ZstdCompressor.compress`` (each ``compress`` call is a complete,
    independent frame; a compressor object must not be shared between threads)."""
    fn = getattr(_local, "zstd", None)
    if fn is None:
        import zstandard

        fn = _local.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=False,
                                                    write_checksum=False).compress
    return fn


def is_zero(view) -> bool:
    """True when every byte of a cluster (a byte-format memoryview or bytes) is zero; random data
    is told from the first or last byte."""
    n = len(view)
    if n == 0:
        return True
    if view[0] or view[n - 1]:
        return False
    return _ZEROS.startswith(view) if n <= len(_ZEROS) else view == bytes(n)


def compress(data, cluster_size: int, compression_type: int) -> bytes | None:
    """Deflate one cluster; None when the result would not be smaller than the cluster (qemu-img's
    rule: the compressed form is kept only when it is smaller, otherwise the cluster is written
    as it is)."""
    if compression_type == COMPRESSION_TYPE_ZSTD:
        out = _zstd_compress()(data)
    else:
        import zlib

        out = zlib.compress(data, ZLIB_LEVEL, ZLIB_WBITS)
    if len(out) >= cluster_size:
        return None
    return out
