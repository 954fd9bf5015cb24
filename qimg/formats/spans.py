"""Writing a guest span through a one-level cluster map (qcow v1 and qed L2 tables, the parallels
BAT): the piece the cluster-mapped formats share.

A span lies inside one table.  Clusters without a home of their own (unallocated, compressed,
zero clusters: the driver says which) get new host clusters, contiguous, from the driver's
allocator; a partial head or tail cluster that moves is first completed with its current guest
content; then the data goes out in one write per run of contiguous host clusters.  The driver
stores the new entries itself, after the data, so an entry never points at unwritten space.
"""

from __future__ import annotations


def host_runs(offsets, length_each: int):
    """Group consecutive guest units whose host offsets are contiguous: [(first_index, count)]."""
    import numpy as np

    n = len(offsets)
    if n == 0:
        return []
    offs = np.asarray(offsets, dtype=np.int64)
    breaks = np.nonzero(np.diff(offs) != length_each)[0] + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [n]))
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def write_span(store, offset: int, data, cs: int, hosts, need, old_cluster, alloc, whole_clusters=False,
               transform=None):
    """Write guest bytes ``data`` at ``offset`` into the clusters the span touches.

    ``hosts``: host offset of each touched cluster (int64 numpy array, first cluster first);
    ``need``: which of them get new host clusters; ``old_cluster(i)``: the current guest content of
    the span's cluster ``i`` (for a partial edge cluster that moves, or every edge with
    ``whole_clusters``); ``alloc(k)``: host offset of ``k`` new contiguous clusters;
    ``transform(guest_offset, data)``: applied to the data once it covers whole clusters (encryption,
    with ``whole_clusters``).  Returns the host offsets after allocation, or None when no cluster
    was allocated (nothing for the caller to store).
    """
    import numpy as np

    data = memoryview(data).cast("B")
    end = offset + len(data)
    c0 = offset // cs
    n = len(hosts)
    start = c0 * cs
    head_pad = offset - start
    tail_pad = (c0 + n) * cs - end
    if (head_pad and need[0]) or (tail_pad and need[-1]) or whole_clusters:
        pre = bytes(old_cluster(0))[:head_pad] if head_pad else b""
        post = bytes(old_cluster(n - 1))[cs - tail_pad:] if tail_pad else b""
        if pre or post:
            data = memoryview(b"".join((pre, data, post)))
            offset = start
    base = offset - start  # 0, or the unaligned head inside a cluster that stays where it is
    k = int(np.count_nonzero(need))
    hosts = np.array(hosts, dtype=np.int64)
    if k:
        hosts[need] = alloc(k) + np.arange(k, dtype=np.int64) * cs
    if transform is not None:
        data = memoryview(transform(offset, data))
    for first, count in host_runs(hosts, cs):
        lo = max(0, first * cs - base)
        hi = min(len(data), (first + count) * cs - base)
        store.pwrite(int(hosts[first]) + (base if first == 0 else 0), data[lo:hi])
    return hosts if k else None
