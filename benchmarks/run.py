#!/usr/bin/env python3
"""Side-by-side timings of qimg against qemu-img (see ../shared/PERFORMANCE.md).

Usage:
    python benchmarks/run.py                 # all cases, 5 pairs each, writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick         # 2 pairs, slow cases skipped
    python benchmarks/run.py --cases raw     # only cases whose name contains "raw" (comma-separated list)
    python benchmarks/run.py --list          # show the case table
    python benchmarks/run.py --cases vdi --update   # re-measure some cases, keep the other rows

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


def make_w1(path: Path) -> None:
    """4 GiB sparse raw: 1 GiB random data in scattered 64 KiB-4 MiB extents, 256 MiB written zeros."""
    size = 4 * GiB
    rng = _rng(1)
    # extents on a 64 KiB grid; draw lengths until the budgets are met, then place them without overlap
    data_budget, zero_budget = 1 * GiB, 256 * MiB
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
    """1 GiB dense random raw."""
    rng = _rng(2)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_random(fd, 0, 1 * GiB, rng)
    finally:
        os.close(fd)


def make_w3(path: Path) -> None:
    """W1 converted to qcow2 by qemu-img."""
    w1 = workload("W1")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(w1), str(path)], check=True)


def make_w4(path: Path) -> None:
    """A qcow2 overlay on W3 with 200 MiB written (in 1 MiB pieces spread over the disk)."""
    w3 = workload("W3")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(w3), str(path)],
                   check=True)
    cmds = []
    rng = _rng(4)
    for off in sorted(int(x) for x in rng.choice(4 * 1024, 200, replace=False)):
        cmds += ["-c", f"write -P {off % 255 + 1} {off}M 1M"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True, stdout=subprocess.DEVNULL)


def _from_w1(fmt):
    def make(path: Path) -> None:
        w1 = workload("W1")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(w1), str(path)], check=True)
    return make


WORKLOADS = {"W1": ("w1.raw", make_w1), "W2": ("w2.raw", make_w2), "W3": ("w3.qcow2", make_w3),
             "W4": ("w4.qcow2", make_w4), "W1vdi": ("w1.vdi", _from_w1("vdi")),
             "W1vpc": ("w1.vpc", _from_w1("vpc")), "W1vhdx": ("w1.vhdx", _from_w1("vhdx")),
             "W1vmdk": ("w1.vmdk", _from_w1("vmdk"))}
#: bump when a generator changes so old files are rebuilt
WORKLOAD_VERSION = 1


def workload(name: str) -> Path:
    """The path of a workload, building it on first use."""
    fname, maker = WORKLOADS[name]
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


def _convert(fmt, src="W1", sfmt="raw", extra=()):
    argv = ["convert", "-f", sfmt, "-O", fmt, *extra, "{%s}" % src, "{out}"]
    return argv, list(argv)


def _case(name, fmt, src="W1", sfmt="raw", extra=(), needs=(), **kw):
    q, e = _convert(fmt, src, sfmt, extra)
    return Case(name, (src,), q, e, needs=tuple(needs), **kw)


CASES: list[Case] = [
    _case("convert W1 -O raw", "raw"),
    _case("convert W2 -O raw", "raw", src="W2"),
    Case("info W1 (raw)", ("W1",), ["info", "-f", "raw", "{W1}"], ["info", "-f", "raw", "{W1}"]),
    Case("info W1 (probed)", ("W1",), ["info", "{W1}"], ["info", "{W1}"]),
    Case("--help", (), ["--help"], ["--help"]),
    # formats that land later are skipped until their driver imports
    _case("convert W1 -O qcow2", "qcow2", needs=("qcow2",)),
    _case("convert W2 -O qcow2", "qcow2", src="W2", needs=("qcow2",)),
    _case("convert W3 (qcow2) -O raw", "raw", src="W3", sfmt="qcow2", needs=("qcow2",)),
    Case("info W3 (qcow2)", ("W3",), ["info", "{W3}"], ["info", "{W3}"], needs=("qcow2",)),
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


def _run(argv, out: Path | None):
    """Run argv once; returns (wall seconds, peak RSS KiB, CPU seconds user+system)."""
    if out is not None:
        _remove(out)
        os.sync()  # let the filesystem finish discarding the old output before the clock starts
    env = dict(os.environ)
    env.pop("QIMG_DEBUG", None)
    # ru_maxrss of a child forked from this (big) process starts at our own RSS, so measure through
    # /usr/bin/time, whose tiny process is the one that forks the command
    rss_file = WORK / "rss.txt"
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
    out = WORK / "out.img"
    paths["out"] = str(out)
    uses_out = any("{out}" in a for a in case.qimg)
    a_argv = qimg_cmd + _expand(case.qimg, paths)
    b_argv = qemu_cmd + _expand(case.qemu, paths) if case.qemu else None
    n = case.pairs if case.pairs is not None else pairs
    n = min(n, pairs) if case.pairs is not None else n
    n = max(n, 1)
    # warm-up (untimed): input into the page cache, code paths into memory (slow cases: input only)
    if case.slow:
        for w in case.inputs:
            _warm(Path(paths[w]))
    else:
        _run(a_argv, out if uses_out else None)
        if b_argv:
            _run(b_argv, out if uses_out else None)
    ta, tb, ra, rb, ca, cb, ratios = [], [], [], [], [], [], []
    for _ in range(n):
        t, r, c = _run(a_argv, out if uses_out else None)
        ta.append(t)
        ra.append(r)
        ca.append(c)
        if b_argv:
            t2, r2, c2 = _run(b_argv, out if uses_out else None)
            tb.append(t2)
            rb.append(r2)
            cb.append(c2)
            ratios.append(t / t2)
    if uses_out:
        _remove(out)
    res = {"name": case.name, "pairs": n, "qimg_s": statistics.median(ta), "qimg_min_s": min(ta),
           "qimg_cpu_s": statistics.median(ca), "qimg_rss_kib": max(ra), "qimg_argv": " ".join(["qimg"] + case.qimg)}
    if b_argv:
        res.update(qemu_s=statistics.median(tb), qemu_min_s=min(tb), qemu_cpu_s=statistics.median(cb),
                   qemu_rss_kib=max(rb), ratio=statistics.median(ratios), ratios=[round(x, 3) for x in ratios])
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

- Every qimg run pays a fixed start-up: the interpreter and `site` (~30 ms here, of which a
  CA-bundle `.pth` hook of this machine and the editable-install finder of `pip install -e` take
  ~15 ms; a plain `pip install .` has no finder), click (~12 ms) and qimg's own modules (~10 ms).
  qemu-img starts in ~5 ms.  That is all of `info`/`--help` and roughly 0.1x of the raw
  convert ratios.
- raw and new qcow2 targets: two worker threads take 2 MiB chunks, read them into page-aligned
  buffers, find zero blocks (first/last word of each 4 KiB block from a strided memoryview;
  `bytes.startswith` as a copy-free memcmp for zero runs; numpy only for chunks with many
  data/zero transitions) and write the data runs themselves, in whatever order they finish.  A
  qcow2 that convert has just created reserves its clusters under a lock (`direct_map`) and the
  data goes straight to the host file.  numpy is not imported for such a copy, hence ~22 MiB
  peak RSS.  Holes are found with SEEK_DATA/SEEK_HOLE.
- The data is written from the buffer it was scanned in.  On this ext4 (no reflinks)
  `os.copy_file_range` is a page-by-page splice: 1 GiB takes ~270 ms against ~230 ms for a read
  plus a write from the buffer, so after a zero scan it only added work.  It is used with `-C`,
  which (as in qemu-img) skips the zero scan.
- Two writers to one file contend for its inode lock (ext4 buffered writes take it exclusively):
  the kernel spins (`rwsem_spin_on_owner`), which is why qimg's CPU column is above its wall time
  on raw targets.  Serialising the writes in Python saved that CPU but cost ~20 ms of wall time.
- Other output formats (and `-c`) go through the same engine with the writes done in guest
  order by the calling thread.  Zero extents do not stall that pipeline when the target already
  reads as zeros: before, every hole drained it, and `-c` kept only ~1.4 of the 2 cores busy.
- vdi/vpc/vhdx: their block tables are Python ``array`` objects up to 65536 entries (numpy only
  for bigger images), so converting a W1-sized image to or from them does not import numpy
  (~0.15 s of CPU, ~10 MiB of RSS); a raw source caches its file size and its last
  SEEK_DATA/SEEK_HOLE run (one fstat per open instead of three per extent query).
- The machine is shared with other jobs (see the load average): single pairs swing by 2x and
  more.  Compare the ratio (median of per-pair ratios) and the CPU column, which is steadier.
"""


