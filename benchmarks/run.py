#!/usr/bin/env python3
"""Side-by-side timings of qimg against qemu-img (see ../shared/PERFORMANCE.md).

Usage:
    python benchmarks/run.py --scale 1       # all cases at scale 1, 5 pairs each, updates benchmarks/RESULTS.md
    python benchmarks/run.py --scale 0.25,1,4   # the three recorded scales, one after the other
    python benchmarks/run.py --quick         # 2 pairs, slow cases skipped
    python benchmarks/run.py --cases raw     # only cases whose name contains "raw" (comma-separated list)
    python benchmarks/run.py --list          # show the case table
    python benchmarks/run.py --cases vdi --update   # re-measure some cases, keep the other rows

Scales: ``--scale S`` sizes every workload by S (default 4, the original workloads): W1 is S GiB virtual
with S/4 GiB of random data and S/16 GiB of written zeros, W2 is S/4 GiB dense, W4 writes 50*S MiB
over W3, W5 holds 65536*S allocated 4 KiB clusters (262,144 at S = 4).  RESULTS.md keeps one section
per scale; a run replaces the section of its scale.

Method: every case runs qimg and qemu-img alternately (A B A B ...) after one untimed warm-up run of
each (which also pulls the input into the page cache).  The output is deleted before every run.  The
reported ratio is the median of the per-pair ratios qimg/qemu-img; peak RSS comes from wait4().

Adding a case: append a ``Case`` to CASES.  ``inputs`` name workloads (built once under
benchmarks/work/ and reused), ``qimg``/``qemu`` are argv lists after the program name in which
``{W1}``... are replaced by workload paths and ``{out}`` by the output path.  ``needs`` lists format
names whose qimg driver must be importable (and able to create images when ``{out}`` is used),
otherwise the case is reported as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work"
sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402  (each script owns its section of RESULTS.md)

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10


# ----------------------------------------------------------------------------------------------
# workloads


def _rng(seed):
    import numpy as np

    return np.random.default_rng(seed)


def _write_random(fd, offset, length, rng, step=16 * MiB):
    pos = 0
    while pos < length:
        n = min(step, length - pos)
        os.pwrite(fd, rng.bytes(n), offset + pos)
        pos += n


SCALE = 4.0  # set by main(); workload sizes are multiples of it (4 = the original workloads)


def _sz(nbytes: float) -> int:
    """A byte count times the scale, on the 64 KiB grid."""
    return max(64 * KiB, int(nbytes * SCALE / 4) // (64 * KiB) * (64 * KiB))


def make_w1(path: Path) -> None:
    """S GiB sparse raw: S/4 GiB random data in scattered 64 KiB-4 MiB extents, S/16 GiB written zeros."""
    size = _sz(4 * GiB)
    rng = _rng(1)
    # extents on a 64 KiB grid; draw lengths until the budgets are met, then place them without overlap
    data_budget, zero_budget = _sz(1 * GiB), _sz(256 * MiB)
    pieces = []
    for budget, kind in ((data_budget, "data"), (zero_budget, "zero")):
        left = budget
        while left > 0:
            n = int(rng.integers(1, 65)) * 64 * KiB  # 64 KiB .. 4 MiB
            n = min(n, left)
            pieces.append((n, kind))
            left -= n
    order = rng.permutation(len(pieces))
    pieces = [pieces[i] for i in order]
    used = sum(n for n, _ in pieces)
    gaps_total = size - used
    # random gap before each piece, on the 64 KiB grid, summing to at most gaps_total
    cuts = sorted(int(x) for x in rng.integers(0, gaps_total // (64 * KiB), len(pieces)))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        pos, prev_cut = 0, 0
        for (n, kind), cut in zip(pieces, cuts):
            pos += (cut - prev_cut) * 64 * KiB
            prev_cut = cut
            if kind == "data":
                _write_random(fd, pos, n, rng)
            else:
                os.pwrite(fd, bytes(n), pos)
            pos += n
        assert pos <= size
    finally:
        os.close(fd)


def make_w2(path: Path) -> None:
    """S/4 GiB dense random raw."""
    rng = _rng(2)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_random(fd, 0, _sz(1 * GiB), rng)
    finally:
        os.close(fd)


def make_w3(path: Path) -> None:
    """W1 converted to qcow2 by qemu-img."""
    w1 = workload("W1")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(w1), str(path)], check=True)


def make_w4(path: Path) -> None:
    """A qcow2 overlay on W3 with 50*S MiB written (in 1 MiB pieces spread over the disk)."""
    w3 = workload("W3")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(w3), str(path)],
                   check=True)
    cmds = []
    rng = _rng(4)
    mib = _sz(4 * GiB) // MiB
    for off in sorted(int(x) for x in rng.choice(mib, _sz(200 * MiB) // MiB, replace=False)):
        cmds += ["-c", f"write -P {off % 255 + 1} {off}M 1M"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True, stdout=subprocess.DEVNULL)


def make_w5(path: Path) -> None:
    """W1 as a qcow2 with 4 KiB clusters (65536*S allocated clusters) and one internal snapshot."""
    w1 = workload("W1")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", str(w1),
                    str(path)], check=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "base", str(path)], check=True)


def _from_w1(fmt, opts=()):
    def make(path: Path) -> None:
        w1 = workload("W1")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, str(w1), str(path)], check=True)
    return make


WORKLOADS = {"W1": ("w1.raw", make_w1), "W2": ("w2.raw", make_w2), "W3": ("w3.qcow2", make_w3),
             "W4": ("w4.qcow2", make_w4), "W5": ("w5.qcow2", make_w5), "W1vdi": ("w1.vdi", _from_w1("vdi")),
             "W1vpc": ("w1.vpc", _from_w1("vpc")), "W1vhdx": ("w1.vhdx", _from_w1("vhdx")),
             "W1vmdk": ("w1.vmdk", _from_w1("vmdk"))}
#: bump when a generator changes so old files are rebuilt
WORKLOAD_VERSION = 2


def workload(name: str) -> Path:
    """The path of a workload at the current scale, building it on first use."""
    fname, maker = WORKLOADS[name]
    stem, ext = fname.split(".", 1)
    fname = f"{stem}-s{SCALE:g}.{ext}"
    path = WORK / fname
    stamp = WORK / (fname + ".ok")
    if path.exists() and stamp.exists() and stamp.read_text().strip() == str(WORKLOAD_VERSION):
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"  building {name} ({fname}) ...", file=sys.stderr, flush=True)
    tmp = path.with_name(fname + ".tmp")
    maker(tmp)
    os.replace(tmp, path)
    stamp.write_text(str(WORKLOAD_VERSION))
    return path


# ----------------------------------------------------------------------------------------------
# the case table


@dataclass
class Case:
    name: str
    inputs: tuple
    qimg: list
    qemu: list | None
    needs: tuple = ()
    slow: bool = False          # skipped by --quick unless named in --cases
    pairs: int | None = None    # override the number of pairs (slow cases)
    note: str = ""
    extra: dict = field(default_factory=dict)
    #: untimed preparation before every run (after the output is deleted): fn(paths, tool)
    setup: object = None
    #: argv are whole commands ({python} is this interpreter), not qimg/qemu-img arguments
    whole: bool = False


def _convert(fmt, src="W1", sfmt="raw", extra=()):
    argv = ["convert", "-f", sfmt, "-O", fmt, *extra, "{%s}" % src, "{out}"]
    return argv, list(argv)


def _case(name, fmt, src="W1", sfmt="raw", extra=(), needs=(), **kw):
    q, e = _convert(fmt, src, sfmt, extra)
    return Case(name, (src,), q, e, needs=tuple(needs), **kw)


def _copy(src: str, dst: str) -> None:
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


def _prep_overlay(paths, tool) -> None:
    """A private copy of W4 at {out} (its backing file stays W3, which rebase only reads)."""
    _copy(paths["W4"], paths["out"])


def _prep_overlay_and_base(paths, tool) -> None:
    """Private copies of W4 and of its base W3 at {out} and {out}.base: commit writes into both."""
    out, base = paths["out"], paths["out"] + ".base"
    _copy(paths["W4"], out)
    _copy(paths["W3"], base)
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", base, out], check=True)


def _prep_empty_qcow2(paths, tool) -> None:
    """An empty qcow2 of W1's size at {out}: convert -n writes into it."""
    size = os.stat(paths["W1"]).st_size
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", paths["out"], str(size)], check=True)


