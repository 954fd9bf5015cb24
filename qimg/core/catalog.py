"""The driver catalog: format and protocol names to driver classes, imported lazily.

A leaf of core/: it opens nothing, so the registry (which opens images) and the Opener (which opens
files beside an image, possibly on a protocol such as nbd:) both look drivers up here.
"""

from __future__ import annotations

import importlib
import importlib.util  # format_names() uses find_spec; not always imported at start-up
import os

from ..errors import OpenError

#: name -> "module:Class".  Order matters: probe ties go to the earlier entry.
FORMATS: dict[str, str] = {
    "qcow2": "qimg.formats.qcow2:Qcow2Driver",
    "qed": "qimg.formats.qed:QedDriver",
    "qcow": "qimg.formats.qcow:QcowDriver",
    "vdi": "qimg.formats.vdi:VdiDriver",
    "vmdk": "qimg.formats.vmdk:VmdkDriver",
    "vpc": "qimg.formats.vpc:VpcDriver",
    "vhdx": "qimg.formats.vhdx:VhdxDriver",
    "parallels": "qimg.formats.parallels:ParallelsDriver",
    "bochs": "qimg.formats.bochs:BochsDriver",
    "cloop": "qimg.formats.cloop:CloopDriver",
    "dmg": "qimg.formats.dmg:DmgDriver",
    "luks": "qimg.formats.luks:LuksDriver",
    "cow": "qimg.formats.cow:CowDriver",
    "raw": "qimg.formats.raw:RawDriver",
    # qemu's protocol driver for host files, usable as a format (-f file, --image-opts driver=file)
    "file": "qimg.formats.raw:FileDriver",
}

#: filename prefixes handled by protocol drivers (no host file behind them)
PROTOCOLS: dict[str, str] = {
    "nbd:": "qimg.formats.nbd:NbdDriver",
    "nbd+unix:": "qimg.formats.nbd:NbdDriver",
    "nbd+tcp:": "qimg.formats.nbd:NbdDriver",
    "fat:": "qimg.formats.vvfat:VvfatDriver",
}

_cache: dict[str, type] = {}


def format_names() -> list[str]:
    """Names of the formats whose driver module exists."""
    names = []
    for name, target in FORMATS.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


def get_driver(name: str) -> type:
    """The driver class for a format name; OpenError for an unknown one."""
    if name in _cache:
        return _cache[name]
    target = FORMATS.get(name) or PROTOCOLS.get(name)
    if target is None:
        raise OpenError(f"Unknown driver '{name}'")
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise OpenError(f"Unknown driver '{name}'") from None
        raise
    cls = getattr(module, cls_name)
    _cache[name] = cls
    return cls


def protocol_for(filename: str) -> str | None:
    """The protocol prefix of a filename like nbd://host/x or fat:dir, if any."""
    for prefix in PROTOCOLS:
        if filename.startswith(prefix):
            return prefix
    return None


def resolve_backing(overlay_filename: str, backing_name: str) -> str:
    """A backing name as qemu resolves it: relative to the overlay's directory (a C string: NUL ends it)."""
    from ..io.remote import url_scheme

    backing_name = backing_name.split("\0", 1)[0]
    if protocol_for(backing_name) or os.path.isabs(backing_name) or url_scheme(backing_name) or \
            backing_name.startswith("json:"):
        return backing_name  # a URL (or a json: name) is opened as named, never joined to the overlay's directory
    base = os.path.dirname(overlay_filename)
    return os.path.join(base, backing_name) if base else backing_name


#: qemu reads this many bytes to probe a format (BLOCK_PROBE_BUF_SIZE): a magic further in does not count
PROBE_BYTES = 512


#: what each format's probe needs at the least (its magic, from the specs): a driver module whose
#: hint fails is not even imported while probing, so ``info`` on a raw or qcow2 file loads one or
#: two modules.  Formats not listed here are always asked.
_MAGIC_HINTS = {
    "qcow2": lambda h, f: h[:4] == b"QFI\xfb",
    "qcow": lambda h, f: h[:4] == b"QFI\xfb",
    "qed": lambda h, f: h[:4] == b"QED\0",
    "vdi": lambda h, f: h[64:68] == b"\x7f\x10\xda\xbe",
    "vpc": lambda h, f: h[:8] == b"conectix",
    "vhdx": lambda h, f: h[:8] == b"vhdxfile",
    "bochs": lambda h, f: h[:22] == b"Bochs Virtual HD Image",
    "cloop": lambda h, f: h[:9] == b"#!/bin/sh",
    "luks": lambda h, f: h[:6] == b"LUKS\xba\xbe",
    "cow": lambda h, f: h[:4] in (b"OOOM", b"MOOO"),  # big-endian v2/v3, host-endian (x86) v1
    # sparse/COWD headers, or a text descriptor (whose first statement is version=N)
    "vmdk": lambda h, f: h[:4] in (b"KDMV", b"COWD") or b"version=" in h,
    # the header magics, or a bundle's DiskDescriptor.xml
    "parallels": lambda h, f: h[:4] == b"With" or b"<Parallels_disk_image" in h,
    "dmg": lambda h, f: f.endswith(".dmg"),  # qemu probes dmg by name only
    "file": lambda h, f: False,  # never probed: asked for by name only
}


def probe(head: bytes, filename: str) -> str:
    """The best-scoring format for the first bytes of a file (raw scores 1)."""
    best, best_score = "raw", 1
    for name in FORMATS:
        if name == "raw":
            continue
        hint = _MAGIC_HINTS.get(name)
        if hint is not None and not hint(head, filename):
            continue
        try:
            cls = get_driver(name)
        except OpenError:
            continue
        score = cls.probe(head, filename)
        if score > best_score:
            best, best_score = name, score
    return best
