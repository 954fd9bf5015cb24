"""What runs inside a Dask worker: one job, timed and counted, its destination committed only when complete.

``execute(job)`` returns the job's result dict, or raises ``TransientError`` for a failure worth
another attempt (a connection reset, a timeout, an HTTP 5xx), which Dask retries up to the batch's
``retries``.  A bad image is an answer, not an accident: it is never retried.

Destinations:
- a local path is written as ``DST.qimg-partial`` and renamed over ``DST`` once complete;
- an object-storage URL is converted to a local temporary file, uploaded under the temporary key
  ``DST.qimg-partial``, copied to the final key, and the temporary key deleted.
A worker killed mid-job leaves at most the ``.qimg-partial`` name behind; the retry starts it again.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time

from ..errors import QimgError
from . import ops

PARTIAL = ".qimg-partial"

#: messages of failures that another attempt may not meet (network and server trouble, not the image)
_TRANSIENT = re.compile(r"timed out|Connection reset|connection reset|closed the connection|Connection aborted|"
                        r"HTTP error 5\d\d|Broken pipe|Temporary failure|truncated response|"
                        r"ServiceUnavailable|SlowDown|InternalError|RequestTimeout")


class TransientError(Exception):
    """A failure that another attempt may not meet; its message is the job's one-line error."""


def is_transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return isinstance(e, QimgError) and _TRANSIENT.search(str(e)) is not None


def _io_counters() -> tuple[int, int] | None:
    """(bytes read, bytes written) by this thread so far (Linux: /proc/thread-self/io rchar, wchar).

    Per thread, as the workers of the embedded cluster are threads of one process running jobs side
    by side; a convert copies in the job's own thread (one copy worker), so its reads are all counted,
    while reads the library hands to helper threads (parallel HTTP ranges, compare's read-ahead) are not."""
    try:
        with open("/proc/thread-self/io") as f:
            fields = dict(line.split(": ", 1) for line in f.read().splitlines() if ": " in line)
        return int(fields["rchar"]), int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def confinement(untrusted, job: dict):
    """What a job's opens follow: False (qemu-img's rules), True (the untrusted mode), or the batch's
    Policy (``qimg --untrusted --allow-dir ... batch``), made untrusted when the job asks for it."""
    wants = bool(job.get("untrusted"))
    if untrusted is False or untrusted is None:
        return True if wants else False
    if untrusted is True:
        return True
    if not untrusted.untrusted and not wants:
        return untrusted if untrusted.allow_dirs or untrusted.max_depth or untrusted.max_metadata_memory else False
    import dataclasses

    return dataclasses.replace(untrusted, untrusted=True) if wants else untrusted


def execute(job: dict, untrusted=False) -> dict:
    """Run one validated job in this process; the result dict of the batch's results file."""
    from ..io.remote import url_scheme

    start = time.perf_counter()
    io_before = _io_counters()
    out = {"id": job.get("id"), "op": job.get("op"), "status": "ok", "exit_code": 0, "error": None,
           "bytes_read": None, "bytes_written": None, "seconds": None, "worker": worker_name(), "result": None}
    written = None
    confined = confinement(untrusted, job)
    try:
        if job["op"] == "convert":
            dst = job["dst"]
            convert = _convert_to_url if url_scheme(dst) is not None else _convert_to_path
            result, code, error, written = convert(job, dst, confined)
        else:
            result, code, error = ops.call(job, untrusted=confined)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        if is_transient(e):
            raise TransientError(ops.one_line(e)) from None
        result, code, error = None, getattr(e, "exit_code", 1) if isinstance(e, QimgError) else 1, ops.one_line(e)
    out.update(status="ok" if code == 0 else "error", exit_code=code, error=error, result=result)
    io_after = _io_counters()
    if io_before is not None and io_after is not None:
        out["bytes_read"] = io_after[0] - io_before[0]
        out["bytes_written"] = io_after[1] - io_before[1]
    if written is not None:
        out["bytes_written"] = written
    out["seconds"] = round(time.perf_counter() - start, 6)
    return out


def _convert_to_path(job: dict, dst: str, untrusted):
    """Convert under DST.qimg-partial, then rename it over DST: (result, 0, None, bytes written)."""
    tmp = dst + PARTIAL
    _unlink(tmp)  # a previous attempt's, killed with its worker
    try:
        # created empty first: convert then writes it in place, so a killed attempt leaves this one name
        # (when it cannot be created, convert says why in its own words)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
        except OSError:
            pass
        try:
            result, _, _ = ops.call(job, dst=tmp, untrusted=untrusted)
        except QimgError as e:
            raise type(e)(str(e).replace(tmp, dst), e.exit_code) from None  # the name the job gave
        size = os.stat(tmp).st_size
        os.replace(tmp, dst)
    except BaseException:
        _unlink(tmp)
        raise
    return _named(result, tmp, dst), 0, None, size


def _convert_to_url(job: dict, dst: str, untrusted):
    """Convert to a local temporary file, upload it under the temporary key, copy it to the final key,
    delete the temporary key: (result, 0, None, bytes uploaded)."""
    from ..io.fsspec import describe, filesystem
    from ..io.remote import url_scheme

    if url_scheme(dst) in ("http", "https"):
        raise QimgError(f"Could not create '{dst}': http(s) URLs can be read only")
    fs, path = filesystem(dst)
    workdir = tempfile.mkdtemp(prefix="qimg-batch-")
    tmp_key = path + PARTIAL
    try:
        local = os.path.join(workdir, os.path.basename(path) or "image")
        try:
            result, _, _ = ops.call(job, dst=local, untrusted=untrusted)
        except QimgError as e:
            raise type(e)(str(e).replace(local, dst), e.exit_code) from None
        size = os.stat(local).st_size
        try:
            fs.put_file(local, tmp_key)
            fs.copy(tmp_key, path)
        except Exception as e:
            raise QimgError(f"Could not write '{dst}': {describe(e)}") from None
        return _named(result, local, dst), 0, None, size
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        try:
            if fs.exists(tmp_key):
                fs.rm(tmp_key)
        except Exception:
            pass


def _named(result, tmp: str, dst: str):
    """The convert's result naming the destination, not the temporary name it wrote."""
    if isinstance(result, dict):
        return {k: (dst if v == tmp else v) for k, v in result.items()}
    return result


def _unlink(name: str) -> None:
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass
    except OSError:
        pass