def _startup(name, argv):
    return Case(name, (), argv, None, whole=True)


def _meta(name, argv, src):
    """A metadata command on a workload, same argv for both tools."""
    return Case(name, (src,), argv, list(argv), needs=("qcow2",))


CASES: list[Case] = [
    # start-up: the floor any click-based Python command line pays (no qemu-img counterpart)
    _startup("start-up: python -c pass", ["{python}", "-c", "pass"]),
    _startup("start-up: python -c 'import click'", ["{python}", "-c", "import click"]),
    Case("start-up: --version", (), ["--version"], ["--version"]),
    Case("--help", (), ["--help"], ["--help"]),
    _case("convert W1 -O raw", "raw"),
    _case("convert W2 -O raw", "raw", src="W2"),
    Case("info W1 (raw)", ("W1",), ["info", "-f", "raw", "{W1}"], ["info", "-f", "raw", "{W1}"]),
    Case("info W1 (probed)", ("W1",), ["info", "{W1}"], ["info", "{W1}"]),
    # formats that land later are skipped until their driver imports
    _case("convert W1 -O qcow2", "qcow2", needs=("qcow2",)),
    _case("convert W2 -O qcow2", "qcow2", src="W2", needs=("qcow2",)),
    _case("convert W3 (qcow2) -O raw", "raw", src="W3", sfmt="qcow2", needs=("qcow2",)),
    Case("convert -n W1 into an empty qcow2", ("W1",), ["convert", "-n", "-f", "raw", "-O", "qcow2", "{W1}", "{out}"],
         ["convert", "-n", "-f", "raw", "-O", "qcow2", "{W1}", "{out}"], needs=("qcow2",), setup=_prep_empty_qcow2),
    _meta("info W3 (qcow2)", ["info", "{W3}"], "W3"),
    _meta("map --output=json W3", ["map", "--output=json", "{W3}"], "W3"),
    _meta("measure -O qcow2 W3", ["measure", "-O", "qcow2", "{W3}"], "W3"),
    _meta("snapshot -l W3", ["snapshot", "-l", "{W3}"], "W3"),
    _meta("check W5 (4 KiB clusters)", ["check", "{W5}"], "W5"),
    _meta("map --output=json W5", ["map", "--output=json", "{W5}"], "W5"),
    _meta("measure -O qcow2 W5", ["measure", "-O", "qcow2", "{W5}"], "W5"),
    _meta("snapshot -l W5", ["snapshot", "-l", "{W5}"], "W5"),
    Case("compare W5 W3", ("W5", "W3"), ["compare", "{W5}", "{W3}"], ["compare", "{W5}", "{W3}"], needs=("qcow2",)),
    Case("rebase (safe) W4 onto no backing file", ("W4", "W3"), ["rebase", "-f", "qcow2", "-b", "", "{out}"],
         ["rebase", "-f", "qcow2", "-b", "", "{out}"], needs=("qcow2",), setup=_prep_overlay),
    Case("commit W4", ("W4", "W3"), ["commit", "-f", "qcow2", "{out}"], ["commit", "-f", "qcow2", "{out}"],
         needs=("qcow2",), setup=_prep_overlay_and_base),
    _case("convert W1 -O qcow2 -c (zlib)", "qcow2", extra=("-c",), needs=("qcow2",), slow=True, pairs=1),
    _case("convert W1 -O qcow2 -c zstd", "qcow2", extra=("-c", "-o", "compression_type=zstd"),
          needs=("qcow2",), slow=True, pairs=2),
    _case("convert W1 -O vmdk streamOptimized", "vmdk", extra=("-o", "subformat=streamOptimized"),
          needs=("vmdk",), slow=True, pairs=1),
    _case("convert W1 -O vmdk", "vmdk", needs=("vmdk",)),
    _case("convert W1 -O vdi", "vdi", needs=("vdi",)),
    _case("convert W1 -O vpc", "vpc", needs=("vpc",)),
    _case("convert W1 -O vhdx", "vhdx", needs=("vhdx",)),
    _case("convert W1 (vdi) -O raw", "raw", src="W1vdi", sfmt="vdi", needs=("vdi",)),
    _case("convert W1 (vpc) -O raw", "raw", src="W1vpc", sfmt="vpc", needs=("vpc",)),
    _case("convert W1 (vhdx) -O raw", "raw", src="W1vhdx", sfmt="vhdx", needs=("vhdx",)),
    _case("convert W1 (vmdk) -O raw", "raw", src="W1vmdk", sfmt="vmdk", needs=("vmdk",)),
]


