"""inspect: a safety verdict on one image for ingestion gates, in untrusted mode always.

The verdict is built from what a gate needs and nothing more: every signature the file carries (a
second image format is a polyglot), the format chosen, its virtual size, its feature flags, every
file it references (backing files, data files, extents, bundle storages; each resolved and judged
by the confinement rule of the untrusted mode), and a list of findings, each with a stable id.
``safe`` is true when there is no finding.  The image is opened for metadata only (the tables a
driver reads at open, never the guest data), so a 10 GiB qcow2 costs a few KiB of reads.  A pipe
is read forward once (``qimg.io.peek.StreamStore``).

Finding ids are a contract (documented in the README, section "Inspecting untrusted images");
``FINDINGS`` lists them all.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from ..core import registry, signatures
from ..errors import QimgError
from . import inspect_refs as refs

#: every finding id ``inspect`` may report, with what it means
FINDINGS = {
    "polyglot": "more than one format signature (an image header with another format's header, footer or a raw "
                "disk layout)",
    "format-mismatch": "the format given with -f is not what the content says",
    "format-not-allowed": "the format is not in --allowed-formats",
    "invalid-image": "the image does not open cleanly in untrusted mode (structure, limits)",
    "unknown-features": "feature bits this version does not know (qemu would refuse the image)",
    "corrupt-flag": "the image is marked corrupt",
    "reference-refused": "a referenced file that the untrusted mode refuses to open",
    "reference-missing": "a referenced file inside the allowed folders that does not exist",
    "chain-too-deep": "a backing chain deeper than the untrusted mode allows",
    "chain-loop": "a backing chain that loops",
}

#: formats whose content is raw once a trailer (VHD footer) is set aside: -f raw on them reads the
#: guest data plus that trailer, which is no safety issue
_RAW_COMPATIBLE = {"vpc"}


class InspectFailed(QimgError):
    """The image could not be inspected at all (unreadable, a stream that needs seeking): exit 2."""

    exit_code = 2


@dataclass
class Finding:
    """One reason the image is not safe: a stable ``id`` and a one-line ``message``."""

    id: str
    message: str

    def to_dict(self) -> dict:
        return {"id": self.id, "message": self.message}


@dataclass
class InspectResult:
    """What ``inspect`` found; ``to_dict()`` is the JSON form."""

    filename: str
    format: str | None
    candidates: list[str]
    virtual_size: int | None
    references: list = field(default_factory=list)  # qimg.core.policy.Reference
    findings: list[Finding] = field(default_factory=list)
    features: dict = field(default_factory=dict)
    signatures: list[signatures.Match] = field(default_factory=list)
    bytes_read: int = 0

    @property
    def safe(self) -> bool:
        return not self.findings

    @property
    def exit_code(self) -> int:
        return 0 if self.safe else 1

    def to_dict(self) -> dict:
        return {
            "filename": self.filename,
            "format": self.format,
            "candidates": list(self.candidates),
            "virtual-size": self.virtual_size,
            "safe": self.safe,
            "references": [refs.reference_dict(r) for r in self.references],
            "findings": [f.to_dict() for f in self.findings],
            "features": self.features,
            "signatures": [m.to_dict() for m in self.signatures],
            "bytes-read": self.bytes_read,
        }


def parse_allowed_formats(text: str | None) -> list[str] | None:
    """``--allowed-formats qcow2,raw`` as a list (None: every format); unknown names are an error."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = set(registry.FORMATS)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise InspectFailed(f"--allowed-formats: unknown format '{bad[0] if bad else text}'")
    return names


def inspect(filename: str, fmt: str | None = None, allowed_formats: list[str] | None = None,
            allow_dirs: tuple[str, ...] | list[str] = (), policy=None) -> InspectResult:
    """The verdict on ``filename`` (a file, or a pipe such as /dev/stdin), read as ``fmt`` if given.

    Always in untrusted mode: ``policy`` (qimg.core.policy.Policy, e.g. from the global options) adds
    its limits and allowed folders; ``allow_dirs`` adds folders too."""
    from dataclasses import replace

    from ..core.policy import Policy

    policy = policy or Policy()
    policy = replace(policy, untrusted=True,
                     allow_dirs=tuple(dict.fromkeys((*policy.allow_dirs, *map(os.path.realpath, allow_dirs)))))
    if fmt is not None and fmt not in registry.FORMATS:
        raise InspectFailed(f"Unknown driver '{fmt}'")
    filename = registry.bundle_descriptor(filename)  # a Parallels .hdd bundle: its DiskDescriptor.xml
    store = _open_store(filename)
    try:
        return _inspect(store, filename, fmt, allowed_formats, policy)
    finally:
        store.close()


