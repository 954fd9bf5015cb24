"""VHDX creation as qemu-img 7.2 does it: options, layout, the Formatting line.

References: [MS-VHDX] 2.1-2.6 (see layout.py); qemu-img 7.2's observed behaviour for the options
(block_size 0 = auto, log_size in whole MiB, subformat dynamic|fixed, block_state_zero) and for the
layout it writes (log at 1 MiB, then the BAT, then 1 MiB of metadata, payload 4 MiB later).
"""

from __future__ import annotations

import struct
import uuid

from ...core.driver import CreateOptions
from ...errors import QimgError
from ...options import parse_bool, parse_opt_size
from ..blockmap import uint_table_bytes
from .crc32c import _with_checksum
from .layout import (
    BAT_GUID,
    DEFAULT_LOG_SIZE,
    FILE_PARAMETERS,
    FILE_PARAMETERS_GUID,
    LOGICAL_SECTOR_SIZE_GUID,
    METADATA_GUID,
    METADATA_TABLE_ENTRY,
    METADATA_TABLE_HEADER,
    PAGE83_DATA_GUID,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_ZERO,
    PHYSICAL_SECTOR_SIZE_GUID,
    REGION_TABLE_ENTRY,
    REGION_TABLE_HEADER,
    SMALL_BAT_ENTRIES,
    VHDX_HEADER1_OFFSET,
    VHDX_HEADER2_OFFSET,
    VHDX_MAX_BLOCK_SIZE,
    VHDX_MAX_IMAGE_SIZE,
    VHDX_METADATA_TABLE_MAX_SIZE,
    VHDX_MIN_BLOCK_SIZE,
    VHDX_REGION_TABLE2_OFFSET,
    VHDX_REGION_TABLE_OFFSET,
    VHDX_REGION_TABLE_SIZE,
    VIRTUAL_DISK_SIZE_GUID,
    ZERO_GUID,
    GiB,
    KiB,
    MiB,
    _default_block_size,
    _pack_header,
)


def create_params(opts: CreateOptions):
    """(size, fixed, log size, block size, block_state_zero) from create's options, checked as qemu-img does."""
    o = opts.options
    size = opts.size or 0
    if size > VHDX_MAX_IMAGE_SIZE:
        raise QimgError("Image size too large; max of 64TB")
    sub = o.get("subformat", "dynamic")
    if sub not in ("dynamic", "fixed"):
        raise QimgError(f"Parameter 'subformat' does not accept value '{sub}'")
    log_size = parse_opt_size("log_size", o["log_size"]) if "log_size" in o else DEFAULT_LOG_SIZE
    block_size = parse_opt_size("block_size", o["block_size"]) if "block_size" in o else 0
    zero = parse_bool("block_state_zero", o.get("block_state_zero", "on"))
    if log_size == 0:
        raise QimgError("Log size must be a multiple of 1 MB")
    if log_size >= 4 * GiB:
        raise QimgError("Log size must be smaller than 4 GB")
    log_size = (log_size + MiB - 1) // MiB * MiB
    if block_size == 0:
        block_size = _default_block_size(size)
    block_size = max(VHDX_MIN_BLOCK_SIZE, min(block_size, VHDX_MAX_BLOCK_SIZE))
    if block_size & (block_size - 1):
        raise QimgError("Block size must be a power of two")
    size = (size + 511) // 512 * 512
    return size, sub == "fixed", log_size, block_size, zero

