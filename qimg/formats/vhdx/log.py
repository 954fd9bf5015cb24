"""VHDX log replay (MS-VHDX 2.3): find the active log sequence and apply it to the file.

References: [MS-VHDX] 2.3 (log entry header "loge", zero descriptors "zero", data descriptors
"desc" with their data sectors "data"), 2.3.3 (log replay: the newest valid sequence whose tail
leads back to its head).  The log is only ever replayed here, never written.
"""

from __future__ import annotations

import struct

from ...errors import CorruptImage, check_limit
from .crc32c import crc32c
from .layout import (
    LOG_DESCRIPTOR,
    LOG_ENTRY_HEADER,
    VHDX_LOG_SECTOR_SIZE,
    VHDX_MAX_IMAGE_SIZE,
    VHDX_MAX_LOG_ENTRY,
    ZERO_GUID,
    MiB,
)


class VhdxLogMixin:
    """Mixed into VhdxDriver: log reading and replay (needs ``header``, ``store``, ``file_size``)."""

    def _log_read(self, pos: int, n: int) -> bytes:
        """Read ``n`` bytes of the circular log starting at log position ``pos``."""
        h = self.header
        L = h["log_length"]
        out = []
        while n > 0:
            p = pos % L
            k = min(n, L - p)
            out.append(self.store.pread_full(h["log_offset"] + p, k))
            n -= k
            pos += k
        return b"".join(out)

    def _log_in_file(self, pos: int, n: int) -> bool:
        """Whether log bytes [pos, pos + n) (circular) all lie inside the file (never zero padding)."""
        h = self.header
        L = h["log_length"]
        size = self.store.size()
        while n > 0:
            p = pos % L
            k = min(n, L - p)
            if h["log_offset"] + p + k > size:
                return False
            n -= k
            pos += k
        return True

    def _log_entry(self, pos: int):
        """A valid log entry at log position ``pos`` (dict) or None.

        The cheap structure checks (descriptor and data sector signatures, an entry length of exactly
        its descriptor and data sectors, all inside the file) run sector by sector before the checksum,
        so a crafted log full of entry headers costs time in proportion to the file, not its square.
        """
        h = self.header
        L = h["log_length"]
        head = self._log_read(pos, VHDX_LOG_SECTOR_SIZE)
        if head[:4] != b"loge":
            return None
        e = LOG_ENTRY_HEADER.unpack(head)
        csum, length, tail, seq = e["checksum"], e["entry_length"], e["tail"], e["sequence_number"]
        count, guid = e["descriptor_count"], e["log_guid"]
        flushed, last = e["flushed_file_offset"], e["last_file_offset"]
        if guid != h["log_guid"] or length < VHDX_LOG_SECTOR_SIZE or length % VHDX_LOG_SECTOR_SIZE or length > L:
            return None
        check_limit("VHDX log entry length", length, VHDX_MAX_LOG_ENTRY)
        if tail % VHDX_LOG_SECTOR_SIZE or tail >= L:
            return None
        desc_sectors = (64 + 32 * count + VHDX_LOG_SECTOR_SIZE - 1) // VHDX_LOG_SECTOR_SIZE
        if desc_sectors * VHDX_LOG_SECTOR_SIZE > length or not self._log_in_file(pos, length):
            return None
        descs = []
        sector = head
        n_data = 0
        for i in range(count):
            at = 64 + 32 * i
            if at // VHDX_LOG_SECTOR_SIZE != (at - 32) // VHDX_LOG_SECTOR_SIZE and i:
                sector = self._log_read(pos + at // VHDX_LOG_SECTOR_SIZE * VHDX_LOG_SECTOR_SIZE,
                                        VHDX_LOG_SECTOR_SIZE)
            d = LOG_DESCRIPTOR.unpack(sector, at % VHDX_LOG_SECTOR_SIZE)
            sig, trail, lead, file_off, dseq = (d["signature"], d["trailing_bytes"], d["leading_bytes"],
                                                d["file_offset"], d["sequence_number"])
            if dseq != seq or file_off % VHDX_LOG_SECTOR_SIZE:
                return None
            if sig == b"zero":
                zlen = struct.unpack_from("<Q", lead)[0]
                if zlen % VHDX_LOG_SECTOR_SIZE:
                    return None
                descs.append(["zero", file_off, zlen])
            elif sig == b"desc":
                if (desc_sectors + n_data + 1) * VHDX_LOG_SECTOR_SIZE > length:
                    return None
                s = self._log_read(pos + (desc_sectors + n_data) * VHDX_LOG_SECTOR_SIZE, VHDX_LOG_SECTOR_SIZE)
                shigh, slow = struct.unpack_from("<I", s, 4)[0], struct.unpack_from("<I", s, 4092)[0]
                if s[:4] != b"data" or (shigh << 32 | slow) != seq:
                    return None
                descs.append(["data", file_off, lead + s[8:4092] + trail])
                n_data += 1
            else:
                return None
        if (desc_sectors + n_data) * VHDX_LOG_SECTOR_SIZE != length:
            return None
        buf = self._log_read(pos, length)
        if crc32c(buf[:4] + bytes(4) + buf[8:]) != csum:
            return None
        return dict(pos=pos % L, length=length, tail=tail, seq=seq, flushed=flushed, last=last,
                    descs=[tuple(d) for d in descs])

    def _find_log_sequence(self) -> list:
        """The active log sequence (entries oldest first), or [] when there is nothing to replay."""
        h = self.header
        L = h["log_length"]
        if L == 0:
            return []
        entries = {}
        # look for entry signatures a window at a time; only the candidates are parsed
        window = 4 * MiB
        base = 0
        while base < L:
            n = min(window, L - base)
            data = self.store.pread(h["log_offset"] + base, n)
            p = data.find(b"loge")
            while p >= 0:
                if p % VHDX_LOG_SECTOR_SIZE == 0:
                    e = self._log_entry(base + p)
                    if e is not None:
                        entries[base + p] = e
                    p = data.find(b"loge", p + VHDX_LOG_SECTOR_SIZE)
                else:
                    p = data.find(b"loge", (p // VHDX_LOG_SECTOR_SIZE + 1) * VHDX_LOG_SECTOR_SIZE)
            base += n
        if not entries:
            return []
        succ = {}
        for pos, e in entries.items():
            nxt = entries.get((pos + e["length"]) % L)
            if nxt is not None and nxt["seq"] == e["seq"] + 1:
                succ[pos] = nxt["pos"]
        # a sequence is valid when walking from its head's tail reaches the head
        for head in sorted(entries.values(), key=lambda e: e["seq"], reverse=True):
            if head["pos"] in succ:
                continue  # not the newest entry of its chain
            cur = entries.get(head["tail"])
            seq = []
            steps = 0
            while cur is not None and steps <= len(entries):
                seq.append(cur)
                if cur is head:
                    return seq
                nxt = succ.get(cur["pos"])
                cur = entries.get(nxt) if nxt is not None else None
                steps += 1
        return []

    def _replay_log(self, seq: list) -> None:
        """Apply the log entries to the file (MS-VHDX 2.3.3), then clear the log GUID in the headers."""
        last = seq[-1]
        if last["flushed"] > self.file_size:
            raise CorruptImage("VHDX log replay: the file is shorter (%u) than the log's flushed file offset %u"
                               % (self.file_size, last["flushed"]))
        limit = VHDX_MAX_IMAGE_SIZE * 2
        for e in seq:
            for kind, off, payload in e["descs"]:
                if kind == "data":
                    check_limit("VHDX log data file offset", off, limit)
                    self.store.pwrite(off, payload)
                else:
                    check_limit("VHDX log zero range end", off + payload, limit)
                    # past the end of the file everything reads as zeros already
                    pos, end = off, min(off + payload, self.store.size())
                    chunk = bytes(min(payload, 1 << 20))
                    while pos < end:
                        n = min(len(chunk), end - pos)
                        self.store.pwrite(pos, chunk[:n])
                        pos += n
        if self.store.size() < last["last"]:
            check_limit("VHDX log last file offset", last["last"], limit)
            self.store.truncate(last["last"])
        self.store.flush()
        self.file_size = self.store.size()
        self.header = dict(self.header, log_guid=ZERO_GUID)
        self._update_headers()
        self.store.flush()

