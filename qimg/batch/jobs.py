"""Jobs files (JSON lines, one job per line) and results files (JSON lines, one result per job)."""

from __future__ import annotations

import json

from ..errors import QimgError
from .ops import validate

#: the keys of a result, in the order they are written
RESULT_KEYS = ("id", "op", "status", "exit_code", "error", "bytes_read", "bytes_written", "seconds", "worker",
               "result")


class BatchError(QimgError):
    """A jobs file or a cluster the batch cannot start with (one ``qimg:`` line, exit 1)."""


def error_result(job_id, op, message: str, exit_code: int = 1) -> dict:
    """The result of a job that could not run (malformed, unknown op, lost after its retries)."""
    return {"id": job_id, "op": op, "status": "error", "exit_code": exit_code, "error": message,
            "bytes_read": 0, "bytes_written": 0, "seconds": 0.0, "worker": None, "result": None}


def prepare(jobs) -> list[tuple[dict, str | None]]:
    """[(job, reason it cannot run or None)] for an iterable of job dicts (a ``str`` item is a raw JSON
    line).  Jobs without an id get their position, counted from 1; two jobs with one id are refused,
    as the results file could not tell them apart."""
    out = []
    seen: set[str] = set()
    for n, item in enumerate(jobs, 1):
        reason = None
        job = item
        if isinstance(item, str):
            try:
                job = json.loads(item)
            except ValueError as e:
                job, reason = {}, f"line {n}: not JSON: {e.msg} (column {e.colno})"
        if not isinstance(job, dict):
            job, reason = {}, f"line {n}: a job is a JSON object, not {type(job).__name__}"
        job = dict(job)
        job_id = job.get("id", str(n))
        if not isinstance(job_id, (str, int)) or isinstance(job_id, bool):
            job_id, reason = str(n), reason or f"line {n}: \"id\" must be a string"
        job["id"] = str(job_id)
        if job["id"] in seen:
            raise BatchError(f"line {n}: job id '{job['id']}' is used twice")
        seen.add(job["id"])
        out.append((job, reason or validate(job)))
    return out


def read_jobs(path: str, stdin=None) -> list[str]:
    """The non-blank lines of a jobs file (``-``: stdin)."""
    try:
        if path == "-":
            import sys

            text = (stdin or sys.stdin).read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise BatchError(f"Could not read jobs file '{path}': {e.strerror}") from None
    except UnicodeDecodeError:
        raise BatchError(f"Could not read jobs file '{path}': not UTF-8 text") from None
    return [line for line in text.splitlines() if line.strip()]


def done_ids(path: str) -> set[str]:
    """Ids whose result in an existing results file is ``ok`` (``--resume``); a line cut short by an
    interrupted run is ignored, so that job runs again."""
    ids: set[str] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict) and r.get("status") == "ok" and r.get("id") is not None:
                    ids.add(str(r["id"]))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise BatchError(f"Could not read results file '{path}': {e.strerror}") from None
    return ids


def result_line(result: dict) -> str:
    """One result as a JSON line, keys in RESULT_KEYS order."""
    return json.dumps({k: result.get(k) for k in RESULT_KEYS}, separators=(", ", ": ")) + "\n"