# ----------------------------------------------------------------------------------------------
# running


def _missing_formats(case: Case) -> list[str]:
    sys.path.insert(0, str(ROOT))
    try:
        from qimg.core import registry
        from qimg.core.driver import Driver
    finally:
        sys.path.pop(0)
    missing = []
    writes = any("{out}" in a for a in case.qimg)
    for fmt in case.needs:
        try:
            cls = registry.get_driver(fmt)
        except Exception:
            missing.append(fmt)
            continue
        if writes and cls.create.__func__ is Driver.create.__func__:
            missing.append(fmt + " (create)")
    return missing


def _expand(argv, paths):
    return [a.format(**paths) for a in argv]


def _remove(path: Path):
    for p in (path, *path.parent.glob(path.name + "*")):
        try:
            os.unlink(p)
        except OSError:
            pass


TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def _run(argv, out: Path | None, setup=None):
    """Run argv once (after ``setup()``, untimed); returns (wall seconds, peak RSS KiB, CPU seconds)."""
    if out is not None:
        _remove(out)
    if setup is not None:
        setup()
    if out is not None:
        os.sync()  # let the filesystem finish discarding the old output before the clock starts
    env = dict(os.environ)
    env.pop("QIMG_DEBUG", None)
    # ru_maxrss of a child forked from this (big) process starts at our own RSS, so measure through
    # /usr/bin/time, whose tiny process is the one that forks the command
    rss_file = WORK / f"rss-{os.getpid()}.txt"
    prefix = [TIME, "-f", "%M", "-o", str(rss_file)] if TIME else []
    t0 = time.perf_counter()
    p = subprocess.Popen(prefix + argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env)
    err = p.stderr.read()
    _pid, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stderr.close()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {err.decode(errors='replace')[-500:]}")
    rss = ru.ru_maxrss
    cpu = ru.ru_utime + ru.ru_stime  # includes the command waited for by /usr/bin/time
    if TIME:
        try:
            rss = int(rss_file.read_text().split()[-1])
        except (OSError, ValueError, IndexError):
            pass
        rss_file.unlink(missing_ok=True)
    return dt, rss, cpu