def write_results(results: list[dict], args) -> str:
    load = getattr(args, "load", None) or ("?", "?")
    lines = [
        "# Benchmarks: qimg vs qemu-img",
        "",
        f"- written: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} "
        "(each row says when it was measured, and the load average then)",
        f"- machine: {machine_text()}",
        f"- oracle: {qemu_version()}",
        f"- load average (1 min) at start / end: {load[0]} / {load[1]} (other jobs on the machine add noise; "
        "the alternating pairs and the median of per-pair ratios are there to cancel it)",
        f"- last command: `python benchmarks/run.py {' '.join(sys.argv[1:])}`".rstrip(),
        "- method: alternating runs (qimg, qemu-img, ...) after one untimed warm-up each, output deleted "
        "before every run; times are medians, *ratio* is the median of per-pair ratios qimg/qemu-img; "
        "CPU is user+system time; RSS is the peak resident set (`/usr/bin/time -f %M`).",
        "- workloads: W1 = 4 GiB sparse raw, 1 GiB random data in 64 KiB-4 MiB extents + 256 MiB written "
        "zeros; W2 = 1 GiB dense random raw; W3 = W1 converted to qcow2 by qemu-img; "
        "W1 (vdi/vpc/vhdx/vmdk) = W1 converted to that format by qemu-img.",
        "",
        "| case | pairs | qimg wall | qemu-img wall | **ratio** | best of qimg / qemu-img | CPU qimg / qemu-img "
        "| peak RSS qimg / qemu-img | measured (UTC), load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['name']} | - | skipped: {r['skipped']} | | | | | | |")
            continue
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        lines.append(f"| {r['name']} | {r['pairs']} | {_fmt_s(r['qimg_s'])} | {_fmt_s(r.get('qemu_s'))} | "
                     f"**{ratio}** | {_fmt_s(r['qimg_min_s'])} / {_fmt_s(r.get('qemu_min_s'))} | "
                     f"{_fmt_s(r['qimg_cpu_s'])} / {_fmt_s(r.get('qemu_cpu_s'))} | "
                     f"{_fmt_m(r['qimg_rss_kib'])} / {_fmt_m(r.get('qemu_rss_kib'))} | "
                     f"{r.get('measured', '?')}, {r.get('load', '?')} |")
    lines += ["", "Targets (PERFORMANCE.md): convert W1 -O raw <= 1.2x qemu-img (aim 1.0x); peak memory of "
              "convert <= 150 MiB; info and --help < 100 ms.", "", NOTES]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 pairs per case, slow cases skipped")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per case (default 5, --quick 2)")
    ap.add_argument("--cases", default="", help="comma-separated substrings of case names to run")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--output", default=str(HERE / "RESULTS.md"), help="results file ('-' for none)")
    ap.add_argument("--json", default=str(HERE / "results.json"),
                    help="raw results as JSON (default benchmarks/results.json; '-' for none)")
    ap.add_argument("--update", action="store_true",
                    help="keep the other rows of the previous results.json, replace only the cases run now")
    args = ap.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name:40s} needs={','.join(c.needs) or '-':8s} {'slow' if c.slow else ''}")
        return 0
    if shutil.which("qemu-img") is None:
        print("qemu-img is required for the benchmarks", file=sys.stderr)
        return 2
    pairs = args.pairs or (2 if args.quick else 5)
    wanted = [w.strip().lower() for w in args.cases.split(",") if w.strip()]
    qimg_cmd = [sys.executable, "-m", "qimg"]
    qemu_cmd = ["qemu-img"]
    os.environ.setdefault("PYTHONPATH", str(ROOT))
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
        print(f"{case.name} ...", file=sys.stderr, flush=True)
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
    args.load = (load0, f"{os.getloadavg()[0]:.2f}")
    if args.update and args.json != "-" and Path(args.json).exists():
        # rows of cases not run now come from the previous results, in table order
        old = {r["name"]: r for r in json.loads(Path(args.json).read_text())}
        new = {r["name"]: r for r in results}
        results = [new.get(c.name) or old.get(c.name) for c in CASES if c.name in new or c.name in old]
    text = write_results(results, args)
    if args.output != "-":
        Path(args.output).write_text(text)
    if args.json and args.json != "-":
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