def create(filename: str, opts: CreateOptions, opener) -> None:
    """Write a new VHDX: qemu-img's layout (log at 1 MiB, then the BAT and the metadata region)."""
    prealloc = opts.options.get("preallocation", "off")
    if prealloc not in ("off", "falloc", "full"):
        if prealloc == "metadata":
            raise QimgError("Unsupported preallocation mode: metadata")
        raise QimgError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    size, fixed, log_size, block_size, use_zero = create_params(opts)

    from ... import __version__

    lss = 512
    chunk_ratio = (1 << 23) * lss // block_size
    data_blocks = (size + block_size - 1) // block_size
    bat_entries = data_blocks + (data_blocks - 1) // chunk_ratio if data_blocks else 0
    # qemu sizes the BAT region of an empty disk with an unsigned wrap: (2^32 - 1) / chunk ratio entries
    region_entries = bat_entries if data_blocks else 0xFFFFFFFF // chunk_ratio
    # qemu's layout: log at 1 MiB, then the BAT, then 1 MiB of metadata; payload 4 MiB later
    log_offset = MiB
    bat_offset = log_offset + log_size
    bat_length = max(MiB, (region_entries * 8 + MiB - 1) // MiB * MiB)
    meta_offset = bat_offset + bat_length
    meta_length = MiB
    data_start = meta_offset + meta_length + 4 * MiB

    ident = bytearray(64 * KiB)
    ident[:8] = b"vhdxfile"
    # the creator field is free text (UTF-16); qemu writes its own name and version there
    creator = f"qimg v{__version__}".encode("utf-16-le")
    ident[8:8 + len(creator)] = creator

    seq0 = int.from_bytes(uuid.uuid4().bytes[:4], "little")
    fwg = uuid.uuid4().bytes_le
    dwg = uuid.uuid4().bytes_le
    h = dict(seq=seq0, file_write_guid=fwg, data_write_guid=dwg, log_guid=ZERO_GUID, log_version=0, version=1,
             log_length=log_size, log_offset=log_offset)

    region = bytearray(VHDX_REGION_TABLE_SIZE)
    REGION_TABLE_HEADER.pack_into(region, 0, signature=b"regi", checksum=0, entry_count=2)
    REGION_TABLE_ENTRY.pack_into(region, 16, guid=BAT_GUID, file_offset=bat_offset, length=bat_length, required=0)
    REGION_TABLE_ENTRY.pack_into(region, 48, guid=METADATA_GUID, file_offset=meta_offset, length=meta_length,
                                 required=0)
    _with_checksum(region)

    meta = bytearray(VHDX_METADATA_TABLE_MAX_SIZE + 4 * KiB)
    METADATA_TABLE_HEADER.pack_into(meta, 0, signature=b"metadata", entry_count=5)
    items = [
        (FILE_PARAMETERS_GUID, FILE_PARAMETERS.pack(block_size=block_size, flags=1 if fixed else 0), 4),
        (VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", size), 2 | 4),
        (PAGE83_DATA_GUID, uuid.uuid4().bytes_le, 2 | 4),
        (LOGICAL_SECTOR_SIZE_GUID, struct.pack("<I", lss), 2 | 4),
        (PHYSICAL_SECTOR_SIZE_GUID, struct.pack("<I", 512), 2 | 4),
    ]
    pos = VHDX_METADATA_TABLE_MAX_SIZE
    for i, (guid, payload, flags) in enumerate(items):
        METADATA_TABLE_ENTRY.pack_into(meta, 32 + 32 * i, item_id=guid, offset=pos, length=len(payload), flags=flags)
        meta[pos:pos + len(payload)] = payload
        pos += len(payload)

    # qemu 7.2: block_state_zero wins even for fixed images (ZERO blocks, space reserved);
    # a fixed file ends right after the guest size, not after the last whole block
    if bat_entries <= SMALL_BAT_ENTRIES:
        from array import array

        bat = array("Q", bytes(8 * bat_entries))
        for i in range(data_blocks) if use_zero or fixed else ():
            bat[i + i // chunk_ratio] = (PAYLOAD_BLOCK_ZERO if use_zero else
                                         (data_start + i * block_size) | PAYLOAD_BLOCK_FULLY_PRESENT)
    else:
        import numpy as np

        bat = np.zeros(bat_entries, dtype="<u8")
        idx = np.arange(data_blocks, dtype=np.int64)
        pidx = idx + idx // chunk_ratio
        if use_zero:
            bat[pidx] = PAYLOAD_BLOCK_ZERO
        elif fixed:
            bat[pidx] = (data_start + idx * block_size).astype(np.uint64) | np.uint64(PAYLOAD_BLOCK_FULLY_PRESENT)
    file_end = data_start + size if fixed else data_start

    with opener.open_file(filename, writable=True, create=True) as store:
        store.pwrite(0, bytes(ident))
        h1 = dict(h)
        store.pwrite(VHDX_HEADER1_OFFSET, _pack_header(h1))
        store.pwrite(VHDX_HEADER2_OFFSET, _pack_header(dict(h, seq=seq0 + 1)))
        store.pwrite(VHDX_REGION_TABLE_OFFSET, bytes(region))
        store.pwrite(VHDX_REGION_TABLE2_OFFSET, bytes(region))
        store.pwrite(meta_offset, bytes(meta[:pos]))
        store.pwrite(bat_offset, uint_table_bytes(bat, 8))
        store.truncate(max(file_end, data_start))
        if fixed and prealloc == "falloc":
            store.fallocate(data_start, file_end - data_start)
        elif fixed and prealloc == "full":
            chunk = bytes(1 << 20)
            p = data_start
            while p < file_end:
                store.pwrite(p, chunk[:min(len(chunk), file_end - p)])
                p += len(chunk)

def format_line_options(opts: CreateOptions) -> list[tuple[str, str]]:
    o = opts.options
    log_size = parse_opt_size("log_size", o["log_size"]) if "log_size" in o else DEFAULT_LOG_SIZE
    block_size = parse_opt_size("block_size", o["block_size"]) if "block_size" in o else 0
    out = [("size", str(opts.size or 0)), ("log_size", str(log_size)), ("block_size", str(block_size))]
    if "subformat" in o:
        out.append(("subformat", o["subformat"]))
    if "block_state_zero" in o:
        out.append(("block_state_zero", "on" if parse_bool("block_state_zero", o["block_state_zero"]) else "off"))
    if "preallocation" in o:
        out.append(("preallocation", o["preallocation"]))
    return out
