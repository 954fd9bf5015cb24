"""vhdx: Microsoft VHDX (Hyper-V virtual hard disk v2), dynamic and fixed.

References:
  - [MS-VHDX] "VHDX Format Specification" v1.00 (Microsoft, 2012) and the Open Specifications
    document [MS-VHDX]: 2.1 layout (file type identifier at 0, headers at 64 KiB and 128 KiB,
    region tables at 192 KiB and 256 KiB), 2.2.2 header (signature "head", CRC-32C checksum,
    sequence number, file/data write GUIDs, log GUID, log version, version 1, log length and
    offset), 2.2.3 region table ("regi", entries: GUID, file offset, length, required),
    2.3 log (entries "loge", zero descriptors "zero", data descriptors "desc", data sectors
    "data"; 2.3.3 log replay), 2.4 BAT (payload block states, sector bitmap block states,
    chunk ratio = 2^23 * logical sector size / block size, one sector bitmap entry after
    every chunk ratio payload entries), 2.6 metadata region ("metadata" table; file
    parameters, virtual disk size, virtual disk id, logical and physical sector size,
    parent locator).
  - CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), RFC 3720 appendix B.4.
  - qemu-img 7.2's observed behaviour: create options block_size (0 = auto: 8/16/32/64 MiB
    by size, clamped to 1..256 MiB, power of two), log_size (1 MiB multiple), subformat
    dynamic|fixed, block_state_zero; layout 1 MiB header area, log at 1 MiB, BAT and metadata
    regions after it; images whose log must be replayed are refused read-only (replayed by a
    writable open, e.g. ``check -r all``); no block status (``map`` shows one data extent);
    differencing images are refused.

Writes allocate blocks at the end of the file (1 MiB aligned, in write order, as qemu-img does);
dirty BAT pages are written back on flush/close/finalize.  The log is only replayed, never
written (so a crash while writing can leave BAT updates unwritten; the data blocks themselves
are never moved).  Open option ``check=True`` keeps qemu's open-time BAT errors (block beyond
the end of the file, block over a metadata region) for ``check`` to report instead of refusing.
"""

from .driver import VhdxDriver

__all__ = ["VhdxDriver"]
