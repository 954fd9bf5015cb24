#!/usr/bin/env python3
"""The library's stream against the command line: sequential ``Image.readinto`` with 4 MiB buffers of
W3 (the 4 GiB qcow2 holding 1 GiB of data) against ``qimg convert -O raw`` of the same image, plus
``import qimg`` and ``qimg.open(...).info()`` in-process.

Usage:  python benchmarks/library_read.py [--pairs 5]

Runs alternate (stream, convert, stream, convert, ...) after a warm-up of each; the ratio reported is
the median of the per-pair throughput ratios.  The convert output is deleted before every run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

BUF = 4 << 20


def stream_seconds(path: str) -> float:
    """Read the whole guest view with readinto into one page-aligned 4 MiB buffer."""
    import mmap

    import qimg

    buf = mmap.mmap(-1, BUF)
    view = memoryview(buf)
    start = time.perf_counter()
    with qimg.open(path, "qcow2") as img:
        while img.readinto(view):
            pass
    took = time.perf_counter() - start
    view.release()
    buf.close()
    return took


def convert_seconds(path: str, out: Path) -> float:
    """``qimg convert -f qcow2 -O raw`` as a user runs it (a new process)."""
    if out.exists():
        out.unlink()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qimg", "convert", "-f", "qcow2", "-O", "raw", path, str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    took = time.perf_counter() - start
    out.unlink()
    return took


def startup() -> tuple[float, float]:
    """Medians (ms) of ``python -c pass`` and ``python -c 'import qimg'``."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}

    def run(code: str) -> float:
        times = []
        for _ in range(20):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    bare = run("pass")
    return bare, run("import qimg")


def import_ms() -> float:
    """Median (ms) of ``import qimg`` timed inside fresh interpreters (start-up noise left out)."""
    code = "import time; t = time.perf_counter(); import qimg; print((time.perf_counter() - t) * 1000)"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    runs = [float(subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True,
                                 text=True).stdout) for _ in range(20)]
    return statistics.median(runs)


def info_ms(path: str) -> float:
    import qimg

    qimg.open(path).info()  # imports done once, as in a long-lived process
    times = []
    for _ in range(200):
        start = time.perf_counter()
        with qimg.open(path) as img:
            img.info()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    from run import WORK, workload

    w3 = str(workload("W3"))
    out = WORK / "library_read.raw"
    stream_seconds(w3)
    convert_seconds(w3, out)
    ratios, streams, converts = [], [], []
    for _ in range(args.pairs):
        s = stream_seconds(w3)
        c = convert_seconds(w3, out)
        streams.append(s)
        converts.append(c)
        ratios.append(c / s)  # throughput of the stream relative to convert's
    bare, imported = startup()
    print(f"W3 stream (readinto, 4 MiB): median {statistics.median(streams):.3f} s")
    print(f"W3 qimg convert -O raw:      median {statistics.median(converts):.3f} s")
    print(f"stream throughput / convert throughput: median {statistics.median(ratios):.2f} "
          f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"python -c pass {bare:.1f} ms; import qimg {imported:.1f} ms (+{imported - bare:.1f} ms); "
          f"import qimg timed in-process: {import_ms():.2f} ms")
    print(f"qimg.open(W3).info() in-process: median {info_ms(w3):.3f} ms")


if __name__ == "__main__":
    main()
