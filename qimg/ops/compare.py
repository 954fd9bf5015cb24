"""compare: do two images show the same guest content?  (qemu-img 7.2's rules and messages)

Exit codes: 0 identical, 1 different, 2 an image could not be opened, 3 block status
failed, 4 a read failed.  Both chains are walked by block status; runs that read as zeros
in both are skipped without I/O, runs allocated in both are read and compared (worker
threads read the next chunks while the caller checks results in order), and a run
allocated on one side only must read as zeros there.  Steps follow qemu-img's loop
(``min`` of both runs, at most 2 MiB when data is read) so ``-p`` prints the same
percentages and ``-s`` reports the same offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.chain import Chain
from ..errors import QimgError

#: qemu-img compare's exit codes
IDENTICAL, DIFFERENT, OPEN_ERROR, STATUS_ERROR, READ_ERROR = 0, 1, 2, 3, 4


@dataclass
class CompareRequest:
    """qemu-img compare's arguments as plain values."""

    filename1: str
    filename2: str
    fmt1: str | None = None
    fmt2: str | None = None
    options1: dict = field(default_factory=dict)
    options2: dict = field(default_factory=dict)
    strict: bool = False
    workers: int = 2
    policy: object = None  # qimg.core.policy.Policy (untrusted mode); None: qemu-img's rules


class CompareFailed(QimgError):
    """An error that ends the comparison with one of compare's own exit codes."""


@dataclass(slots=True)
class _Step:
    offset: int
    length: int
    kind: str  # "skip", "data", "empty1", "empty2", "strict"


def _status(chain: Chain, name: str, offset: int, total: int):
    """(flags, length) of the run at ``offset``: flags as qemu's block status bits would compare."""
    try:
        ext = chain.block_status(offset, total - offset)
    except QimgError as e:
        raise CompareFailed(f"Sector allocation test failed for {name}", STATUS_ERROR,
                            diagnostics=e.diagnostics) from None
    n = min(ext.length, total - offset)
    if n <= 0:
        raise CompareFailed(f"Sector allocation test failed for {name}", STATUS_ERROR)
    allocated = bool(ext.present)
    below = ext.depth + 1
    if not allocated and below < len(chain.layers) and offset >= chain.layers[below].virtual_size:
        allocated = True  # zeros past the end of a short backing file count as allocated there
    has_offset = ext.offset is not None and (ext.data or (ext.zero and ext.present))
    flags = (bool(ext.data), bool(ext.zero), allocated, has_offset, offset + n == total)
    return flags, n


def _steps(chain1, chain2, name1, name2, total1, total2, strict):
    """qemu-img compare's walk over the common part, as steps (metadata only, no reads)."""
    from ..engine.compare import IO_BUF_SIZE

    total = min(total1, total2)
    offset = 0
    while offset < total:
        st1, n1 = _status(chain1, name1, offset, total1)
        st2, n2 = _status(chain2, name2, offset, total2)
        chunk = min(n1, n2)
        if strict and st1 != st2:
            yield _Step(offset, 0, "strict")
            return
        zero1, alloc1 = st1[1], st1[2]
        zero2, alloc2 = st2[1], st2[2]
        if zero1 and zero2:
            kind = "skip"
        elif alloc1 == alloc2:
            if alloc1:
                chunk = min(chunk, IO_BUF_SIZE)
                kind = "data"
            else:
                kind = "skip"
        else:
            chunk = min(chunk, IO_BUF_SIZE)
            kind = "empty1" if alloc1 else "empty2"
        yield _Step(offset, chunk, kind)
        offset += chunk


def _tail_steps(chain, name, start, total_max):
    """The part of the larger image past the smaller one: allocated runs must read as zeros."""
    from ..engine.compare import IO_BUF_SIZE

    offset = start
    while offset < total_max:
        st, n = _status(chain, name, offset, total_max)
        if st[2] and not st[1]:
            # qemu-img steps over runs that read as zeros here in one piece
            n = min(n, IO_BUF_SIZE)
            yield _Step(offset, n, "empty1")
        else:
            yield _Step(offset, n, "skip")
        offset += n


