"""qcow2 L1/L2 tables: entry bits, per-table decoding into runs, and a bounded L2 cache.

References: QEMU docs/interop/qcow2.txt, sections "Cluster mapping" (L1/L2 entries,
QCOW_OFLAG_COPIED/COMPRESSED/ZERO), "Extended L2 Entries" (32 subclusters, allocation
bitmap in bits 0-31, zero bitmap in bits 32-63 of the second word).

A table is decoded once into per-unit arrays (unit = cluster, or subcluster with extended
L2): a kind code, the host offset, and the indexes where a new run starts.  block_status
then costs one binary search per extent instead of a walk over entries.
"""

from __future__ import annotations

import re
import sys
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict

from ...core.policy import short_read
from ...errors import CorruptImage


class LazyNumpy:
    """``np`` for the qcow2 modules: numpy is imported on first use, not when the module loads
    (``info``, probing and other metadata-only commands never pay for it).  The first attribute
    access rebinds the module's global ``np`` to numpy itself."""

    def __init__(self, module_globals: dict):
        self._globals = module_globals

    def __getattr__(self, name):
        import numpy

        self._globals["np"] = numpy
        return getattr(numpy, name)


np = LazyNumpy(globals())

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
SUBCLUSTERS_PER_CLUSTER = 32
QCOW_L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
QCOW_L2_BITMAP_ALL_ZERO = 0xFFFFFFFF << 32

# unit kinds
UNALLOCATED = 0   # falls through to the backing file
ZERO_PLAIN = 1    # reads as zeros, no host cluster
ZERO_ALLOC = 2    # reads as zeros, host cluster kept
NORMAL = 3        # data at a host offset
COMPRESSED = 4    # data in a compressed cluster (the unit is the whole cluster)

L2_CACHE_BYTES = 32 << 20


class DecodedL2:
    """One L2 table decoded into runs of units of the same kind (and contiguous host offsets).

    ``kinds`` has one code per unit; host offsets are kept per cluster (``chosts``): a unit's
    host offset is its cluster's plus its index inside the cluster times the unit size.
    """

    __slots__ = ("chosts", "kinds", "nbytes", "raw", "shift", "starts", "unit")

    def __init__(self, kinds, chosts, shift: int, unit: int, raw):
        self.kinds = kinds
        self.chosts = chosts
        self.shift = shift
        self.unit = unit
        self.raw = raw
        n = len(kinds)
        brk = np.empty(n, dtype=bool)
        if n:
            brk[0] = True
            brk[1:] = kinds[1:] != kinds[:-1]
        self.starts = np.flatnonzero(brk)
        self.nbytes = kinds.nbytes + chosts.nbytes + raw.nbytes + self.starts.nbytes

    def host(self, index: int) -> int:
        """Host offset of unit ``index`` (0 when its cluster has none)."""
        c = int(self.chosts[index >> self.shift])
        if not c:
            return 0
        if c < 0:  # an external data file's offset 0
            c = 0
        return c + (index & ((1 << self.shift) - 1)) * self.unit

    def run_at(self, index: int, limit: int | None = None) -> tuple[int, int]:
        """(kind, end index) of the run holding unit ``index`` (``limit``: the caller needs no more)."""
        pos = int(np.searchsorted(self.starts, index, side="right"))
        end = int(self.starts[pos]) if pos < len(self.starts) else len(self.kinds)
        return int(self.kinds[index]), end


class DecodedL2Py:
    """DecodedL2 for a standard (not extended) L2 table held as ``array('Q')``: the same interface,
    kept as runs (where each starts, its kind, its first host offset) so that neither building nor
    reading it needs numpy or a Python step per entry."""

    __slots__ = ("chosts", "count", "kinds", "nbytes", "raw", "run_hosts", "shift", "starts", "unit")

    def __init__(self, starts: list, kinds: bytearray, run_hosts: list, count: int, unit: int, raw):
        self.starts = starts        # index of each run's first entry
        self.kinds = kinds          # each run's kind
        self.run_hosts = run_hosts  # each run's first host offset: 0 none, -1 an external data file's 0
        self.count = count
        self.shift = 0
        self.unit = unit
        self.raw = raw
        self.chosts = _RunHosts(self)
        self.nbytes = 8 * len(raw) + 17 * len(starts)

    def host_of(self, index: int) -> int:
        """The decoders' ``chosts`` value of entry ``index``: its host offset, -1 for an external data
        file's offset 0, 0 for none."""
        pos = bisect_right(self.starts, index) - 1
        h = self.run_hosts[pos]
        if not h:
            return 0
        return (max(h, 0) + (index - self.starts[pos]) * self.unit) or -1

    def host(self, index: int) -> int:
        return max(self.host_of(index), 0)

    def run_at(self, index: int, limit: int | None = None) -> tuple[int, int]:
        starts = self.starts
        pos = bisect_right(starts, index)
        end = starts[pos] if pos < len(starts) else self.count
        return self.kinds[pos - 1], end


