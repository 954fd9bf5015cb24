#!/usr/bin/env python3
"""What untrusted mode costs a legitimate image (issue target: `qimg --untrusted convert` within 5% of the
same convert without the flag).

Workloads: qcow2 images made by qemu-img (1 GiB virtual with 256 MiB of random data in 64 extents,
and a two-layer chain: an overlay with 64 MiB written over that base), converted to raw and to qcow2
with and without `--untrusted`, runs alternating, outputs deleted before every run.  Both the wall
and the CPU (user + system of the child) ratios are the medians of per-pair ratios.

    python benchmarks/untrusted.py [--pairs 7]      # writes its section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work" / "untrusted"
sys.path.insert(0, str(ROOT))

from benchmarks.sections import fmt_s, machine_line, median, write_section  # noqa: E402

MiB = 1 << 20


def build() -> tuple[Path, Path]:
    """The base qcow2 (256 MiB of data in 1 GiB) and an overlay on it, made once."""
    WORK.mkdir(parents=True, exist_ok=True)
    base, top = WORK / "base.qcow2", WORK / "top.qcow2"
    if not top.exists():
        raw = WORK / "base.raw"
        rng = random.Random(1)
        with open(raw, "wb") as f:
            f.truncate(1 << 30)
            for i in range(64):
                f.seek(i * 16 * MiB)
                f.write(rng.randbytes(4 * MiB))
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(base)], check=True)
        raw.unlink()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top)],
                       check=True)
        subprocess.run(["qemu-io", "-c", "write -P 7 100M 64M", str(top)], check=True, capture_output=True)
    return base, top


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall, cpu) seconds of one run of ``argv`` as a child process."""
    t = time.perf_counter()
    pid = subprocess.Popen(argv, stdout=subprocess.DEVNULL).pid
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({status})")
    return wall, usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=7)
    args = ap.parse_args(argv)
    base, top = build()
    out = WORK / "out"
    qimg = [sys.executable, "-m", "qimg"]
    rows = []
    for label, src, fmt in (("1 GiB qcow2 (256 MiB of data)", base, "raw"),
                            ("1 GiB qcow2 (256 MiB of data)", base, "qcow2"),
                            ("overlay (64 MiB) on that base", top, "raw")):
        walls, cpus, ratios_w, ratios_c = {True: [], False: []}, {True: [], False: []}, [], []
        for _ in range(args.pairs):
            pair = {}
            for untrusted in (False, True):
                out.unlink(missing_ok=True)
                cmd = qimg + (["--untrusted"] if untrusted else []) + ["convert", "-O", fmt, str(src), str(out)]
                pair[untrusted] = timed(cmd)
                walls[untrusted].append(pair[untrusted][0])
                cpus[untrusted].append(pair[untrusted][1])
            ratios_w.append(pair[True][0] / pair[False][0])
            ratios_c.append(pair[True][1] / pair[False][1])
        out.unlink(missing_ok=True)
        rows.append(f"| {label} -O {fmt} | {fmt_s(median(walls[False]))} | {fmt_s(median(walls[True]))} "
                    f"| **{median(ratios_w):.3f}x** | {median(ratios_c):.3f}x |")
    text = "\n".join([
        "## Untrusted mode: what `--untrusted` costs a legitimate image (benchmarks/untrusted.py)",
        "",
        f"- {machine_line()}",
        f"- {args.pairs} alternating pairs per row (without, with the flag); ratios are medians of per-pair ratios.",
        "- target: `qimg --untrusted convert` <= 1.05x the same convert without the flag.",
        "",
        "| convert | without | `--untrusted` | **wall ratio** | CPU ratio |",
        "|---|---|---|---|---|",
        *rows,
    ])
    write_section("untrusted", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