def _warm(path: Path):
    """Read the data parts of a file once so it sits in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < end:
                n = min(8 * MiB, end - pos)
                os.pread(fd, n, pos)
                pos += n
    finally:
        os.close(fd)


def run_case(case: Case, pairs: int, qimg_cmd: list[str], qemu_cmd: list[str]) -> dict:
    paths = {w: str(workload(w)) for w in case.inputs}
    out = WORK / f"out-{os.getpid()}.img"  # (one per run: two runs may share the workloads)
    paths["out"] = str(out)
    paths["python"] = sys.executable
    uses_out = any("{out}" in a for a in case.qimg)
    a_argv = ([] if case.whole else qimg_cmd) + _expand(case.qimg, paths)
    b_argv = qemu_cmd + _expand(case.qemu, paths) if case.qemu else None
    setup_a = setup_b = None
    if case.setup is not None:
        def setup_a():
            case.setup(paths, "qimg")

        def setup_b():
            case.setup(paths, "qemu-img")
    n = case.pairs if case.pairs is not None else pairs
    n = min(n, pairs) if case.pairs is not None else n
    n = max(n, 1)
    # warm-up (untimed): input into the page cache, code paths into memory (slow cases: input only)
    if case.slow:
        for w in case.inputs:
            _warm(Path(paths[w]))
    else:
        _run(a_argv, out if uses_out else None, setup_a)
        if b_argv:
            _run(b_argv, out if uses_out else None, setup_b)
    ta, tb, ra, rb, ca, cb, ratios, cpu_ratios = [], [], [], [], [], [], [], []
    for _ in range(n):
        t, r, c = _run(a_argv, out if uses_out else None, setup_a)
        ta.append(t)
        ra.append(r)
        ca.append(c)
        if b_argv:
            t2, r2, c2 = _run(b_argv, out if uses_out else None, setup_b)
            tb.append(t2)
            rb.append(r2)
            cb.append(c2)
            ratios.append(t / t2)
            cpu_ratios.append(c / c2 if c2 else float("nan"))
    if uses_out:
        _remove(out)
    res = {"name": case.name, "pairs": n, "qimg_s": statistics.median(ta), "qimg_min_s": min(ta),
           "qimg_cpu_s": statistics.median(ca), "qimg_rss_kib": max(ra),
           "qimg_argv": " ".join(([] if case.whole else ["qimg"]) + case.qimg)}
    if b_argv:
        res.update(qemu_s=statistics.median(tb), qemu_min_s=min(tb), qemu_cpu_s=statistics.median(cb),
                   qemu_rss_kib=max(rb), ratio=statistics.median(ratios), ratios=[round(x, 3) for x in ratios],
                   cpu_ratio=statistics.median(cpu_ratios))
    return res


def machine_text() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fs = "?"
    try:
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, typ, *_ = line.split()
            if str(WORK).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, typ
    except OSError:
        pass
    try:
        import numpy
        npv = numpy.__version__
    except ImportError:
        npv = "-"
    return (f"{os.cpu_count()} CPUs ({cpu}), {fs} at {WORK}, Python {platform.python_version()}, "
            f"numpy {npv}, {platform.system()} {platform.release()}")


def qemu_version() -> str:
    try:
        return subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "qemu-img not found"


def _fmt_s(x):
    return "-" if x is None else (f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s")


def _fmt_m(kib):
    return "-" if kib is None else f"{kib / 1024:.0f} MiB"


NOTES = """\
## Notes

