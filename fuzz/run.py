#!/usr/bin/env python3
"""Coverage-guided fuzzing of qimg's format parsers with atheris, one format or all of them.

    python fuzz/run.py --format qcow2 --runs 100000
    python fuzz/run.py --format all --runs 100000          # every format, one after the other

Each input is written as an image of the format, then opened, described (info), mapped and read in
full (harness.py).  Seeds are small images made by qemu-img (and qimg for cow; the shared corpus for
bochs, cloop and dmg), kept under fuzz/corpus/FORMAT/ with what the fuzzer finds.  A crash is an
exception that is not a QimgError, a run over 2 s or a process over the memory limit: libFuzzer
writes the input to fuzz/crashes/FORMAT-*, and the campaign goes on from where it stopped until the
number of executions is reached.  The totals are appended to fuzz/results.jsonl.

Needs atheris (``pip install '.[fuzz]'``) and qemu-img for the seeds.  Not part of the test run.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.environ.get("QIMG_SHARED_IMAGES", os.path.join(ROOT, "..", "shared", "images"))

FORMATS = ("qcow2", "qcow", "qed", "vdi", "vmdk", "vpc", "vhdx", "parallels", "luks", "cow", "bochs", "cloop",
           "dmg")
#: one execution may raise the process's peak memory by this much (checked by the child after each
#: run: libFuzzer's own limit counts the whole process, which the instrumented interpreter slowly grows)
RUN_MEMORY_MB = 256
#: libFuzzer's limit on the whole process, a backstop; each child is restarted after CHILD_RUNS runs
RSS_LIMIT_MB = 2048
CHILD_RUNS = 25000
MAX_LEN = 64 << 10
#: vhdx puts its structures at fixed places over 8 MiB (headers, region tables, log, metadata, BAT):
#: its inputs are those 64 KiB blocks back to back, laid out again at these offsets before each run
VHDX_LAYOUT = (0x0, 0x10000, 0x20000, 0x30000, 0x40000, 0x200000, 0x300000, 0x310000)
VHDX_FILE_SIZE = 8 << 20


def max_len(fmt: str) -> int:
    return len(VHDX_LAYOUT) * (64 << 10) if fmt == "vhdx" else MAX_LEN


def expand(fmt: str, data: bytes) -> bytes | list:
    """The image bytes for an input: itself, or for vhdx a list of (offset, block) placed in a sparse file."""
    if fmt != "vhdx":
        return data
    return [(off, data[i * 65536:(i + 1) * 65536]) for i, off in enumerate(VHDX_LAYOUT) if i * 65536 < len(data)]


def compact(fmt: str, image: bytes) -> bytes:
    """The inverse of ``expand`` for a seed image."""
    if fmt != "vhdx":
        return image[:MAX_LEN]
    return b"".join(image[off:off + 65536].ljust(65536, b"\0") for off in VHDX_LAYOUT).rstrip(b"\0")


# ----------------------------------------------------------------------------------------------- seeds
def _sh(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _qemu_io(path, fmt, *cmds, cwd):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    _sh(*args, path, cwd=cwd)


def _make_seeds(fmt: str, tmp: str) -> list[str]:
    """Small valid images of ``fmt`` (several shapes where the format has them)."""
    q = "qemu-img"
    writes = ("write -P 0xa5 0 4k", "write -P 0x5a 12k 1k")
    out = []

    def made(name, *create, data=True, fmt_=fmt):
        _sh(q, "create", "-q", "-f", fmt_, *create, name, "64K", cwd=tmp)
        if data:
            _qemu_io(name, fmt_, *writes, cwd=tmp)
        out.append(name)

    if fmt == "qcow2":
        made("a.qcow2", "-o", "cluster_size=512")
        made("b.qcow2", "-o", "cluster_size=512,compat=0.10")
        made("c.qcow2", "-o", "cluster_size=16384,extended_l2=on")
        made("d.qcow2", "-o", "cluster_size=512,refcount_bits=1,lazy_refcounts=on")
        _sh(q, "create", "-q", "-f", "raw", "base.raw", "64K", cwd=tmp)
        made("e.qcow2", "-o", "cluster_size=512", "-b", "base.raw", "-F", "raw")
        _sh(q, "create", "-q", "-f", "raw", "src.raw", "64K", cwd=tmp)
        _qemu_io("src.raw", "raw", *writes, cwd=tmp)
        for name, ctype in (("f.qcow2", "zlib"), ("g.qcow2", "zstd")):
            _sh(q, "convert", "-c", "-O", "qcow2", "-o", f"cluster_size=512,compression_type={ctype}", "src.raw",
                name, cwd=tmp)
            out.append(name)
    elif fmt == "qcow":
        made("a.qcow")
    elif fmt == "qed":
        made("a.qed", "-o", "cluster_size=4096,table_size=2")
    elif fmt == "vdi":
        made("a.vdi")
        made("b.vdi", "-o", "static=on", data=False)
    elif fmt == "vmdk":
        _sh(q, "create", "-q", "-f", "raw", "src.raw", "64K", cwd=tmp)
        _qemu_io("src.raw", "raw", *writes, cwd=tmp)
        _sh(q, "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "src.raw", "a.vmdk", cwd=tmp)
        out.append("a.vmdk")
        made("b.vmdk")
        # a descriptor file with a flat extent beside it
        made("c.vmdk", "-o", "subformat=monolithicFlat", data=False)
    elif fmt == "vpc":
        made("a.vhd")
        made("b.vhd", "-o", "subformat=fixed", data=False)
    elif fmt == "vhdx":
        made("a.vhdx", "-o", "log_size=1M,block_size=1M")
    elif fmt == "parallels":
        made("a.hds", "-o", "cluster_size=4096")
    elif fmt == "luks":
        _sh(q, "create", "-q", "--object", "secret,id=s0,data=k", "-f", "luks", "-o",
            "key-secret=s0,iter-time=10", "a.luks", "64K", cwd=tmp)
        out.append("a.luks")
    elif fmt == "cow":
        _sh(sys.executable, "-m", "qimg", "create", "-q", "-f", "cow", "a.cow", "64K", cwd=tmp)
        out.append("a.cow")
    else:  # bochs, cloop, dmg: no writer anywhere; the shared corpus has small ones
        folder = os.path.join(SHARED, fmt)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
            src = os.path.join(folder, name)
            opener = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}.get(os.path.splitext(name)[1], open)
            with opener(src, "rb") as f:
                data = f.read(4 << 20)
            dst = os.path.join(tmp, name)
            with open(dst, "wb") as f:
                f.write(data)
            out.append(name)
    return [os.path.join(tmp, n) for n in out]


def prepare_corpus(fmt: str) -> str:
    """fuzz/corpus/FORMAT with the seeds in it (made once)."""
    corpus = os.path.join(HERE, "corpus", fmt)
    os.makedirs(corpus, exist_ok=True)
    if not os.listdir(corpus):
        with tempfile.TemporaryDirectory() as tmp:
            for path in _make_seeds(fmt, tmp):
                with open(path, "rb") as f:
                    data = f.read()
                with open(os.path.join(corpus, "seed-" + os.path.basename(path)), "wb") as f:
                    f.write(compact(fmt, data))
    return corpus


# ------------------------------------------------------------------------------------------ one process
def child(fmt: str, libfuzzer_args: list[str]) -> None:
    """Run atheris in this process (started by ``campaign``)."""
    import contextlib

    import atheris

    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    # coverage from the parser under test only (the core, ops and io add cost, not guidance)
    import qimg.core.registry as registry

    target = registry.FORMATS[fmt].split(":")[0]
    with atheris.instrument_imports(include=[target, "qimg.formats.spans", "qimg.crypto"]):
        registry.get_driver(fmt)  # the format's modules, instrumented
    import harness

    import qimg.core.chain  # noqa: F401
    import qimg.ops.info  # noqa: F401
    import qimg.ops.map  # noqa: F401

    workdir = tempfile.mkdtemp(prefix=f"qimg-fuzz-{fmt}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    path = os.path.join(workdir, "image." + fmt)
    devnull = open(os.devnull, "w")

    import resource

    def peak_mb() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10

    def one(data: bytes) -> None:
        before = peak_mb()
        try:
            _one(data)
        except BaseException:
            import traceback

            with open(os.path.join(HERE, "crashes", f"{fmt}-traceback-{os.getpid()}.txt"), "w") as f:
                traceback.print_exc(file=f)
            raise
        grown = peak_mb() - before
        if grown > RUN_MEMORY_MB:
            raise MemoryError(f"one run raised the peak memory by {grown} MiB (limit {RUN_MEMORY_MB} MiB)")

    def _one(data: bytes) -> None:
        image = expand(fmt, data)
        if isinstance(image, list):
            with open(path, "wb") as f:
                f.truncate(VHDX_FILE_SIZE)
                for off, block in image:
                    f.seek(off)
                    f.write(block)
            image = None
        # qimg's warnings go nowhere (a real file: atheris's alarm handler writes to sys.stderr's fd);
        # an uncaught exception leaves this block and atheris prints it
        with contextlib.redirect_stderr(devnull):
            harness.run_one(image, path, fmt) if image is not None else harness.run_file(path, fmt)

    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


# ------------------------------------------------------------------------------------------- campaign
_DONE = re.compile(r"^#(\d+)\s", re.M)


def campaign(fmt: str, runs: int, timeout: int) -> dict:
    """Run the fuzzer on ``fmt`` until ``runs`` executions are done; restart after each crash."""
    corpus = prepare_corpus(fmt)
    crashes = os.path.join(HERE, "crashes")
    os.makedirs(crashes, exist_ok=True)
    done, restarts, artifacts = 0, 0, []
    start = time.time()
    while done < runs:
        before = set(os.listdir(crashes))
        args = [f"-runs={min(runs - done, CHILD_RUNS)}", f"-max_len={max_len(fmt)}", f"-timeout={timeout}",
                f"-rss_limit_mb={RSS_LIMIT_MB}", f"-artifact_prefix={crashes}/{fmt}-", "-print_final_stats=1",
                corpus]
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", fmt, "--", *args],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           errors="replace", cwd=ROOT)
        counts = [int(n) for n in _DONE.findall(p.stderr)]
        stat = re.search(r"stat::number_of_executed_units:\s*(\d+)", p.stderr)
        ran = int(stat.group(1)) if stat else (max(counts) if counts else 0)
        done += ran
        new = sorted(n for n in set(os.listdir(crashes)) - before if n.startswith(fmt + "-"))
        if p.returncode != 0 or new:
            restarts += 1
            lines = [ln for ln in p.stderr.splitlines() if not ln.startswith(("#", "INFO: Instrumenting"))]
            tail = "\n".join(lines[-80:])
            artifacts.extend(new)
            with open(os.path.join(crashes, f"{fmt}-log-{restarts}.txt"), "w") as f:
                f.write(tail + "\n")
            print(f"[{fmt}] stopped after {ran} runs (status {p.returncode}); artifacts: {new}", flush=True)
            if ran == 0 and not new:
                print(p.stderr[-3000:], file=sys.stderr)
                break
    result = {"format": fmt, "runs": done, "restarts": restarts, "artifacts": artifacts,
              "seconds": round(time.time() - start, 1), "corpus": len(os.listdir(corpus)),
              "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    with open(os.path.join(HERE, "results.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return result


def triage(paths: list[str]) -> list[dict]:
    """Replay saved inputs, each in a fresh uninstrumented process, and judge them by the real limits."""
    out = []
    for path in paths:
        fmt = os.path.basename(path).split("-")[0]
        p = subprocess.run([sys.executable, os.path.join(HERE, "harness.py"), fmt, path], capture_output=True,
                           text=True, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=120)
        try:
            out.append(json.loads(p.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            out.append({"input": path, "format": fmt, "crash": True, "error": p.stderr[-2000:]})
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        fmt = argv[1]
        rest = argv[3:] if argv[2:3] == ["--"] else argv[2:]
        child(fmt, rest)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="all", help="a format name or 'all' (" + ", ".join(FORMATS) + ")")
    ap.add_argument("--runs", type=int, default=100000, help="executions per format")
    ap.add_argument("--replay", nargs="+", metavar="INPUT",
                    help="judge saved inputs (fuzz/crashes/FORMAT-*) uninstrumented instead of fuzzing")
    ap.add_argument("--timeout", type=int, default=10,
                    help="seconds before an instrumented run is saved as a possible hang (replayed uninstrumented: "
                         "a hang is a run over 2 s of CPU there)")
    args = ap.parse_args(argv)
    if args.replay:
        return 1 if any(r["crash"] for r in triage(args.replay)) else 0
    formats = FORMATS if args.format == "all" else tuple(args.format.split(","))
    for fmt in formats:
        if fmt not in FORMATS:
            ap.error(f"unknown format {fmt!r}")
    if shutil.which("qemu-img") is None:
        print("qemu-img is needed for the seeds", file=sys.stderr)
    results = [campaign(fmt, args.runs, args.timeout) for fmt in formats]
    return 1 if any(r["artifacts"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
