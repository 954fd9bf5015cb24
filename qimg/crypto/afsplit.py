"""The LUKS anti-forensic splitter (LUKS1 spec, section "AF-Splitter").

split(D, n): s_0..s_{n-2} random; d_0 = 0; d_k = H(d_{k-1} XOR s_{k-1}); s_{n-1} = d_{n-1} XOR D.
H is the diffusion: the block is cut into digest-sized pieces, piece i becomes hash(be32(i) || piece), the
last piece truncated.  Work is per stripe (at most a few thousand), never per byte.
"""

from __future__ import annotations

import hashlib
import os
import struct


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _diffuse(block: bytes, hash_name: str) -> bytes:
    digest = hashlib.new(hash_name).digest_size
    out = []
    for i, pos in enumerate(range(0, len(block), digest)):
        piece = block[pos:pos + digest]
        out.append(hashlib.new(hash_name, struct.pack(">I", i) + piece).digest()[:len(piece)])
    return b"".join(out)


def af_merge(material: bytes, block_size: int, stripes: int, hash_name: str) -> bytes:
    """Recover the key (``block_size`` bytes) from ``stripes`` split blocks."""
    d = bytes(block_size)
    for k in range(stripes - 1):
        d = _diffuse(_xor(d, material[k * block_size:(k + 1) * block_size]), hash_name)
    return _xor(d, material[(stripes - 1) * block_size:stripes * block_size])


def af_split(key: bytes, stripes: int, hash_name: str) -> bytes:
    """Split ``key`` into ``stripes`` blocks (random but the last)."""
    n = len(key)
    rand = os.urandom(n * (stripes - 1))
    d = bytes(n)
    for k in range(stripes - 1):
        d = _diffuse(_xor(d, rand[k * n:(k + 1) * n]), hash_name)
    return rand + _xor(d, key)