- Start-up is part of every small job.  The `python -c pass` and `python -c "import click"` rows are
  the floor any click-based Python command line pays here (this machine's `site` also runs a CA-bundle
  `.pth` hook); qimg's own modules add about 20 ms on top of click for `info` (a third of it is
  defining dataclasses, ~0.3-0.6 ms each), and click's parser builds a suggestion list (difflib,
  gettext) for every short option it first tries as a long one.  qemu-img starts in ~5 ms, so a
  metadata command of qemu-img (6-8 ms) cannot be matched by any Python process, and a small convert
  pays the start-up against qemu-img's whole run.
- Metadata commands (info, check, map, measure, compare, snapshot -l, rebase -u, resize, amend) import
  no numpy, tqdm, cryptography or zstandard (tests/cli/test_lazy_imports.py).  qcow2 L2 tables are
  decoded a run at a time (a C-level scan skips unwritten entries, slice comparisons against an
  arithmetic progression measure contiguous clusters), so the Python work grows with the runs of a
  table, not with its entries; `check` of a consistent image counts references per run of contiguous
  clusters (qcow2/check_quick.py) and leaves anything unusual to the numpy walk that reports it.
- In-place edits (commit, rebase, resize, amend, snapshot) sync between metadata stages only when the
  stage wrote something: a store skips fdatasync when it wrote nothing since its last one.
