#!/usr/bin/env python3
"""convert over HTTP against convert of the same local file (issue target: <= 1.5x).

Workload: a 1 GiB qcow2 with 256 MiB allocated (random data in extents of 64 KiB to 4 MiB), served by
nginx on 127.0.0.1.  Each pair converts it to raw from the local path and from the URL, alternating,
after one untimed warm-up of each; the ratio is the median of the per-pair ratios.  The requests
nginx logged for one convert are counted against the allocated extents and clusters of the image.

    python benchmarks/remote.py [--pairs 5]        # writes its section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work" / "remote"
sys.path.insert(0, str(ROOT))

from benchmarks.sections import fmt_s, machine_line, median, write_section  # noqa: E402
from tests.servers import Nginx  # noqa: E402

MiB = 1 << 20


def build(path: Path) -> int:
    """The workload image; returns the number of allocated extents."""
    import numpy as np

    raw = path.with_suffix(".raw")
    rng = np.random.default_rng(12)
    extents = 0
    with open(raw, "wb") as f:
        f.truncate(1 << 30)
        done, pos = 0, 0
        while done < 256 * MiB:
            n = int(rng.integers(1, 65)) * 64 * 1024
            n = min(n, 256 * MiB - done)
            pos += int(rng.integers(1, 32)) * 64 * 1024  # a gap before each extent
            os.pwrite(f.fileno(), rng.bytes(n), pos)
            pos += n
            done += n
            extents += 1
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return extents


def timed(argv, env) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    img = WORK / "w.qcow2"
    count_file = WORK / "w.extents"
    if not img.exists() or not count_file.exists():
        count_file.write_text(str(build(img)))
    extents = int(count_file.read_text())
    out = WORK / "out.raw"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = Nginx(WORK, WORK / "nginx")
    try:
        url = server.url(img.name)
        local = [sys.executable, "-m", "qimg", "convert", "-O", "raw", str(img), str(out)]
        remote = [sys.executable, "-m", "qimg", "convert", "-O", "raw", url, str(out)]
        before = server.count(img.name)
        for argv in (local, remote):  # warm-up (page cache, nginx)
            timed(argv, env)
            out.unlink()
        requests = server.count(img.name) - before
        pairs = []
        for _ in range(args.pairs):
            a = timed(local, env)
            out.unlink()
            b = timed(remote, env)
            out.unlink()
            pairs.append((a, b))
    finally:
        server.close()
    ratio = median([b / a for a, b in pairs])
    clusters = 256 * MiB // (64 << 10)
    text = f"""## Remote sources: convert over HTTP (benchmarks/remote.py)

- {machine_line()}
- workload: 1 GiB qcow2, 256 MiB allocated in {extents} extents (= {clusters} clusters of 64 KiB), served by
  nginx on 127.0.0.1; `qimg convert -O raw` from the local file vs from the URL, alternating, {args.pairs} pairs.
- target: HTTP <= 1.5x local.

| case | local | HTTP | **ratio** | HTTP requests per convert |
|---|---|---|---|---|
| convert 1 GiB qcow2 (256 MiB allocated) -O raw | {fmt_s(median([a for a, _ in pairs]))} | \
{fmt_s(median([b for _, b in pairs]))} | **{ratio:.2f}x** | {requests} ({extents} extents, {clusters} clusters) |
"""
    write_section("remote", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