def _open_store(filename: str):
    from ..io.peek import CountingStore, StreamStore
    from ..io.store import FileStore

    try:
        fd = os.open(filename, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise InspectFailed(f"Could not open '{filename}': {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode):  # a terminal, /dev/zero: no image, and maybe no end
            raise InspectFailed(f"Could not open '{filename}': a character device is not an image")
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            os.set_blocking(fd, True)  # opened without blocking so that a FIFO with no writer cannot hang the open
            return CountingStore(StreamStore(fd, filename))
        if stat.S_ISDIR(st.st_mode):
            raise InspectFailed(f"Could not open '{filename}': Is a directory")
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    try:
        return CountingStore(FileStore(filename, writable=False, lock=None))
    except QimgError as e:
        raise InspectFailed(str(e)) from None


def _head_tail(store) -> tuple[bytes, bytes | None, int | None]:
    from ..io.peek import StreamStore

    head = store.pread(0, signatures.HEAD_BYTES)
    if isinstance(store.inner, StreamStore):
        # a stream's end is only known once it is read through: its trailer decides a polyglot
        size = store.size()
        return head, store.inner.tail[-signatures.TAIL_BYTES:], size
    size = store.size()
    if size <= len(head):
        return head, head, size
    return head, store.pread(max(0, size - signatures.TAIL_BYTES), signatures.TAIL_BYTES), size


def _choose(fmt: str | None, matches, head: bytes, filename: str) -> str:
    """The format to open: -f, else qemu-img's probe, else a trailer format (a fixed VHD, a DMG)."""
    if fmt is not None:
        return fmt
    chosen = registry.probe(head[:registry.PROBE_BYTES], "")
    if chosen == "raw":
        trailers = [m.name for m in matches if m.kind == signatures.TRAILER]
        if trailers:
            return trailers[0]
    return chosen


def _inspect(store, filename, fmt, allowed_formats, policy) -> InspectResult:
    try:
        head, tail, size = _head_tail(store)
    except QimgError as e:
        raise InspectFailed(str(e)) from None
    matches = signatures.scan(head, tail, size, filename)
    cands = signatures.candidates(matches)
    chosen = _choose(fmt, matches, head, filename)
    res = InspectResult(filename, chosen, cands, None, signatures=matches)
    add = res.findings.append
    if signatures.is_polyglot(matches):
        add(Finding("polyglot", "signatures of " + ", ".join(f"{m.name} (offset {m.offset})" for m in matches)))
    if fmt is not None:
        images = [n for n in cands if n not in ("raw", "mbr", "gpt", "iso")]
        wrong = (fmt == "raw" and [n for n in images if n not in _RAW_COMPATIBLE]) or (
            fmt != "raw" and fmt not in cands)
        if wrong:
            add(Finding("format-mismatch", f"-f {fmt} but the content is {'/'.join(images) or 'raw'}"))
    if allowed_formats is not None and chosen not in allowed_formats:
        add(Finding("format-not-allowed", f"format {chosen} is not one of {', '.join(allowed_formats)}"))
    res.features = _header_features(chosen, head)
    feature_findings(res)
    _open_and_describe(res, store, filename, chosen, policy)
    res.bytes_read = _bytes_read(store)
    return res


def _bytes_read(store) -> int:
    from ..io.peek import StreamStore

    return store.inner.bytes_read if isinstance(store.inner, StreamStore) else store.bytes_read


def _open_and_describe(res: InspectResult, store, filename: str, fmt: str, policy) -> None:
    """Open the chosen format for metadata only, in untrusted mode under one guard that records every
    reference, then collect size, features, references and the backing chain."""
    from ..core.policy import PolicyError
    from ..io.peek import StreamStore, StreamWindowError

    guard = refs.make_guard(filename, policy, stream=isinstance(store.inner, StreamStore))
    drv = None
    try:
        if fmt == "vmdk":
            refs.descriptor_extents(store, filename, guard)
        drv = refs.open_top(store, filename, fmt, guard)
        res.virtual_size = drv.virtual_size
        encrypted = bool(drv.info_extra().get("encrypted"))
        if drv.virtual_size and not encrypted:
            # the first extent: the top-level tables (L1, BAT, grain directory) pass the untrusted mode's
            # strict checks, for the cost of one table read (an encrypted image's need its key)
            drv.block_status(0, drv.virtual_size)
        spec = drv.info_specific()
        if spec and isinstance(spec.get("data"), dict):
            for k, v in spec["data"].items():
                res.features.setdefault(k, v)
        if encrypted:
            res.features.setdefault("encrypted", True)
        if drv.backing is not None and drv.backing.filename:
            stop = refs.follow_backing(filename, drv.backing.filename, drv.backing.fmt, guard)
            if stop is not None:
                res.findings.append(Finding(*stop))
    except StreamWindowError as e:
        raise InspectFailed(str(e)) from None
    except PolicyError as e:
        if e.reference is None:  # a budget or the chain depth, not a reference
            res.findings.append(Finding("invalid-image", str(e)))
    except QimgError as e:
        res.findings.append(Finding("invalid-image", str(e)))
    except (MemoryError, RecursionError) as e:  # a defect of a driver, never a verdict of "safe"
        res.findings.append(Finding("invalid-image", f"{type(e).__name__} while opening"))
    finally:
        if drv is not None:
            drv.store = None  # the store is the caller's: the driver must not close it
            try:
                drv.close()
            except Exception:
                pass
    res.references = list(guard.references)
    for ref in res.references:
        problem = refs.reference_problem(ref)
        if problem:
            res.findings.append(Finding(problem, refs.reference_message(ref)))


def _header_features(fmt: str, head: bytes) -> dict:
    """Feature flags read straight from the header, so that they are reported even for an image that
    does not open (unknown bits are why qemu refuses one)."""
    if fmt != "qcow2" or len(head) < 104 or int.from_bytes(head[4:8], "big") < 3:
        return {}
    from ..formats.qcow2 import header as q

    incompat = int.from_bytes(head[72:80], "big")
    compat = int.from_bytes(head[80:88], "big")
    autoclear = int.from_bytes(head[88:96], "big")
    header_length = int.from_bytes(head[100:104], "big")
    names = {(t, b): n for t, b, n in q.FEATURE_NAMES}

    def named(kind, bits):
        return [names.get((kind, i), f"unknown bit {i}") for i in range(64) if bits >> i & 1]

    out = {
        "incompatible-features": named(0, incompat),
        "compatible-features": named(1, compat),
        "autoclear-features": named(2, autoclear),
        "encryption": {0: "none", 1: "aes", 2: "luks"}.get(int.from_bytes(head[32:36], "big"), "unknown"),
        "compression-type": q.COMPRESSION_NAMES.get(head[104] if header_length > 104 and len(head) > 104 else 0,
                                                    "unknown"),
        "extended-l2": bool(incompat & q.QCOW2_INCOMPAT_EXTL2),
    }
    unknown_incompat = incompat & ~q.QCOW2_INCOMPAT_MASK
    if unknown_incompat:
        out["unknown-incompatible-bits"] = unknown_incompat
    return out


def feature_findings(res: InspectResult) -> None:
    """Findings from the feature flags (kept apart from the open: they hold even when it fails)."""
    f = res.features
    if f.get("unknown-incompatible-bits"):
        res.findings.append(Finding("unknown-features", f"qcow2 incompatible feature bits "
                                                        f"{f['unknown-incompatible-bits']:#x} are unknown"))
    if "corrupt bit" in f.get("incompatible-features", ()):
        res.findings.append(Finding("corrupt-flag", "the qcow2 header has the corrupt bit set"))