- Compressed qcow2 writes: a table being written is read in place (LiveL2), never copied and decoded
  whole per write; compression runs in two worker threads (one zstd context each, four chunks in
  flight per worker), the writer enters the clusters in order and writes a run of clusters that do not
  shrink straight from the read buffer; no numpy.  qemu-img's settings are kept (zlib level 6 with a
  4 KiB window, zstd level 3, a cluster stored compressed only when that is smaller).
- streamOptimized VMDK: one compression job per run of grains (up to 2 MiB) in reused aligned buffers.
- convert writes its target as qemu-img does (cache mode unsafe), -n targets included: no syncs
  between metadata stages, and the workers write the data runs themselves (`direct_map`).
- commit copies the top's data into the base as data, without looking for zeros (as qemu-img's
  commit job), and empties the top with the refcounts its first pass wrote.
- rebase (safe): two workers read the old and new views and find the differing sectors (zeroscan
  against no backing file, numpy only for a new base whose chunks differ); the caller writes.
- raw and new qcow2 targets: two worker threads read 2 MiB chunks into page-aligned buffers, find zero
  blocks and write the data runs in whatever order they finish; holes are found with SEEK_DATA/SEEK_HOLE.
- The machine is shared with other jobs (see the load averages): wall-time pairs swing by 2x and
  more, and a loaded machine hurts the multi-threaded side most (every hand-off waits for a time
  slice).  The CPU ratio column is the steadier comparison.
