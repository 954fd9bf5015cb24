"""The qcow2 internal snapshot table: parse, validate, serialise, find.

References: QEMU docs/interop/qcow2.txt, section "Snapshots" (snapshot table entry and
its extra data: vm_state_size_large, disk_size, icount).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...core.driver import c_string
from ...errors import CorruptImage, QimgError, check_limit
from .header import MAX_L1_SIZE_BYTES, MAX_SNAPSHOT_EXTRA_BYTES, MAX_SNAPSHOT_TABLE_BYTES, MAX_SNAPSHOTS

_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes
SNAPSHOT_EXTRA_V3 = 24                # bytes of extra data qemu writes (vm_state_size_large, disk_size, icount)


@dataclass
class Snapshot:
    """One snapshot table entry."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int | None = None
    icount: int = -1
    extra: bytes = b""  # the raw extra data (kept whole when rewriting)
    entry_size: int = 0  # bytes the entry took in the table as read, padding to 8 included

    def l1_error(self, cluster_size: int) -> str | None:
        """Why this entry's L1 table cannot be used, in qemu-img's words, or None.

        Like qemu, an image whose snapshot table holds such an entry still opens (``info``, ``check``,
        reading the active layer work); loading, applying, deleting or rewriting the snapshot fails."""
        return self.l1_problem(cluster_size)[0]

    def l1_problem(self, cluster_size: int) -> tuple[str | None, str]:
        """(``l1_error``, the errno text qemu-img reports for it afterwards)."""
        if self.l1_size * 8 > MAX_L1_SIZE_BYTES:
            return "Snapshot L1 table too large", "File too large"
        if self.l1_table_offset % cluster_size or self.l1_table_offset + self.l1_size * 8 > (1 << 63) - 1:
            return "Snapshot L1 table offset invalid", "Invalid argument"
        return None, ""

    def info(self) -> dict:
        """The SnapshotInfo dict ``qemu-img info`` prints."""
        d = {
            "id": self.id_str,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount != -1:
            d["icount"] = self.icount
        return d

    def pack(self, version: int = 3) -> bytes:
        """Serialise this entry (with at least qemu's 24 bytes of extra data on v3)."""
        extra = bytearray(self.extra)
        if version >= 3 and len(extra) < SNAPSHOT_EXTRA_V3:
            extra += bytes(SNAPSHOT_EXTRA_V3 - len(extra))
        if len(extra) >= 8:
            struct.pack_into(">Q", extra, 0, self.vm_state_size)
        if len(extra) >= 16:
            struct.pack_into(">Q", extra, 8, self.disk_size or 0)
        if len(extra) >= 24:
            struct.pack_into(">q", extra, 16, self.icount)
        ids, name = self.id_str.encode(), self.name.encode()
        vm32 = self.vm_state_size if self.vm_state_size < (1 << 32) else 0
        out = _ENTRY.pack(self.l1_table_offset, self.l1_size, len(ids), len(name), self.date_sec, self.date_nsec,
                          self.vm_clock_nsec, vm32, len(extra)) + bytes(extra) + ids + name
        return out + bytes((-len(out)) % 8)


def read_snapshots(store, offset: int, count: int, cluster_size: int, file_size: int) -> list[Snapshot]:
    """Parse ``count`` entries at ``offset``; every length is bounded before use."""
    check_limit("qcow2 snapshot count", count, MAX_SNAPSHOTS)
    if count == 0:
        return []
    if offset % cluster_size:
        raise CorruptImage(f"Snapshot table offset {offset:#x} is not aligned to the cluster size")
    if offset >= file_size:
        raise CorruptImage(f"Snapshot table at offset {offset:#x} lies outside the image file")
    avail = min(file_size - offset, MAX_SNAPSHOT_TABLE_BYTES)
    # read in growing pieces: the table size is only known after walking it
    buf = bytearray()
    pos = 0
    snaps = []

    def need(n):
        nonlocal buf
        if pos + n > len(buf):
            if pos + n > avail:
                if pos + n > MAX_SNAPSHOT_TABLE_BYTES:
                    check_limit("qcow2 snapshot table size", pos + n, MAX_SNAPSHOT_TABLE_BYTES)
                raise CorruptImage("Snapshot table is truncated (runs past the end of the file)")
            want = min(avail, max(pos + n, len(buf) * 2, 65536))
            buf += store.pread(offset + len(buf), want - len(buf))
            if pos + n > len(buf):
                raise CorruptImage("Snapshot table is truncated")

    for _ in range(count):
        pos = (pos + 7) & ~7
        start = pos
        need(_ENTRY.size)
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmsize, extra_len) = _ENTRY.unpack_from(buf, pos)
        check_limit("qcow2 snapshot extra data size", extra_len, MAX_SNAPSHOT_EXTRA_BYTES)
        pos += _ENTRY.size
        need(extra_len + id_len + name_len)
        extra = bytes(buf[pos:pos + extra_len])
        pos += extra_len
        id_str = c_string(buf[pos:pos + id_len])
        pos += id_len
        name = c_string(buf[pos:pos + name_len])
        pos += name_len
        sn = Snapshot(l1_off, l1_size, id_str, name, dsec, dnsec, vmclock, vmsize, None, -1, extra,
                      ((pos + 7) & ~7) - start)
        if extra_len >= 8:
            sn.vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if extra_len >= 16:
            sn.disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_len >= 24:
            sn.icount = struct.unpack_from(">q", extra, 16)[0]
        snaps.append(sn)  # (an unusable L1 table is reported where it is used: Snapshot.l1_error)
    return snaps


def table_bytes(snaps: list[Snapshot], version: int = 3) -> bytes:
    """The whole snapshot table, entries padded to 8 bytes."""
    return b"".join(s.pack(version) for s in snaps)


def snapshot_index(snaps: list[Snapshot], spec: dict) -> int:
    """Where a snapshot is in the table (-1: nowhere), looked up as qemu-img does: by id, name, both,
    or id-or-name (an id match first, then a name match)."""
    sid, name = spec.get("id"), spec.get("name")
    if "id_or_name" in spec:
        key = spec["id_or_name"]
        for i, s in enumerate(snaps):
            if s.id_str == key:
                return i
        for i, s in enumerate(snaps):
            if s.name == key:
                return i
        return -1
    for i, s in enumerate(snaps):
        if (sid is None or s.id_str == sid) and (name is None or s.name == name):
            return i
    return -1


def find_snapshot(snaps: list[Snapshot], spec: dict) -> Snapshot:
    """The snapshot convert -l/-s asks for (``snapshot_index``), or qemu-img's error."""
    i = snapshot_index(snaps, spec)
    if i < 0:
        raise QimgError("Can't find snapshot")  # qemu-img's wording (no name)
    return snaps[i]
