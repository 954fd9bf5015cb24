"""The references an image makes, as ``inspect`` reports them, judged by the untrusted-mode policy.

Nothing here decides what may be opened: the core's ``Guard`` (qimg.core.policy) resolves, judges
and records every reference the drivers name (backing files, data files, extents, bundle storages)
and refuses the ones the untrusted mode refuses, before anything is opened.  This module opens the
top image and its allowed backing files for their metadata under one such guard, and turns what the
guard recorded (or refused) into findings.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..core import registry
from ..core.driver import Opener
from ..core.policy import Guard, Policy, PolicyError
from ..errors import QimgError
from ..options import NO_IO

#: the root of an image read from a stream when no --allow-dir is given: a path no file can have
#: (a stream has no folder of its own, so nothing it names is allowed)
_NO_FOLDER = os.sep + "\0stream"


def make_guard(filename: str, policy: Policy | None, stream: bool) -> Guard:
    """The guard of one inspection: ``policy`` (the global options) in untrusted mode, rooted at the
    image's folder, or for a stream at the --allow-dir folders only."""
    policy = replace(policy or Policy(), untrusted=True)
    if not stream:
        return Guard(policy, filename)
    roots = tuple(os.path.realpath(d) for d in policy.allow_dirs) or (_NO_FOLDER,)
    return Guard(replace(policy, roots=roots))


def open_top(store, filename: str, fmt: str, guard: Guard):
    """Open the top image over ``store`` (which stays the caller's) for its metadata only."""
    opener = Opener(filename, False, guard=guard, image=filename,
                    open_image=lambda f, t, w: registry.open_image(f, t, False, {NO_IO: True}, guard=guard))
    return registry.get_driver(fmt).open(store, filename, writable=False, opener=opener, options={NO_IO: True})


def descriptor_extents(store, filename: str, guard: Guard) -> None:
    """Judge every extent a VMDK descriptor file names, before the driver opens them: the driver stops at
    the first one refused, and a gate wants to see them all."""
    from ..core.policy import EXTENT
    from ..formats.vmdk import descriptor as dsc

    head = store.pread(0, 4)
    if head in (b"KDMV", b"COWD"):
        return  # a sparse file: its embedded descriptor names no other file
    try:
        desc = dsc.parse(store.pread(0, dsc.MAX_DESCRIPTOR_BYTES), extents_required=True)
    except QimgError:
        return  # the open reports what is wrong with it
    base = os.path.dirname(filename)
    for line in desc.extents:
        if line.filename:
            path = line.filename if os.path.isabs(line.filename) else os.path.join(base, line.filename)
            ref = guard.policy.judge(filename, line.filename, path, EXTENT)
            if ref not in guard.references:
                guard.references.append(ref)


def follow_backing(top: str, name: str, fmt: str | None, guard: Guard) -> tuple[str, str] | None:
    """Judge and open, metadata only, the backing chain below ``top`` (whose backing name is ``name``),
    as far as the policy allows; every reference lands in ``guard.references``.  Returns a finding
    (id, message) for a chain that stops early for a reason that is not a reference (loop, depth, a
    layer that does not open), else None."""
    seen = {os.path.realpath(top)}
    image, depth = top, 1
    while name:
        try:
            path, fmt = registry.admit_backing(guard, image, name, fmt, depth, top)
        except PolicyError as e:
            return None if e.reference is not None else ("chain-too-deep", str(e))
        real = os.path.realpath(path)
        if real in seen:
            return "chain-loop", f"backing file '{path}' of '{image}' loops back into the chain"
        seen.add(real)
        if not os.path.exists(path):
            return None  # reported as reference-missing
        try:
            drv = registry.open_image(path, fmt, False, {NO_IO: True}, guard=guard)
        except PolicyError:
            return None
        except QimgError as e:
            return "invalid-image", f"backing file '{path}': {e}"
        try:
            nxt = drv.backing
        finally:
            drv.close()
        image, name, fmt = path, (nxt.filename if nxt else None), (nxt.fmt if nxt else None)
        depth += 1
    return None


def reference_dict(ref) -> dict:
    """A policy Reference as inspect's JSON shows it."""
    d = {"kind": ref.kind, "name": ref.name, "resolved": ref.resolved, "allowed": ref.allowed, "image": ref.image}
    if ref.reason:
        d["reason"] = ref.reason
    return d


def reference_problem(ref) -> str | None:
    """The finding id a reference raises: refused, or allowed but not there."""
    if not ref.allowed:
        return "reference-refused"
    if ref.resolved is None or not os.path.exists(ref.resolved):
        return "reference-missing"
    return None


def reference_message(ref) -> str:
    why = ref.reason if not ref.allowed else "does not exist"
    return f"{ref.kind} '{ref.name}' of '{ref.image}': {why}"