"""


def _versions() -> str:
    out = []
    for mod in ("click", "numpy", "zstandard"):
        try:
            from importlib.metadata import version

            out.append(f"{mod} {version(mod)}")
        except Exception:
            out.append(f"{mod} -")
    return ", ".join(out)


def _row(r: dict) -> str:
    if "skipped" in r:
        return f"| {r['name']} | - | skipped: {r['skipped']} | | | | | | | |"
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
    cratio = f"{r['cpu_ratio']:.2f}x" if "cpu_ratio" in r else "-"
    return (f"| {r['name']} | {r['pairs']} | {_fmt_s(r['qimg_s'])} | {_fmt_s(r.get('qemu_s'))} | "
            f"**{ratio}** | {_fmt_s(r['qimg_min_s'])} / {_fmt_s(r.get('qemu_min_s'))} | "
            f"{_fmt_s(r['qimg_cpu_s'])} / {_fmt_s(r.get('qemu_cpu_s'))} | {cratio} | "
            f"{_fmt_m(r['qimg_rss_kib'])} / {_fmt_m(r.get('qemu_rss_kib'))} | "
            f"{r.get('measured', '?')}, {r.get('load', '?')} |")


def _section(scale: str, sec: dict) -> list[str]:
    s = float(scale)
    gib = lambda x: f"{x * s / 4:g} GiB"  # noqa: E731
    lines = [
        f"## Scale {scale}",
        "",
        f"- W1 = {gib(4)} sparse raw ({gib(1)} data, {gib(0.25)} written zeros); W2 = {gib(1)} dense; "
        f"W3 = W1 as qcow2; W4 = overlay on W3 with {50 * s:g} MiB written; "
        f"W5 = W1 as qcow2 with 4 KiB clusters ({int(65536 * s):,} allocated) and one snapshot",
        f"- measured {sec.get('written', '?')}, load average (1 min) at start / end: "
        f"{sec.get('load', ['?', '?'])[0]} / {sec.get('load', ['?', '?'])[1]}",
        f"- command: `{sec.get('command', '?')}`",
    ]
    loads = [float(x) for x in sec.get("load", []) if x not in ("?", None)]
    loads += [float(r["load"]) for r in sec["rows"] if r.get("load") not in (None, "?")]
    if loads and max(loads) > 2 * (os.cpu_count() or 1):
        lines.append(f"- **measured on an overloaded machine** (load average up to {max(loads):.0f} on "
                     f"{os.cpu_count()} CPUs): wall times here mostly measure waiting for a time slice, and the "
                     "two-threaded side (qimg) loses most; the CPU ratio column is the comparison that holds")
    lines += [
        "",
        "| case | pairs | qimg wall | qemu-img wall | **ratio** | best of qimg / qemu-img | CPU qimg / qemu-img "
        "| CPU ratio | peak RSS qimg / qemu-img | measured (UTC), load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r) for r in sec["rows"]]
    floor = next((r for r in sec["rows"] if r["name"].startswith("start-up: python -c 'import click'")
                  and "qimg_s" in r), None)
    if floor:
        meta = [r for r in sec["rows"] if "qimg_s" in r and r["name"].split(" ")[0] in ("info", "map", "measure",
                                                                                         "snapshot")
                and "W3" in r["name"]]
        if meta:
            lines += ["", f"Against the `import click` floor ({_fmt_s(floor['qimg_s'])} wall, "
                      f"{_fmt_s(floor['qimg_cpu_s'])} CPU), wall / CPU: " + ", ".join(
                          f"{r['name']} {r['qimg_s'] / floor['qimg_s']:.2f}x / "
                          f"{r['qimg_cpu_s'] / floor['qimg_cpu_s']:.2f}x" for r in meta) + "."]
    return lines + [""]


def write_results(data: dict) -> str:
    lines = [
        "# Benchmarks: qimg vs qemu-img",
        "",
        f"- machine: {machine_text()}",
        f"- packages: {_versions()}",
        f"- oracle: {qemu_version()}",
        "- method: alternating runs (qimg, qemu-img, ...) after one untimed warm-up each, output deleted "
        "before every run; times are medians, *ratio* is the median of per-pair ratios qimg/qemu-img; "
        "CPU is user+system time and *CPU ratio* the median of per-pair CPU ratios (steadier than wall time on a "
        "loaded machine); RSS is the peak resident set (`/usr/bin/time -f %M`).  qimg runs as "
        "`python -m qimg` from compiled bytecode (`compileall`).  The machine is shared with other jobs: "
        "the load average is recorded per scale and per row.",
        "- workloads (scale S): W1 = S GiB sparse raw, S/4 GiB random data in 64 KiB-4 MiB extents + S/16 GiB "
        "written zeros; W2 = S/4 GiB dense random raw; W3 = W1 converted to qcow2 by qemu-img; W4 = a qcow2 "
        "overlay on W3 with 50*S MiB written in 1 MiB pieces; W5 = W1 converted to qcow2 with 4 KiB clusters "
        "(65536*S allocated) plus one internal snapshot; W1 (vdi/vpc/vhdx/vmdk) = W1 converted by qemu-img.  "
        "rebase runs on a fresh copy of W4 each time, commit on fresh copies of W4 and of W3 as its base; "
        "convert -n writes into an empty qcow2 created (untimed) before each run.",
        "",
        "Targets (issue 17): every uncompressed convert <= 1.0x at scale 4 and <= 1.3x at scale 1; -c zlib "
        "<= 0.55x and zstd <= 0.6x at every scale; streamOptimized VMDK <= 0.2x; info/map/measure/snapshot -l "
        "of W3 at scale 1 <= 1.3x the `import click` floor; check and map of W5 at scale 4 <= 2x qemu-img; "
        "rebase (safe), commit and convert -n <= 1.0x at scale 4; peak RSS of any convert <= 64 MiB.",
        "",
    ]
    for scale in sorted(data, key=float):
        lines += _section(scale, data[scale])
    lines += [NOTES]
    return "\n".join(lines)


def _compile() -> None:
    """Byte-compile qimg once so every run loads .pyc files (this machine may set PYTHONDONTWRITEBYTECODE)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "qimg")], env=env, check=True)


