"""The one place batch jobs meet the library: each op's keyword arguments, and the call that runs it.

A job is a dict whose keys are the op's keyword arguments, named as the library's functions name them
(``qimg.convert(src, dst, fmt=, out_fmt=, ...)``, ``qimg.compare(a, b, fmt1=, fmt2=)``...).
``OPS`` declares, per op, the keys it takes and which are required; ``validate`` checks a job against
it before anything is submitted, and ``call`` runs the op in this process and returns
``(result, exit_code, error)``: the op's own result as the library returns it, the status the single
command would have exited with, and its one-line message (None when the op succeeded).
"""

from __future__ import annotations

import importlib.util

from ..errors import REPORT_SEP, QimgError

#: keys every job may carry besides the op's own
COMMON_KEYS = {"id", "op", "untrusted"}

#: op -> (required keys, optional keys with their types)
OPS: dict[str, tuple[tuple[str, ...], dict[str, type | tuple]]] = {
    "info": (("src",), {"fmt": str, "backing_chain": bool}),
    "check": (("src",), {"fmt": str, "repair": str}),
    "map": (("src",), {"fmt": str, "start_offset": int, "max_length": int}),
    "measure": (("src",), {"fmt": str, "out_fmt": str, "options": dict, "size": int}),
    "compare": (("a", "b"), {"fmt1": str, "fmt2": str, "strict": bool}),
    "convert": (("src", "dst"), {"fmt": str, "out_fmt": str, "options": dict, "compress": bool,
                                 "sparse_size": int}),
    "inspect": (("src",), {"fmt": str}),
}


def available_ops() -> list[str]:
    """The ops this installation runs (``inspect`` needs qimg.ops.inspect)."""
    return [op for op in OPS if op != "inspect" or importlib.util.find_spec("qimg.ops.inspect") is not None]


def validate(job: dict) -> str | None:
    """None for a job that can run, otherwise the one-line reason it cannot."""
    op = job.get("op")
    if not isinstance(op, str) or not op:
        return "job has no \"op\""
    if op not in OPS or op not in available_ops():
        return f"unknown op '{op}' (expected one of: {', '.join(available_ops())})"
    required, optional = OPS[op]
    for key in required:
        if not isinstance(job.get(key), str) or not job[key]:
            return f"{op} job needs \"{key}\" (a path or URL)"
    for key, value in job.items():
        if key in COMMON_KEYS or key in required:
            continue
        if key not in optional:
            return f"unknown option '{key}' for op {op}"
        want = optional[key]
        if value is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
            return f"option '{key}' of op {op} must be {_type_name(want)}"
    if "untrusted" in job and not isinstance(job["untrusted"], bool):
        return "option 'untrusted' must be true or false"
    if op == "check" and job.get("repair") not in (None, "leaks", "all"):
        return "option 'repair' of op check must be \"leaks\" or \"all\""
    return None


def _type_name(t) -> str:
    return {str: "a string", bool: "true or false", int: "an integer", dict: "an object"}.get(t, str(t))


def one_line(e: BaseException) -> str:
    """An error as one line: qemu-img's several reports joined, no traceback."""
    if isinstance(e, QimgError):
        return "; ".join(part.strip().replace("\n", " ") for part in str(e).split(REPORT_SEP) if part.strip())
    if isinstance(e, MemoryError):
        return "Out of memory"
    return f"internal error: {type(e).__name__}: {e}".replace("\n", " ")


def call(job: dict, dst: str | None = None):
    """Run one job here: (result, exit_code, error).  ``dst`` overrides the job's destination (the
    temporary name a convert writes before it is committed).  QimgError propagates to the caller."""
    op = job["op"]
    fmt = job.get("fmt")
    if op == "info":
        from ..ops.info import image_info

        infos = image_info(job["src"], fmt, backing_chain=bool(job.get("backing_chain")), options={})
        return (infos if job.get("backing_chain") else infos[0]), 0, None
    if op == "check":
        from ..ops.check import check_image, human, result_dict

        res, fmt_name = check_image(job["src"], fmt, job.get("repair"), {})
        code = res.exit_code
        lines = [line.strip() for line in human(res).splitlines() if line.strip()]
        error = None if not code else next((x for x in lines if "were found" in x or "have occurred" in x),
                                            f"check exited with status {code}")
        return result_dict(res, job["src"], fmt_name), code, error
    if op == "map":
        from ..ops.map import map_entries, open_for_map

        with open_for_map(job["src"], fmt, {}) as chain:
            entries = [_map_dict(e) for e in map_entries(chain, job.get("start_offset") or 0, job.get("max_length"))]
        return entries, 0, None
    if op == "measure":
        from ..ops.measure import MeasureRequest, measure

        opts = [",".join(f"{k}={v}" for k, v in (job.get("options") or {}).items())] if job.get("options") else []
        req = MeasureRequest(filename=job["src"], fmt=fmt, size=job.get("size"), out_fmt=job.get("out_fmt") or "raw",
                             options=opts)
        return measure(req), 0, None
    if op == "compare":
        from ..ops.compare import CompareRequest, compare

        lines: list[str] = []
        req = CompareRequest(job["a"], job["b"], job.get("fmt1"), job.get("fmt2"), strict=bool(job.get("strict")))
        code = compare(req, report=lines.append)
        text = " ".join(line.strip() for line in lines if line.strip())
        return {"identical": code == 0, "message": text}, code, (text or None) if code else None
    if op == "convert":
        from ..io.lock import EXCLUSIVE_READ
        from ..ops.convert import ConvertRequest, convert

        req = ConvertRequest(sources=[(job["src"], fmt, {EXCLUSIVE_READ: True})], target=dst or job["dst"],
                             out_fmt=job.get("out_fmt") or "raw",
                             options={k: str(v) for k, v in (job.get("options") or {}).items()},
                             compress=bool(job.get("compress")), workers=1,
                             min_sparse=4096 if job.get("sparse_size") is None else job["sparse_size"])
        convert(req)
        return {"dst": job["dst"], "out_fmt": req.out_fmt}, 0, None
    if op == "inspect":
        from ..ops import inspect as inspect_op  # present once the inspect command is

        result = inspect_op.inspect(job["src"], fmt)
        return (result if isinstance(result, (dict, list)) else vars(result)), 0, None
    raise QimgError(f"unknown op '{op}'")


def _map_dict(e) -> dict:
    d = {"start": e.start, "length": e.length, "depth": e.depth, "present": e.present, "zero": e.zero,
         "data": e.data}
    if e.offset is not None:
        d["offset"] = e.offset
    return d