class _RunHosts:
    """``chosts`` of a DecodedL2Py, entry by entry (as the numpy decoder stores them)."""

    __slots__ = ("table",)

    def __init__(self, table: DecodedL2Py):
        self.table = table

    def __getitem__(self, index: int) -> int:
        return self.table.host_of(index)


#: finds the first non-zero byte of a buffer from a position, in C (the next written entry of a table)
NONZERO_BYTE = re.compile(rb"[^\x00]")
_OFFSET_LIMIT = 1 << 56  # one past the largest offset an L2 entry can hold (bits 9-55)


def run_length(raw: array, i: int, stop: int, expected) -> int:
    """How many entries from ``i`` (at least 1, at most ``stop - i``) equal ``expected(k, count)`` for
    their position ``k`` in the run.  The whole span is tried first (a table written in one go is
    one run up to its next unwritten entry); otherwise slices double while they match and halve
    when they do not, so a run of L entries costs O(log L) slice comparisons, each in C."""
    most = stop - i
    if most > 1 and raw[i:stop] == expected(0, most):
        return most
    length, step = 1, 1
    while length < most:
        count = min(step, most - length)
        if raw[i + length:i + length + count] == expected(length, count):
            length += count
            step *= 2
        elif count == 1:
            break
        else:
            step = count // 2
    return length