def run_scale(args, pairs: int, wanted: list) -> dict:
    qimg_cmd = [sys.executable, "-m", "qimg"]
    qemu_cmd = ["qemu-img"]
    results = []
    load0 = f"{os.getloadavg()[0]:.2f}"
    for case in CASES:
        if wanted and not any(w in case.name.lower() for w in wanted):
            continue
        if case.slow and args.quick and not wanted:
            results.append({"name": case.name, "skipped": "slow (--quick)"})
            continue
        missing = _missing_formats(case)
        if missing:
            results.append({"name": case.name, "skipped": "no " + ", ".join(missing) + " yet"})
            print(f"{case.name}: skipped ({results[-1]['skipped']})", file=sys.stderr)
            continue
        print(f"[scale {SCALE:g}] {case.name} ...", file=sys.stderr, flush=True)
        try:
            r = run_case(case, pairs, qimg_cmd, qemu_cmd)
        except RuntimeError as e:
            r = {"name": case.name, "skipped": f"failed: {str(e).splitlines()[-1][:120]}"}
        r["measured"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        r["load"] = f"{os.getloadavg()[0]:.1f}"
        results.append(r)
        if "skipped" not in r:
            print(f"  qimg {_fmt_s(r['qimg_s'])} ({_fmt_m(r['qimg_rss_kib'])})  qemu-img {_fmt_s(r.get('qemu_s'))}"
                  f"  ratio {r.get('ratio', 0):.2f}  {r.get('ratios', '')}", file=sys.stderr, flush=True)
    return {"written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load": [load0, f"{os.getloadavg()[0]:.2f}"], "rows": results}


def main(argv=None) -> int:
    global SCALE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="4", help="workload scale(s), comma-separated (0.25, 1, 4; default 4)")
    ap.add_argument("--quick", action="store_true", help="2 pairs per case, slow cases skipped")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per case (default 5, --quick 2)")
    ap.add_argument("--cases", default="", help="comma-separated substrings of case names to run")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--output", default=str(HERE / "RESULTS.md"), help="results file ('-' for none)")
    ap.add_argument("--json", default=str(HERE / "results.json"),
                    help="raw results as JSON (default benchmarks/results.json; '-' for none)")
    ap.add_argument("--render", action="store_true", help="only rewrite the results file from the JSON results")
    ap.add_argument("--update", action="store_true",
                    help="keep the other rows of the previous results of the scale, replace only the cases run now")
    args = ap.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name:45s} needs={','.join(c.needs) or '-':8s} {'slow' if c.slow else ''}")
        return 0
    if args.render:
        text = write_results(json.loads(Path(args.json).read_text()))
        if args.output != "-":
            write_section("run", text, Path(args.output))
        print(text)
        return 0
    if shutil.which("qemu-img") is None:
        print("qemu-img is required for the benchmarks", file=sys.stderr)
        return 2
    pairs = args.pairs or (2 if args.quick else 5)
    wanted = [w.strip().lower() for w in args.cases.split(",") if w.strip()]
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    _compile()
    data = {}
    if args.json != "-" and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        data = old if isinstance(old, dict) else {}
    for scale in [x.strip() for x in args.scale.split(",") if x.strip()]:
        SCALE = float(scale)
        key = f"{SCALE:g}"
        sec = run_scale(args, pairs, wanted)
        sec["command"] = f"python benchmarks/run.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip()
        if args.update and key in data:
            # rows of cases not run now come from the previous results, in table order
            old = {r["name"]: r for r in data[key]["rows"]}
            new = {r["name"]: r for r in sec["rows"]}
            sec["rows"] = [new.get(c.name) or old.get(c.name) for c in CASES if c.name in new or c.name in old]
        data[key] = sec
        if args.json and args.json != "-":
            Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        if args.output != "-":
            write_section("run", write_results(data), Path(args.output))
    print(write_results(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
