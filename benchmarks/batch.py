#!/usr/bin/env python3
"""qimg batch against the ways people script fleets today (issue targets: >= 1.0x the throughput of
`xargs -P 2 qemu-img convert`, >= 1.5x a shell loop of `qimg convert`, <= 20 ms scheduler overhead per job).

Workload: 100 images of 64 MiB (raw, qcow2 and vmdk in turn), each with 16 MiB of random data in four
extents, converted to qcow2 by
- `qimg batch --workers 2` (its embedded LocalCluster of two worker threads; interpreter start, Dask's
  import, cluster start-up and shutdown included),
- `xargs -P 2 qemu-img convert -O qcow2`,
- a shell loop calling `qimg convert -O qcow2` once per image.
Outputs are deleted between runs; batch and xargs runs alternate (`--runs` of each), the slow shell loop
runs `--loop-runs` times.  Scheduler overhead: 200 `info` jobs on a running 2-worker cluster; per job,
(wall time - job time / workers) / jobs.  The load average is recorded before and after: on a shared
machine the ratios move with it.

    python benchmarks/batch.py [--images 100] [--runs 3] [--loop-runs 1]   # writes its section of RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work" / "batch"
sys.path.insert(0, str(ROOT))

from benchmarks.sections import fmt_s, machine_line, median, write_section  # noqa: E402

MiB = 1 << 20
FORMATS = ("raw", "qcow2", "vmdk")


def build(n: int) -> list[Path]:
    import numpy as np

    src = WORK / "src"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        fmt = FORMATS[i % 3]
        path = src / f"img{i:03d}.{fmt}"
        out.append(path)
        if path.exists():
            continue
        raw = src / "tmp.raw"
        with open(raw, "wb") as f:
            f.truncate(64 * MiB)
            for k in range(4):  # 4 extents of 4 MiB: a quarter allocated
                os.pwrite(f.fileno(), rng.bytes(4 * MiB), k * 16 * MiB + int(rng.integers(0, 8)) * MiB)
        if fmt == "raw":
            raw.rename(path)
        else:
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(path)], check=True)
            raw.unlink()
    return out


def fresh_out() -> Path:
    out = WORK / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def run_batch(images, env) -> float:
    out = fresh_out()
    jobs = WORK / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"id": p.stem, "op": "convert", "src": str(p), "fmt": p.suffix[1:],
                                        "dst": str(out / (p.stem + ".qcow2")), "out_fmt": "qcow2"}) + "\n"
                            for p in images))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qimg", "batch", "--workers", "2", "--results", str(WORK / "results.jsonl"),
                    str(jobs)], check=True, env=env)
    return time.perf_counter() - t


def _timed_over_list(images, env, command: str) -> float:
    """Seconds ``command`` (a shell line reading "FMT SRC DST" lines from the list file) takes."""
    out = fresh_out()
    lst = WORK / "list.txt"
    lst.write_text("".join(f"{p.suffix[1:]} {p} {out / (p.stem + '.qcow2')}\n" for p in images))
    t = time.perf_counter()
    subprocess.run(command.format(list=lst), shell=True, check=True, env=env)
    return time.perf_counter() - t


def run_xargs(images, env) -> float:
    return _timed_over_list(images, env,
                            "xargs -P 2 -n 3 sh -c 'qemu-img convert -f \"$0\" -O qcow2 \"$1\" \"$2\"' < {list}")


def run_loop(images, env) -> float:
    return _timed_over_list(images, env, f"while read f s d; do {sys.executable} -m qimg convert -f \"$f\" -O qcow2 "
                                         "\"$s\" \"$d\" || exit 1; done < {list}")


def overhead(images, n_jobs: int = 200) -> tuple[float, float, float]:
    """(ms of scheduler overhead per info job, ms of job time per job, cluster start seconds)."""
    import qimg.batch

    t = time.perf_counter()
    client, cluster = qimg.batch.connect(None, workers=2)  # as qimg batch starts it
    start = time.perf_counter() - t
    try:
        jobs = [{"id": str(i), "op": "info", "src": str(images[i % len(images)])} for i in range(n_jobs)]
        list(qimg.batch.run(jobs[:4], client=client))  # warm the workers' imports
        t = time.perf_counter()
        results = list(qimg.batch.run(jobs, client=client))
        wall = time.perf_counter() - t
    finally:
        client.close()
        cluster.close()
    assert all(r["status"] == "ok" for r in results), [r for r in results if r["status"] != "ok"][:1]
    busy = sum(r["seconds"] for r in results)
    return (wall - busy / 2) / n_jobs * 1000, busy / n_jobs * 1000, start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--loop-runs", type=int, default=1)
    args = ap.parse_args()
    images = build(args.images)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    times = {"batch": [], "xargs": [], "loop": []}
    machine = machine_line()
    for _ in range(args.runs):
        times["xargs"].append(run_xargs(images, env))
        times["batch"].append(run_batch(images, env))
    for _ in range(args.loop_runs):
        times["loop"].append(run_loop(images, env))
    shutil.rmtree(WORK / "out", ignore_errors=True)
    per_job, job_ms, start = overhead(images)
    b, x, loop = (median(times[k]) for k in ("batch", "xargs", "loop"))
    load_after = os.getloadavg()[0]
    each = "; ".join(f"{k}: {', '.join(f'{t:.2f}' for t in times[k])} s" for k in ("batch", "xargs", "loop"))
    total = args.images * 64
    text = f"""## Batch: qimg batch on Dask (benchmarks/batch.py)

- {machine}; load average {load_after:.2f} at the end
- workload: {args.images} images of 64 MiB (raw, qcow2, vmdk in turn; 16 MiB of random data each, in 4 extents)
  converted to qcow2; {args.runs} alternating run(s) of batch and xargs, {args.loop_runs} of the loop, the median
  shown; throughput in guest MiB per second.  Every run: {each}.
- targets: batch >= 1.0x the throughput of `xargs -P 2 qemu-img convert`, >= 1.5x a shell loop of `qimg convert`;
  scheduler overhead <= 20 ms per job.

| method | wall | throughput | **batch speed-up** |
|---|---|---|---|
| `qimg batch --workers 2` (2 worker threads, start-up included) | {fmt_s(b)} | {total / b:.0f} MiB/s | - |
| `xargs -P 2 qemu-img convert -O qcow2` | {fmt_s(x)} | {total / x:.0f} MiB/s | **{x / b:.2f}x** |
| shell loop of `qimg convert -O qcow2` | {fmt_s(loop)} | {total / loop:.0f} MiB/s | **{loop / b:.2f}x** |

Scheduler overhead: **{per_job:.1f} ms per job** (200 `info` jobs on a running 2-worker LocalCluster, started
as `qimg batch` starts it; {job_ms:.1f} ms of work per job inside the worker; the cluster took {start:.1f} s to start).
"""
    write_section("batch", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
