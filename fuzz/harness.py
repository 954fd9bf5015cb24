"""What one fuzz execution does with an input: write it as an image, then open, info, map and read it.

A crash is any exception that is not a ``QimgError`` (the harness lets it propagate, so atheris
records the input), a run over the time limit or over the memory limit (libFuzzer's ``-timeout`` and
``-rss_limit_mb``, set by ``run.py``).  The same function replays a saved input in the regression
tests (tests/formats/test_fuzz_regressions.py), so a fixed crash stays fixed.
"""

from __future__ import annotations

import os

#: a full read stops after this many guest bytes (a few KiB of tables may map the same host cluster
#: many times over; reading gigabytes of it proves nothing more than reading the first 16 MiB)
READ_CAP = 16 << 20
CHUNK = 1 << 20


def untrusted_policy():
    """The untrusted mode with its default budget (64 MiB of metadata, 16 backing files, the image's
    folder only), as ``qimg --untrusted`` runs."""
    from qimg.core.policy import Policy

    return Policy(untrusted=True)


def drive(path: str, fmt: str) -> None:
    """open + info + map + a full read of ``path`` as ``fmt`` in untrusted mode; QimgError is a clean refusal."""
    from qimg.core.chain import Chain
    from qimg.ops.info import layer_info
    from qimg.ops.map import map_entries

    with Chain.open(path, fmt, policy=untrusted_policy()) as chain:
        for layer, name in zip(chain.layers, chain.filenames):  # what info --backing-chain shows
            layer_info(layer, name)
        for _entry in map_entries(chain):
            pass
        buf = bytearray(CHUNK)
        done = 0
        for ext in chain.extents():
            if not ext.data or ext.zero:
                continue
            pos = ext.start
            while pos < ext.end and done < READ_CAP:
                n = min(CHUNK, ext.end - pos)
                view = memoryview(buf)[:n]
                chain.readinto(pos, view)
                pos += n
                done += n
            if done >= READ_CAP:
                break


def run_one(data: bytes, path: str, fmt: str) -> None:
    """Write ``data`` to ``path`` and drive it; QimgError (a clean refusal) is swallowed."""
    with open(path, "wb") as f:
        f.write(data)
    run_file(path, fmt)


def run_file(path: str, fmt: str) -> None:
    """Drive the image at ``path`` (then remove it); QimgError (a clean refusal) is swallowed."""
    from qimg.errors import QimgError

    try:
        drive(path, fmt)
    except QimgError:
        pass
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


#: what a crash is, replayed without instrumentation: more CPU time or more memory than this
CPU_LIMIT_S = 2.0
MEMORY_LIMIT_MB = 256


def replay(path: str, fmt: str) -> dict:
    """Run one saved input in this (uninstrumented) process: its error, CPU seconds and memory growth."""
    import resource
    import shutil
    import tempfile
    import traceback

    import qimg.core.chain  # noqa: F401  (loaded before measuring: imports are not the input's cost)
    import qimg.core.registry as registry
    import qimg.ops.info  # noqa: F401
    import qimg.ops.map  # noqa: F401

    registry.get_driver(fmt)
    work = tempfile.mkdtemp(prefix="qimg-replay-")
    target = os.path.join(work, "image." + fmt)
    with open(path, "rb") as f:
        data = f.read()
    if fmt == "vhdx":
        import run

        image = run.expand(fmt, data)
        with open(target, "wb") as f:
            f.truncate(run.VHDX_FILE_SIZE)
            for off, block in image:
                f.seek(off)
                f.write(block)
    else:
        with open(target, "wb") as f:
            f.write(data)
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    t0 = resource.getrusage(resource.RUSAGE_SELF)
    error = None
    try:
        run_file(target, fmt)
    except BaseException:
        error = traceback.format_exc(limit=-6)
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    shutil.rmtree(work, ignore_errors=True)
    cpu = (t1.ru_utime - t0.ru_utime) + (t1.ru_stime - t0.ru_stime)
    grown = (t1.ru_maxrss >> 10) - before_mb
    crash = error is not None or cpu > CPU_LIMIT_S or grown > MEMORY_LIMIT_MB
    return {"input": path, "format": fmt, "cpu_s": round(cpu, 3), "memory_mb": grown, "error": error,
            "crash": crash}


if __name__ == "__main__":
    import json
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(replay(sys.argv[2], sys.argv[1])))