def compare(req: CompareRequest, progress=None, report=None) -> int:
    """Compare two images; ``report(line)`` receives qemu-img's messages, the return value is the exit code.

    ``progress(length, base)`` is called once with length 0 when the walk starts, then after each
    step with its length and ``base``, the larger virtual size (qemu-img's progress arithmetic is the
    caller's).
    """
    report = report or (lambda _line: None)
    chain1 = chain2 = None
    try:
        try:
            chain1 = Chain.open(req.filename1, req.fmt1, options=dict(req.options1), policy=req.policy)
            chain2 = Chain.open(req.filename2, req.fmt2, options=dict(req.options2), policy=req.policy)
        except QimgError as e:
            raise CompareFailed(str(e), OPEN_ERROR) from None
        total1, total2 = chain1.virtual_size, chain2.virtual_size
        base = max(total1, total2)
        if progress is not None:
            progress(0, base)
        if req.strict and total1 != total2:
            report("Strict mode: Image size mismatch!")
            return DIFFERENT
        steps = _steps(chain1, chain2, req.filename1, req.filename2, total1, total2, req.strict)
        code = _run(steps, chain1, chain2, req.filename1, req.filename2, base, req, progress, report)
        if code is not None:
            return code
        if total1 != total2:
            report("Warning: Image size mismatch!")
            over, over_name = (chain1, req.filename1) if total1 > total2 else (chain2, req.filename2)
            steps = _tail_steps(over, over_name, min(total1, total2), base)
            code = _run(steps, over, None, over_name, None, base, req, progress, report)
            if code is not None:
                return code
        report("Images are identical.")
        return IDENTICAL
    finally:
        for ch in (chain1, chain2):
            if ch is not None:
                ch.close()


def _run(steps, chain1, chain2, name1, name2, base, req, progress, report):
    """Check steps in order (reads in worker threads); an exit code on the first difference, else None."""
    from ..engine.compare import IO_BUF_SIZE, first_difference, first_nonzero, ordered_map, sector_of
    from ..io.store import BufferPool

    workers = max(1, req.workers)
    depth = workers * 2
    pool = BufferPool(IO_BUF_SIZE, 2 * (depth + 1))

    def read(chain, name, off, n, buf):
        view = memoryview(buf)[:n]
        try:
            chain.readinto(off, view)
        except QimgError as e:
            raise CompareFailed(f"Error while reading offset {off} of {name}: {e}", READ_ERROR) from None
        return view

    def work(step):
        if step.kind in ("skip", "strict"):
            return None, None
        b1 = pool.get()
        b2 = pool.get() if step.kind == "data" else None
        try:
            if step.kind == "data":
                v1 = read(chain1, name1, step.offset, step.length, b1)
                v2 = read(chain2, name2, step.offset, step.length, b2)
                idx = first_difference(v1, v2)
                v1.release()
                v2.release()
            else:
                chain, name = (chain1, name1) if step.kind == "empty1" else (chain2, name2)
                v = read(chain, name, step.offset, step.length, b1)
                idx = first_nonzero(v)
                v.release()
            return idx, None
        except CompareFailed as e:
            return None, e
        finally:
            pool.put(b1)
            if b2 is not None:
                pool.put(b2)

    gen = ordered_map(work, steps, workers=workers, depth=depth)
    try:
        for step, (idx, err) in gen:
            if err is not None:
                raise err
            if step.kind == "strict":
                report(f"Strict mode: Offset {step.offset} block status mismatch!")
                return DIFFERENT
            if idx is not None:
                report(f"Content mismatch at offset {step.offset + sector_of(idx)}!")
                return DIFFERENT
            if progress is not None:
                progress(step.length, base)
    finally:
        gen.close()
        pool.close()
    return None