def _decode_l2_py(raw: array, cs: int, has_data_file: bool) -> DecodedL2Py:
    """Plain-Python decode_l2 for standard L2 entries (the same kinds, hosts and run starts as the
    numpy decoder), built a run at a time: never-written entries are skipped with one C-level byte
    scan, and a run of contiguous clusters (or of equal entries) is measured with slice comparisons,
    so the Python work grows with the number of runs, not of entries."""
    n = len(raw)
    starts: list[int] = []
    kinds = bytearray()
    hosts: list[int] = []
    prev = None  # (kind, next host or None) of the run before, to merge runs the decoders see as one
    mask = L2E_OFFSET_MASK
    nonzero = NONZERO_BYTE.search
    i = 0
    while i < n:
        e = raw[i]
        if not e:
            m = nonzero(raw, 8 * i)
            j = n if m is None else m.start() >> 3
            if prev != (UNALLOCATED, None):
                starts.append(i)
                kinds.append(UNALLOCATED)
                hosts.append(0)
                prev = (UNALLOCATED, None)
            i = j
            continue
        if e & QCOW_OFLAG_COMPRESSED:
            starts.append(i)
            kinds.append(COMPRESSED)
            hosts.append(0)
            prev = (COMPRESSED, None)
            i += 1
            continue
        off = e & mask
        zero = e & QCOW_OFLAG_ZERO
        if off or (has_data_file and e & QCOW_OFLAG_COPIED):
            kind = ZERO_ALLOC if zero else NORMAL
            # e, e + cs, e + 2 cs, ...: the same flags on contiguous clusters, never carried out of
            # the offset bits into the reserved ones
            try:
                written = raw.index(0, i)  # a run of clusters ends at the next unwritten entry at the latest
            except ValueError:
                written = n
            most = min(written, i + (_OFFSET_LIMIT - 1 - off) // cs + 1)
            j = i + run_length(raw, i, most, lambda k, c, e=e: array("Q", range(e + k * cs, e + (k + c) * cs, cs)))
            if prev != (kind, off):
                starts.append(i)
                kinds.append(kind)
                hosts.append(off or -1)
            prev = (kind, off + (j - i) * cs)
        else:
            kind = ZERO_PLAIN if zero else UNALLOCATED
            j = i + run_length(raw, i, n, lambda k, c, e=e: array("Q", (e,)) * c)
            if prev != (kind, None):
                starts.append(i)
                kinds.append(kind)
                hosts.append(0)
            prev = (kind, None)
        i = j
    return DecodedL2Py(starts, kinds, hosts, n, cs, raw)


class LiveL2:
    """A standard L2 table the writer is changing (``array('Q')``), read in place.

    Decoding a whole table after every write would cost time proportional to the table, not to the
    data written; this view answers ``run_at`` by looking only at the entries from the asked index up
    to ``limit`` (the end of the caller's range), with the same kinds and run breaks as the decoders.
    It is never cached: the writer's array is the one copy of the table."""

    __slots__ = ("chosts", "cs", "has_data_file", "raw", "shift", "unit")

    def __init__(self, raw: array, cs: int, has_data_file: bool):
        self.raw = raw
        self.cs = self.unit = cs
        self.shift = 0
        self.has_data_file = has_data_file
        self.chosts = _LiveHosts(self)

    def _kind(self, e: int) -> tuple[int, int]:
        """(kind, host offset or -1 when the entry has none) of one entry."""
        if not e:
            return UNALLOCATED, -1
        if e & QCOW_OFLAG_COMPRESSED:
            return COMPRESSED, -1
        off = e & L2E_OFFSET_MASK
        if off or (self.has_data_file and e & QCOW_OFLAG_COPIED):
            return (ZERO_ALLOC if e & QCOW_OFLAG_ZERO else NORMAL), off
        return (ZERO_PLAIN if e & QCOW_OFLAG_ZERO else UNALLOCATED), -1

    def host(self, index: int) -> int:
        return max(self._kind(self.raw[index])[1], 0)

    def run_at(self, index: int, limit: int | None = None) -> tuple[int, int]:
        raw = self.raw
        stop = len(raw) if limit is None else min(limit, len(raw))
        kind, host = self._kind(raw[index])
        j = index + 1
        if kind == COMPRESSED:
            return kind, j
        if host < 0 and not raw[index]:
            while j < stop and not raw[j]:  # the common case: a run of never-written entries
                j += 1
            if j >= stop or self._kind(raw[j]) != (kind, -1):
                return kind, j
        kind_at = self._kind
        cs = self.cs
        while j < stop:
            k, h = kind_at(raw[j])
            if k != kind or (h < 0) != (host < 0) or (host >= 0 and h != host + (j - index) * cs):
                break
            j += 1
        return kind, j


class _LiveHosts:
    """``chosts`` of a LiveL2, entry by entry: the host offset, -1 for an external data file's offset 0,
    0 for none (as the decoders store them)."""

    __slots__ = ("live",)

    def __init__(self, live: LiveL2):
        self.live = live

    def __getitem__(self, index: int) -> int:
        h = self.live._kind(self.live.raw[index])[1]
        return 0 if h < 0 else (h or -1)


def decode_l2(raw, cluster_bits: int, extended: bool, has_data_file: bool):
    """Decode an L2 table (uint64 array, host byte order) into kinds per unit and hosts per cluster.

    A standard table held as ``array('Q')`` is decoded in plain Python (no numpy)."""
    cs = 1 << cluster_bits
    if isinstance(raw, array):
        if not extended:
            return _decode_l2_py(raw, cs, has_data_file)
        raw = np.frombuffer(raw.tobytes(), dtype=np.uint64).copy()
    entries = raw[0::2] if extended else raw
    off = entries & np.uint64(L2E_OFFSET_MASK)
    compressed = (entries & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
    copied = (entries & np.uint64(QCOW_OFLAG_COPIED)) != 0
    has_off = off != 0
    if has_data_file:
        # with an external data file, host offset 0 is valid when COPIED is set
        has_off = has_off | copied
    chosts = np.where(compressed | ~has_off, 0, off).astype(np.int64)
    if has_data_file:
        # host offset 0 is a real offset there: keep "has a host" apart from the value
        chosts = np.where(has_off & ~compressed & (off == 0), -1, chosts)
    if not extended:
        zero = (entries & np.uint64(QCOW_OFLAG_ZERO)) != 0
        kinds = np.where(has_off, np.where(zero, ZERO_ALLOC, NORMAL), np.where(zero, ZERO_PLAIN, UNALLOCATED))
        kinds = np.where(compressed, COMPRESSED, kinds).astype(np.uint8)
        d = DecodedL2(kinds, chosts, 0, cs, raw)
        _add_host_breaks(d, chosts, cs, 0)
        return d
    # extended L2: one unit per subcluster; the bitmaps unpacked to bits (little-endian bit order)
    n = len(entries)
    bits = np.unpackbits(raw[1::2].astype("<u8").view(np.uint8).reshape(n, 8), axis=1, bitorder="little")
    alloc = bits[:, :SUBCLUSTERS_PER_CLUSTER].astype(bool)
    zbits = bits[:, SUBCLUSTERS_PER_CLUSTER:].astype(bool)
    bad = (alloc & zbits).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CorruptImage(f"Invalid extended L2 entry {i}: a subcluster is both allocated and zero")
    ho = has_off[:, None]
    orphan = (alloc & ~ho).any(axis=1)
    if orphan.any():
        i = int(np.flatnonzero(orphan)[0])
        raise CorruptImage(f"Invalid extended L2 entry {i}: allocated subclusters without a host cluster")
    kinds = np.full((n, SUBCLUSTERS_PER_CLUSTER), UNALLOCATED, dtype=np.uint8)
    kinds[alloc] = NORMAL
    kinds[zbits & ho] = ZERO_ALLOC
    kinds[zbits & ~ho] = ZERO_PLAIN
    kinds[compressed] = COMPRESSED
    kinds = kinds.reshape(-1)
    d = DecodedL2(kinds, chosts, 5, cs // SUBCLUSTERS_PER_CLUSTER, raw)
    _add_host_breaks(d, chosts, cs, 5)
    return d


def _plain_hosts(chosts: np.ndarray) -> np.ndarray:
    """Per-cluster host offsets as values: -1 (an external data file's offset 0) is 0."""
    return np.where(chosts < 0, 0, chosts)


def _add_host_breaks(d: DecodedL2, chosts: np.ndarray, cs: int, shift: int) -> None:
    """Split runs where the host offset is not contiguous (between clusters) or a cluster is compressed."""
    n = len(chosts)
    if n < 2 and not shift:
        return
    hostful = chosts != 0
    jump = (hostful[1:] != hostful[:-1]) | (hostful[1:] & (_plain_hosts(chosts[1:]) != _plain_hosts(chosts[:-1]) + cs))
    comp = d.kinds[(np.arange(1, n) << shift)] == COMPRESSED if n > 1 else np.zeros(0, dtype=bool)
    # (inside one cluster the host offsets are contiguous by construction)
    extra = (np.flatnonzero(jump | comp) + 1) << shift
    if len(extra):
        d.starts = np.union1d(d.starts, extra)
        d.nbytes += extra.nbytes


class L2Cache:
    """A bounded LRU of decoded L2 tables, safe for the reader threads of the copy engine."""

    def __init__(self, max_bytes: int = L2_CACHE_BYTES, budget=None):
        """``budget``: the open's Opener (charge/release); under a tight metadata budget the cache
        evicts instead of failing, and fails only when one table alone does not fit."""
        self.max_bytes = max_bytes
        self.budget = budget
        self.bytes = 0
        self.tables: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            d = self.tables.get(key)
            if d is not None:
                self.tables.move_to_end(key)
            return d

    def put(self, key, table: DecodedL2) -> None:
        with self.lock:
            old = self.tables.pop(key, None)
            if old is not None:
                self._freed(old.nbytes)
            while self.budget is not None:
                try:
                    self.budget.charge("L2 table cache", table.nbytes)
                    break
                except Exception:
                    if not self.tables:
                        raise
                    self._freed(self.tables.popitem(last=False)[1].nbytes)
            self.tables[key] = table
            self.bytes += table.nbytes
            while self.bytes > self.max_bytes and len(self.tables) > 1:
                _k, t = self.tables.popitem(last=False)
                self._freed(t.nbytes)

    def _freed(self, nbytes: int) -> None:
        self.bytes -= nbytes
        if self.budget is not None:
            self.budget.release(nbytes)

    def drop(self, key) -> None:
        with self.lock:
            old = self.tables.pop(key, None)
            if old is not None:
                self._freed(old.nbytes)

    def clear(self) -> None:
        with self.lock:
            self.tables.clear()
            self._freed(self.bytes)


def read_table(store, offset: int, entries: int, name: str, file_size: int, strict: bool = False,
               image: str = "") -> np.ndarray:
    """Read a big-endian u64 table as a writable native array; bytes past EOF read as zero (refused
    when ``strict``)."""
    nbytes = entries * 8
    # a table past the end of the file reads as zeros, as in qemu (refused only when ``strict``)
    raw = short_read(store.pread(offset, nbytes), nbytes, strict, image, name, offset)
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def read_table_array(store, offset: int, entries: int, name: str, file_size: int, strict: bool = False,
                     image: str = "") -> array:
    """read_table as a plain ``array('Q')`` in host byte order (no numpy)."""
    nbytes = entries * 8
    # a table past the end of the file reads as zeros, as in qemu (refused only when ``strict``)
    raw = short_read(store.pread(offset, nbytes), nbytes, strict, image, name, offset)
    return be_u64_array(raw)


def be_u64_array(raw: bytes) -> array:
    """Big-endian u64 bytes as a native ``array('Q')``."""
    a = array("Q")
    a.frombytes(raw)
    if sys.byteorder == "little":
        a.byteswap()
    return a


def be_bytes(a: array) -> bytes:
    """A native ``array`` serialised big-endian."""
    if sys.byteorder == "little":
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def table_bytes(arr) -> bytes:
    """Serialise a u64 table (numpy array or ``array('Q')``) big-endian."""
    if isinstance(arr, array):
        return be_bytes(arr)
    return arr.astype(">u8").tobytes()


def copy_table(arr):
    """A copy of a u64 table (numpy array or ``array('Q')``)."""
    return array(arr.typecode, arr) if isinstance(arr, array) else arr.copy()
