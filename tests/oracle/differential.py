"""Randomized differential comparison of qimg against qemu-img 7.2.

A seeded generator builds images with qemu-img and qemu-io (random formats among those qemu-img
writes, creation options, sizes, writes, zero writes, discards, compressed writes, snapshots and
backing chains), then runs the same read-side commands through both tools and compares exit code,
stdout and stderr:

    info --output=json [--backing-chain]   map --output=json   check --output=json
    compare                                measure -O FMT      convert -O raw (by sha256)

The same case for the same seed is built on every run, so a divergence is reproduced with
``python -m tests.oracle.differential --seed N --cases 1 --keep DIR``.  The fast subset in
``tests/oracle/test_differential.py`` runs a few dozen seeds; the long run::

    nice -n 19 python -m tests.oracle.differential --minutes 60 --seed 1000 --log diff.jsonl

records every case and every divergence (JSON lines) and prints the totals.

Normalisations (and why each is needed):

- the program name in messages: qemu-img writes ``qemu-img: ...``, qimg ``qimg: ...``;
- Debian's qemu-img lines asking for its optional dmg modules (``qemu: module block-... not found``);
- nothing else.  Both tools read the very same files, so names, ``actual-size`` and ``disk size``
  are the same bytes; ``convert`` writes to two different target names, and only the sha256 of the
  two targets is compared (the file names do not appear in convert's output).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
#: formats qemu-img 7.2 creates and qemu-io writes (luks needs a secret, handled below)
FORMATS = ("qcow2", "qcow2", "qcow2", "qed", "qcow", "vdi", "vmdk", "vpc", "vhdx", "parallels", "raw", "luks")
#: formats that record a backing file
BACKED = ("qcow2", "qed", "qcow", "vmdk")
SECRET = "secret,id=sec0,data=differential"
#: measure targets (and -o options for some)
MEASURE_TARGETS = ("qcow2", "qcow2", "raw", "qed", "vdi", "vmdk", "vhdx", "vpc", "parallels", "qcow", "luks")


@dataclass
class Layer:
    path: Path
    fmt: str
    opts: dict
    size: int
    ops: list = field(default_factory=list)


@dataclass
class Case:
    seed: int
    layers: list  # base first, the top image last
    notes: list = field(default_factory=list)

    @property
    def top(self) -> Layer:
        return self.layers[-1]

    def describe(self) -> str:
        parts = []
        for layer in self.layers:
            o = ",".join(f"{k}={v}" for k, v in layer.opts.items())
            parts.append(f"{layer.fmt}[{o}] size={layer.size} ops={layer.ops}")
        return " <- ".join(parts) + (f" notes={self.notes}" if self.notes else "")


def _run(argv, timeout=120):
    p = subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def _must(argv):
    rc, out, err = _run(argv)
    if rc != 0:
        raise BuildError(f"{' '.join(map(str, argv))}: {err.strip()}")
    return out


class BuildError(Exception):
    """qemu-img refused what the generator asked for (not a divergence: the case is skipped)."""


# --- building ---------------------------------------------------------------------------------------

def _format_options(rnd: random.Random, fmt: str) -> dict:
    o: dict = {}
    if fmt == "qcow2":
        compat = rnd.choice(["1.1", "1.1", "0.10"])
        o["compat"] = compat
        cs = rnd.choice([512, 4096, 16384, 65536, 65536, 2 * MiB])
        o["cluster_size"] = cs
        if compat == "1.1":
            if cs >= 16384 and rnd.random() < 0.3:
                o["extended_l2"] = "on"
            if rnd.random() < 0.3:
                o["refcount_bits"] = rnd.choice([1, 2, 4, 8, 32, 64])
            if rnd.random() < 0.2:
                o["lazy_refcounts"] = "on"
            if rnd.random() < 0.2:
                o["compression_type"] = "zstd"
        if rnd.random() < 0.15:
            o["preallocation"] = rnd.choice(["metadata", "falloc"])
    elif fmt == "qed":
        o["cluster_size"] = rnd.choice([4096, 65536, 1 * MiB])
        if rnd.random() < 0.3:
            o["table_size"] = rnd.choice([1, 4, 16])
    elif fmt == "vdi":
        if rnd.random() < 0.3:
            o["static"] = "on"
    elif fmt == "vmdk":
        o["subformat"] = rnd.choice(["monolithicSparse", "monolithicSparse", "monolithicFlat",
                                     "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"])
        if rnd.random() < 0.2:
            o["adapter_type"] = rnd.choice(["ide", "lsilogic", "buslogic"])
        if rnd.random() < 0.2:
            o["hwversion"] = rnd.choice(["4", "6"])
    elif fmt == "vpc":
        o["subformat"] = rnd.choice(["dynamic", "dynamic", "fixed"])
        if rnd.random() < 0.4:
            o["force_size"] = "on"
    elif fmt == "vhdx":
        o["subformat"] = rnd.choice(["dynamic", "dynamic", "fixed"])
        if rnd.random() < 0.4:
            o["block_size"] = rnd.choice([1 * MiB, 8 * MiB])
    elif fmt == "parallels":
        o["cluster_size"] = rnd.choice([4096, 65536, 1 * MiB])
    elif fmt == "luks":
        o["key-secret"] = "sec0"
        o["iter-time"] = 10
        if rnd.random() < 0.3:
            o["cipher-alg"] = rnd.choice(["aes-128", "aes-256"])
    return o


def _size(rnd: random.Random, fmt: str) -> int:
    size = rnd.choice([1, 2, 3, 4, 8, 16]) * MiB
    if rnd.random() < 0.3:
        size += rnd.randrange(1, 64) * 512
    if fmt in ("vhdx", "parallels") and rnd.random() < 0.5:
        size = size // MiB * MiB or MiB
    return size


def _create(layer: Layer, backing: Layer | None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", layer.fmt]
    if layer.fmt == "luks":
        argv += ["--object", SECRET]
    opts = dict(layer.opts)
    if opts:
        argv += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    if backing is not None:
        argv += ["-b", backing.path.name, "-F", backing.fmt]
    argv += [layer.path, str(layer.size)]
    for _ in range(20):  # PBKDF2 timing on a busy machine ("Unable to get accurate CPU usage")
        rc, _out, err = _run(argv)
        if rc == 0 or "accurate CPU usage" not in err:
            break
    if rc != 0:
        raise BuildError(f"create {layer.fmt} {opts}: {err.strip()}")


def _ops(rnd: random.Random, layer: Layer, compress_ok: bool) -> list[str]:
    ops, compressed = [], []
    align = rnd.choice([512, 4096, 65536])
    n = rnd.randrange(0, 12)
    size = layer.size
    for _ in range(n):
        kind = rnd.choices(["write", "zero", "zero-u", "discard", "compress"], [6, 2, 1, 2, 2 if compress_ok else 0])[0]
        off = rnd.randrange(0, max(size // align, 1)) * align
        length = min(rnd.choice([1, 1, 2, 3, 8, 33, 128]) * align, size - off)
        if length <= 0:
            continue
        if kind == "write":
            ops.append(f"write -q -P {rnd.randrange(1, 256)} {off} {length}")
        elif kind == "zero":
            ops.append(f"write -q -z {off} {length}")
        elif kind == "zero-u":
            ops.append(f"write -q -z -u {off} {length}")
        elif kind == "discard":
            ops.append(f"discard -q {off} {length}")
        else:
            cs = int(layer.opts.get("cluster_size", 65536 if layer.fmt == "qcow2" else 4096))
            off = off // cs * cs
            length = cs
            op = f"write -q -c -P {rnd.randrange(1, 256)} {off} {length}"
            # qemu-img compresses only into unallocated clusters (EIO otherwise): these go first
            if off + length <= size and not any(c.split()[-2] == str(off) for c in compressed):
                compressed.append(op)
    return compressed + ops


def _qemu_io(layer: Layer, ops: list[str]) -> None:
    if not ops:
        return
    argv = ["qemu-io"]
    if layer.fmt == "luks":
        argv += ["--object", SECRET, "--image-opts", f"driver=luks,key-secret=sec0,file.filename={layer.path}"]
    else:
        argv += ["-f", layer.fmt, layer.path]
    for op in ops:
        argv += ["-c", op]
    rc, out, err = _run(argv)
    if "can't open device" in err:
        # qemu-img created an image it cannot open (qed: "QED table offset is invalid"); keep the
        # case: qimg must refuse it the same way
        layer.ops.append("unopenable")
        return
    if rc != 0 or "error" in (out + err).lower():
        raise BuildError(f"qemu-io {layer.fmt}: {(out + err).strip()[:300]}")


def _stream_vmdk(rnd: random.Random, layer: Layer, workdir: Path) -> None:
    """streamOptimized is written sequentially: build it by converting a random raw."""
    raw = workdir / (layer.path.name + ".src")
    with open(raw, "wb") as f:
        f.truncate(layer.size)
        for _ in range(rnd.randrange(0, 6)):
            off = rnd.randrange(0, layer.size // 512) * 512
            f.seek(off)
            f.write(bytes([rnd.randrange(1, 256)]) * min(rnd.choice([512, 4096, 65536, 300000]), layer.size - off))
    layer.path.unlink(missing_ok=True)
    _must(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, layer.path])
    raw.unlink()
    layer.ops.append("convert-from-random-raw")


def build_case(seed: int, workdir: Path) -> Case:
    """The images of case ``seed`` in ``workdir`` (built with qemu-img and qemu-io)."""
    rnd = random.Random(seed)
    depth = rnd.choices([1, 2, 3], [6, 3, 1])[0]
    layers: list[Layer] = []
    for i in range(depth):
        top = i == depth - 1
        fmt = rnd.choice(FORMATS) if i == 0 else rnd.choice(BACKED)
        if i > 0 and layers[-1].fmt == "luks":
            # an overlay would need the key in a json: backing name: the chain stops here
            break
        if i > 0 and fmt == "vmdk" and layers[-1].fmt != "vmdk":
            fmt = "qcow2"  # qemu-img: "backing_file must be a vmdk image"
        if i > 0 and fmt == "vmdk":
            opts = {"subformat": "monolithicSparse"}
        else:
            opts = _format_options(rnd, fmt)
            if i > 0:
                opts.pop("preallocation", None)  # qemu-img: needs extended_l2 with a backing file
        size = _size(rnd, fmt)
        if i > 0 and rnd.random() < 0.6:
            size = layers[-1].size  # commonly the same size as the backing file
        layer = Layer(workdir / f"l{i}.{fmt}", fmt, opts, size)
        _create(layer, layers[-1] if i else None)
        if fmt == "vmdk" and opts.get("subformat") == "streamOptimized":
            _stream_vmdk(rnd, layer, workdir)
        else:
            compress_ok = fmt == "qcow2"  # qcow: qemu-io's compressed writes fail (EINVAL)
            if fmt == "qcow2" and opts.get("preallocation"):
                compress_ok = False
            ops = _ops(rnd, layer, compress_ok)
            _qemu_io(layer, ops)
            layer.ops += ops
            if fmt == "qcow2" and rnd.random() < 0.25:
                _must(["qemu-img", "snapshot", "-c", f"snap{i}", layer.path])
                layer.ops.append(f"snapshot snap{i}")
                more = _ops(rnd, layer, False)  # clusters shared with the snapshot do not compress
                _qemu_io(layer, more)
                layer.ops += more
        layers.append(layer)
        if top:
            break
    return Case(seed, layers)


# --- running ----------------------------------------------------------------------------------------

class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_qimg(argv, timeout=120):
    """qimg in this process (fast): (rc, stdout, stderr)."""
    from qimg.cli import run

    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm) if timeout else None
    if timeout:
        signal.alarm(timeout)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = run([str(a) for a in argv])
    except _Timeout:
        rc = "timeout"
    finally:
        if timeout:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue()


def _norm(text: str) -> str:
    # Debian's qemu-img asks for its optional dmg modules (qemu-block-extra) on stderr: packaging, not output
    text = "".join(line for line in text.splitlines(True) if not line.startswith("qemu: module block-"))
    return text.replace("qemu-img: ", "PROG: ").replace("qimg: ", "PROG: ")


def _sha(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def commands(case: Case, rnd: random.Random) -> list[tuple[str, list]]:
    """(name, argv without the program) for each read-side command of a case."""
    top = case.top
    if top.fmt == "luks":
        src = ["--object", SECRET, "--image-opts", f"driver=luks,key-secret=sec0,file.filename={top.path}"]
        info_src = src
    else:
        src = ["-f", top.fmt, str(top.path)]
        info_src = src if rnd.random() < 0.7 else [str(top.path)]  # sometimes probed
    cmds = [
        ("info", ["info", "--output=json", *info_src]),
        ("map", ["map", "--output=json", *src]),
        ("check", ["check", "--output=json", *src]),
        ("measure-" + (m := rnd.choice(MEASURE_TARGETS)), ["measure", "--output=json", "-O", m, *_measure_opts(rnd, m),
                                                          *src]),
        ("convert", ["convert", "-O", "raw", *src, "@OUT@"]),
    ]
    if len(case.layers) > 1:
        cmds.append(("info-chain", ["info", "--output=json", "--backing-chain", *src]))
        base = case.layers[-2]
        if top.fmt != "luks" and base.fmt != "luks":
            cmds.append(("compare-base", ["compare", "-f", top.fmt, "-F", base.fmt, top.path, base.path]))
    if rnd.random() < 0.3:
        cmds.append(("map-human", ["map", *src]))
    if rnd.random() < 0.3:
        start = rnd.randrange(0, top.size // 512 + 2) * rnd.choice([1, 512])
        length = rnd.randrange(0, top.size // 512 + 2) * rnd.choice([1, 512])
        cmds.append(("map-range", ["map", "--output=json", f"--start-offset={start}", f"--max-length={length}", *src]))
    if top.fmt != "luks" and rnd.random() < 0.4:
        # against its own raw conversion (made by qemu-img): identical, or both tools fail alike
        cmds.append(("compare-raw", ["compare", *(["-s"] if rnd.random() < 0.5 else []), "-f", top.fmt, "-F", "raw",
                                     top.path, "@RAW@"]))
    if rnd.random() < 0.3:
        cmds.append(("check-human", ["check", *src]))
    if top.fmt == "qcow2" and rnd.random() < 0.3:
        cmds.append(("snapshot-l", ["snapshot", "-l", str(top.path)]))
    return cmds


def _measure_opts(rnd: random.Random, target: str) -> list[str]:
    if target == "luks":
        return ["--object", SECRET, "-o", "key-secret=sec0,iter-time=10"]
    if target == "qcow2" and rnd.random() < 0.5:
        o = [f"cluster_size={rnd.choice([4096, 65536, 2 * MiB])}"]
        if rnd.random() < 0.3:
            o.append("extended_l2=on,cluster_size=65536")
        if rnd.random() < 0.3:
            o.append(f"preallocation={rnd.choice(['metadata', 'falloc', 'full'])}")
        return ["-o", ",".join(o)]
    return []


def _mutate(rnd: random.Random, case: Case) -> None:
    """Now and then damage the top image the way files get damaged (a truncation): both tools must agree
    on what is left, or refuse it alike."""
    top = case.top
    if top.fmt in ("raw", "luks") or rnd.random() >= 0.12:
        return
    size = top.path.stat().st_size
    if size <= 512:
        return
    cut = rnd.choice([rnd.randrange(512, size), size // 65536 * 65536, size - 512, size // 2 // 512 * 512])
    if 0 < cut < size:
        os.truncate(top.path, cut)
        case.notes.append(f"truncated to {cut}")


def compare_case(case: Case, workdir: Path) -> list[dict]:
    """Run each command through both tools; the list of divergences."""
    rnd = random.Random(case.seed * 7919 + 1)
    found = []
    raw = workdir / "ref.raw"
    if case.top.fmt != "luks":
        src = ["-f", case.top.fmt, str(case.top.path)]
        if _run(["qemu-img", "convert", "-O", "raw", *src, raw])[0] != 0:
            raw.write_bytes(b"")
    _mutate(rnd, case)
    for name, argv in commands(case, rnd):
        argv = [str(raw) if a == "@RAW@" else a for a in argv]
        if "@OUT@" in argv:
            qa = [str(workdir / "qemu.out") if a == "@OUT@" else a for a in argv]
            ia = [str(workdir / "qimg.out") if a == "@OUT@" else a for a in argv]
        else:
            qa = ia = argv
        for _ in range(20):  # qemu-img times PBKDF2 (luks) with the CPU clock, which a busy machine can fail
            q = _run(["qemu-img", *qa])
            if "accurate CPU usage" not in q[2]:
                break
        i = run_qimg(ia)
        diff = {}
        if q[0] != i[0]:
            diff["rc"] = [q[0], i[0]]
        if _norm(q[1]) != _norm(i[1]):
            diff["stdout"] = [q[1][:4000], i[1][:4000]]
        if _norm(q[2]) != _norm(i[2]):
            diff["stderr"] = [q[2][:2000], i[2][:2000]]
        if "@OUT@" in argv and q[0] == 0 and i[0] == 0:
            hq, hi = _sha(workdir / "qemu.out"), _sha(workdir / "qimg.out")
            if hq != hi:
                diff["sha256"] = [hq, hi]
        for p in ("qemu.out", "qimg.out"):
            (workdir / p).unlink(missing_ok=True)
        if diff:
            diff["command"] = name
            diff["argv"] = [str(a) for a in ia]
            found.append(diff)
    return found


def run_one(seed: int, keep: Path | None = None) -> dict:
    """Build and compare case ``seed``: a record with the case and its divergences."""
    workdir = Path(tempfile.mkdtemp(prefix=f"qimg-diff-{seed}-")) if keep is None else keep
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        try:
            case = build_case(seed, workdir)
        except BuildError as e:
            return {"seed": seed, "skipped": str(e)[:300]}
        divergences = compare_case(case, workdir)
        return {"seed": seed, "case": case.describe(), "divergences": divergences}
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


def summarize(logs) -> int:
    """Totals over JSON-lines logs: cases run, skipped, with divergences, and the commands that diverged."""
    import collections

    ran = skipped = diverged = 0
    by_command: collections.Counter = collections.Counter()
    for log in logs:
        with open(log) as f:
            for line in f:
                rec = json.loads(line)
                if "skipped" in rec:
                    skipped += 1
                    continue
                ran += 1
                if rec["divergences"]:
                    diverged += 1
                    for d in rec["divergences"]:
                        by_command[d["command"]] += 1
    print(f"cases run: {ran}, skipped: {skipped}, with divergences: {diverged}")
    for cmd, n in by_command.most_common():
        print(f"  {cmd}: {n}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--cases", type=int, default=0, help="number of cases (0: until --minutes)")
    ap.add_argument("--minutes", type=float, default=0, help="stop after this long")
    ap.add_argument("--log", type=Path, default=None, help="append JSON lines here")
    ap.add_argument("--keep", type=Path, default=None, help="build in this directory and keep it")
    ap.add_argument("--summarize", type=Path, nargs="*", default=None, help="print the totals of these logs")
    args = ap.parse_args(argv)
    if args.summarize is not None:
        return summarize(args.summarize)
    os.environ.setdefault("QIMG_DEBUG", "")
    started = time.monotonic()
    deadline = started + args.minutes * 60 if args.minutes else None
    seed, ran, skipped, diverged = args.seed, 0, 0, 0
    log = open(args.log, "a") if args.log else None
    try:
        while True:
            if args.cases and ran + skipped >= args.cases:
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            if not args.cases and deadline is None:
                break
            rec = run_one(seed, args.keep)
            if "skipped" in rec:
                skipped += 1
            else:
                ran += 1
                if rec["divergences"]:
                    diverged += 1
                    cmds = ",".join(d["command"] for d in rec["divergences"])
                    print(f"seed {seed}: {cmds}: {rec['case'][:200]}", flush=True)
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            seed += 1
    finally:
        if log:
            log.close()
    minutes = (time.monotonic() - started) / 60
    print(f"cases run: {ran}, skipped (qemu-img refused the build): {skipped}, with divergences: {diverged}, "
          f"next seed: {seed}, minutes: {minutes:.1f}", flush=True)
    return 1 if diverged else 0


if __name__ == "__main__":
    sys.exit(main())
