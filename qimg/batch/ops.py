"""The one place batch jobs meet the library: which functions a job may name, and the call that runs it.

A job names a library function (``"op": "convert"`` is ``qimg.convert``) and gives its arguments
under the function's own keyword names (``src``, ``dst``, ``fmt``, ``out_fmt``, ``compress``,
``options``; ``compare`` takes ``a`` and ``b``...).  ``validate`` checks a job against the function's
signature before anything is submitted; ``call`` runs it in this process and returns
``(result, exit_code, error)``: the op's result as a JSON-ready value, the status the single command
would have exited with, and its one-line message (None when that status is 0).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect

from ..errors import REPORT_SEP, QimgError

#: the ops a batch runs, in the order messages list them (``inspect`` once the library has it)
BATCH_OPS = ("convert", "info", "check", "map", "measure", "compare", "inspect")
#: keys every job may carry besides the op's arguments
COMMON_KEYS = {"id", "op", "untrusted"}
#: arguments a job cannot give: callbacks and the command line's own switches
EXCLUDED = {"progress", "warn", "report", "announce", "trap_signals"}
#: the positional argument that names the image, when the function's first one has a default (measure)
_IMAGE_ARGS = {"measure": ("src",)}
#: a job names the image ``src`` also for a function that calls it ``filename``
_ALIASES = {"filename": "src"}


def function(op: str):
    """The library function of an op, or None when this installation has none."""
    if op not in BATCH_OPS:
        return None
    import qimg

    try:
        return getattr(qimg, op)  # the public name, imported on first use
    except AttributeError:
        pass
    if op == "inspect" and importlib.util.find_spec("qimg.ops.inspect") is not None:
        try:
            from ..ops import inspect as inspect_op  # the inspect command's library layer
        except ImportError:
            return None
        return inspect_op.inspect
    return None


def available_ops() -> list[str]:
    return [op for op in BATCH_OPS if function(op) is not None]


@functools.lru_cache(maxsize=None)
def _parameters(op: str) -> dict[str, inspect.Parameter]:
    """The function's parameters a job may give, under the names jobs use (read once per op: every
    job is checked against them, and again where it runs)."""
    return {_ALIASES.get(name, name): p for name, p in inspect.signature(function(op)).parameters.items()
            if name not in EXCLUDED}


def _required(op: str, params: dict) -> tuple[str, ...]:
    return _IMAGE_ARGS.get(op) or tuple(n for n, p in params.items()
                                        if p.default is inspect.Parameter.empty
                                        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def validate(job: dict) -> str | None:
    """None for a job that can run, otherwise the one-line reason it cannot."""
    op = job.get("op")
    if not isinstance(op, str) or not op:
        return "job has no \"op\""
    if function(op) is None:
        return f"unknown op '{op}' (expected one of: {', '.join(available_ops())})"
    params = _parameters(op)
    for key in _required(op, params):
        if not isinstance(job.get(key), str) or not job[key]:
            return f"{op} job needs \"{key}\" (a path or URL)"
    for key, value in job.items():
        if key in COMMON_KEYS:
            continue
        if key not in params:
            return f"unknown option '{key}' for op {op}"
        if params[key].annotation in ("bool", bool) and not isinstance(value, bool):
            return f"option '{key}' of op {op} must be true or false"
    if "untrusted" in job and not isinstance(job["untrusted"], bool):
        return "option 'untrusted' must be true or false"
    return None


def one_line(e: BaseException) -> str:
    """An error as one line: qemu-img's several reports joined, no traceback."""
    if isinstance(e, QimgError):
        return "; ".join(part.strip().replace("\n", " ") for part in str(e).split(REPORT_SEP) if part.strip())
    if isinstance(e, MemoryError):
        return "Out of memory"
    return f"internal error: {type(e).__name__}: {e}".replace("\n", " ")


def call(job: dict, dst: str | None = None, untrusted=False):
    """Run one validated job here: (result, exit_code, error).  ``dst`` overrides a convert's destination
    (the temporary name written before the commit); ``untrusted`` is False (qemu-img's rules), True or
    an open Policy (the command line's, with its folders and limits).  QimgError propagates."""
    op = job["op"]
    fn = function(op)
    params = _parameters(op)
    kwargs = {k: v for k, v in job.items() if k not in COMMON_KEYS}
    for name, alias in _ALIASES.items():
        if alias in kwargs and params.get(alias) is not None and params[alias].name == name:
            kwargs[name] = kwargs.pop(alias)
    if dst is not None:
        kwargs["dst"] = dst
    if op == "convert":
        kwargs.setdefault("coroutines", 1)  # the batch runs jobs side by side: one copy thread each
    if untrusted is not False:
        if "untrusted" not in params:
            # never a hostile image opened with the trusting rules because a build lacks the mode
            raise QimgError(f"the untrusted mode is not available for op {op} in this build")
        kwargs["untrusted"] = untrusted
    try:
        result = fn(**kwargs)
    except TypeError as e:  # a value of the wrong kind for the library (a list where a size goes...)
        raise QimgError(f"bad arguments for op {op}: {e}") from None
    code = getattr(result, "exit_code", 0) or 0
    value = plain(result)
    error = None
    if code and op == "compare":
        error = " ".join(result.messages) or f"compare exited with status {code}"
    elif code and op == "check":
        error = _check_message(result)
    elif code:
        findings = value.get("findings") if isinstance(value, dict) else None  # inspect's reasons
        reasons = [f.get("message") for f in findings or () if isinstance(f, dict) and f.get("message")]
        error = "; ".join(reasons) or f"{op} exited with status {code}"
    return value, code, error


def _check_message(result) -> str:
    """check's summary line for a status other than 0."""
    if result.corruptions:
        return f"{result.corruptions} errors were found on the image."
    if result.leaks:
        return f"{result.leaks} leaked clusters were found on the image."
    if result.check_errors:
        return f"{result.check_errors} internal errors have occurred during the check."
    return f"check exited with status {result.exit_code}"


def plain(value):
    """A library result as JSON values: ``to_dict()`` where it has one (info, check, map, measure
    print exactly that), dataclass fields otherwise."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    to_dict = getattr(value, "to_dict", None)
    if to_dict is not None:
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value
