"""VHDX on-disk layout: offsets, limits, region and metadata GUIDs, header records, BAT tables.

References: [MS-VHDX] 2.1 (layout), 2.2.2 (header), 2.2.3 (region table), 2.3 (log records),
2.4 (BAT entry states), 2.6 (metadata table and items).
"""

from __future__ import annotations

import uuid

from ...binfmt import Record
from .crc32c import _checksum_ok, _with_checksum

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

VHDX_FILE_ID_OFFSET = 0
VHDX_HEADER1_OFFSET = 64 * KiB
VHDX_HEADER2_OFFSET = 128 * KiB
VHDX_REGION_TABLE_OFFSET = 192 * KiB
VHDX_REGION_TABLE2_OFFSET = 256 * KiB
VHDX_HEADER_SIZE = 4 * KiB
VHDX_REGION_TABLE_SIZE = 64 * KiB
VHDX_METADATA_TABLE_MAX_SIZE = 64 * KiB
VHDX_MAX_ENTRIES = 2047
VHDX_LOG_SECTOR_SIZE = 4 * KiB
VHDX_MIN_BLOCK_SIZE = 1 * MiB
VHDX_MAX_BLOCK_SIZE = 256 * MiB
VHDX_MAX_IMAGE_SIZE = 64 * TiB
DEFAULT_LOG_SIZE = 1 * MiB
#: the log region is read entry by entry; more than 4 GiB is not a valid VHDX log
VHDX_MAX_LOG_SIZE = 4 * GiB - MiB
#: one log entry is read whole into memory
VHDX_MAX_LOG_ENTRY = 256 * MiB

# payload block states (BAT entry bits 0..2)
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6
VHDX_BAT_STATE_BIT_MASK = 0x07
VHDX_BAT_FILE_OFF_MASK = 0xFFFFFFFFFFF00000


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_GUID = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA_GUID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
ZERO_GUID = bytes(16)

# the records of [MS-VHDX], field names as the specification gives them
HEADER = Record("<", ("signature", "4s"), ("checksum", "I"), ("seq", "Q"), ("file_write_guid", "16s"),
                ("data_write_guid", "16s"), ("log_guid", "16s"), ("log_version", "H"), ("version", "H"),
                ("log_length", "I"), ("log_offset", "Q"))                                   # 2.2.2
REGION_TABLE_HEADER = Record("<", ("signature", "4s"), ("checksum", "I"), ("entry_count", "I"),
                             ("_reserved", "I"))                                            # 2.2.3
REGION_TABLE_ENTRY = Record("<", ("guid", "16s"), ("file_offset", "Q"), ("length", "I"), ("required", "I"))
METADATA_TABLE_HEADER = Record("<", ("signature", "8s"), ("_reserved", "H"), ("entry_count", "H"),
                               ("_reserved2", "20s"))                                       # 2.6.1.1
METADATA_TABLE_ENTRY = Record("<", ("item_id", "16s"), ("offset", "I"), ("length", "I"), ("flags", "I"),
                              ("_reserved", "I"))                                           # 2.6.1.2
LOG_ENTRY_HEADER = Record("<", ("signature", "4s"), ("checksum", "I"), ("entry_length", "I"), ("tail", "I"),
                          ("sequence_number", "Q"), ("descriptor_count", "I"), ("_reserved", "I"),
                          ("log_guid", "16s"), ("flushed_file_offset", "Q"), ("last_file_offset", "Q"))  # 2.3.1.1
FILE_PARAMETERS = Record("<", ("block_size", "I"), ("flags", "I"))                     # 2.6.2.1
LOG_DESCRIPTOR = Record("<", ("signature", "4s"), ("trailing_bytes", "4s"), ("leading_bytes", "8s"),
                        ("file_offset", "Q"), ("sequence_number", "Q"))                     # 2.3.1.2/3


# ----- headers -----
def _parse_header(buf: bytes) -> dict | None:
    if len(buf) < VHDX_HEADER_SIZE or buf[:4] != b"head" or not _checksum_ok(buf[:VHDX_HEADER_SIZE]):
        return None
    h = HEADER.unpack(buf)
    if h["version"] != 1:
        return None
    del h["signature"], h["checksum"]
    return h


def _pack_header(h: dict) -> bytes:
    buf = bytearray(VHDX_HEADER_SIZE)
    HEADER.pack_into(buf, 0, signature=b"head", checksum=0, **h)
    return bytes(_with_checksum(buf))



def _default_block_size(size: int) -> int:
    if size > 32 * TiB:
        return 64 * MiB
    if size > 100 * GiB:
        return 32 * MiB
    if size > 1 * GiB:
        return 16 * MiB
    return 8 * MiB



#: up to this many BAT entries tables are array('Q') and the open-time validation runs without numpy
#: (keeps ``info`` fast)
SMALL_BAT_ENTRIES = 1 << 16
