"""Hostile-image generator and bounds runner.

Crafts, for every format qemu-img creates, images an attacker could write: huge and overflowing
sizes, tables past the end of the file, memory bombs (huge L1/BAT/block map/grain directory counts,
huge snapshot tables, huge header-extension and descriptor lengths), reference escapes (absolute
paths, ``..``, flat extents naming a secret file), backing loops and deep chains, and polyglots.
Each image is run through info, map, check, convert -O raw, compare and measure in a child process
with an address-space limit (``RLIMIT_AS``) and a hang timeout, trusted and untrusted.

A run passes when every command exits 0 or fails cleanly (one ``qimg:`` line, no traceback, no
"internal error"), and, in untrusted mode, no byte of the secret file outside the allowed folder
appears in any output.  ``python fuzz/hostile.py [--out DIR] [--report]`` runs everything and
prints the maximum time and RSS per format (what ``fuzz/HOSTILE.md`` records); the test
``tests/formats/test_hostile_bounds.py`` runs the same cases without timing assertions.
"""

from __future__ import annotations

import os
import resource
import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field

#: the target: no crafted image may make a command use more than this
TARGET_BYTES = 256 << 20
#: address space allowed to a child: the target plus what the interpreter maps at start-up
#: (python + numpy map ~60 MiB of address space; 256 MiB alone already runs every command)
AS_LIMIT = TARGET_BYTES + (64 << 20)
#: hang detection only: a child running longer than this is a hang
HANG_TIMEOUT = 30
#: what the secret file holds (it must never appear in any output in untrusted mode)
SECRET = b"TOP-SECRET-HOSTILE-BYTES-" * 40

COMMANDS = ("info", "map", "check", "convert", "compare", "measure")


@dataclass
class Case:
    name: str
    fmt: str
    path: str
    #: expected untrusted outcome: None (either), or a substring of the error
    refs: bool = False
    extra: list = field(default_factory=list)


def _qemu(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _field(path: str, offset: int, fmt: str) -> int:
    """The one value of ``fmt`` stored at ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _patch(path: str, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _append(path: str, data: bytes) -> int:
    with open(path, "ab") as f:
        off = f.tell()
        f.write(data)
    return off


def _vpc_checksum(raw: bytes, at: int) -> bytes:
    b = bytearray(raw)
    b[at:at + 4] = bytes(4)
    return bytes(b[:at]) + struct.pack(">I", ~sum(b) & 0xFFFFFFFF) + bytes(b[at + 4:])


def _vpc_patch(path: str, dyn_field: int | None, fmt: str, value, footer_field: int | None = None) -> None:
    """Patch a field of a dynamic VHD's dynamic header (offset relative to it) or footer, fixing checksums."""
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        if dyn_field is not None:
            f.seek(512)
            dyn = bytearray(f.read(1024))
            struct.pack_into(fmt, dyn, dyn_field, value)
            f.seek(512)
            f.write(_vpc_checksum(bytes(dyn), 36))
        if footer_field is not None:
            for at in (0, size - 512):
                f.seek(at)
                foot = bytearray(f.read(512))
                struct.pack_into(fmt, foot, footer_field, value)
                f.seek(at)
                f.write(_vpc_checksum(bytes(foot), 64))


def _dmg(path: str, chunks, sectors: int) -> str:
    """A UDIF image: chunks (type, first sector, sector count, stored bytes or None for past EOF)."""
    import plistlib

    data = bytearray()
    table = bytearray()
    for t, sec, cnt, stored in chunks:
        off = len(data) if stored is not None else 1 << 40
        n = len(stored) if stored is not None else 512
        table += struct.pack(">IIQQQQ", t, 0, sec, cnt, off, n)
        data += stored or b""
    table += struct.pack(">IIQQQQ", 0xFFFFFFFF, 0, 0, 0, 0, 0)
    n = len(table) // 40
    mish = (b"mish" + struct.pack(">IQQQII", 1, 0, sectors, 0, 0, 0) + bytes(24) + bytes(136)
            + struct.pack(">I", n) + bytes(table))
    xml = plistlib.dumps({"resource-fork": {"blkx": [{"Data": mish, "Name": "disk", "ID": "0"}]}})
    koly = bytearray(512)
    struct.pack_into(">4sIII", koly, 0, b"koly", 4, 512, 1)
    struct.pack_into(">QQ", koly, 24, 0, len(data))
    struct.pack_into(">QQ", koly, 216, len(data), len(xml))
    struct.pack_into(">Q", koly, 492, sectors)
    with open(path, "wb") as f:
        f.write(bytes(data) + xml + bytes(koly))
    return path


def _cloop(path: str, block_size: int, blocks) -> str:
    """A cloop image of zlib ``blocks`` (None: a huge block count with no offsets table)."""
    pre = CLOOP_PREAMBLE.ljust(128, b"\0")
    if blocks is None:
        raw = pre + struct.pack(">II", block_size, (1 << 26) - 1) + bytes(4096)
    else:
        base = 128 + 8 + 8 * (len(blocks) + 1)
        offs = [base]
        for b in blocks:
            offs.append(offs[-1] + len(b))
        table = struct.pack(f">{len(offs)}Q", *offs)
        raw = pre + struct.pack(">II", block_size, len(blocks)) + table + b"".join(blocks)
    with open(path, "wb") as f:
        f.write(raw)
    return path


CLOOP_PREAMBLE = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"


def _bochs(path: str, catalog: int, extent: int, disk: int, entry: int) -> str:
    """A Bochs growing image: ``catalog`` entries of ``extent`` bytes, the first one ``entry``."""
    h = bytearray(512)
    h[0:22] = b"Bochs Virtual HD Image"
    h[32:39] = b"Redolog"
    h[48:55] = b"Growing"
    struct.pack_into("<IIIII", h, 64, 0x00020000, 512, catalog, 512, extent)
    struct.pack_into("<Q", h, 88, disk)
    cat = struct.pack("<I", entry) + b"\xff\xff\xff\xff" * (min(catalog, 4096) - 1)
    with open(path, "wb") as f:
        f.write(bytes(h) + cat + b"\xff" * 512 + b"\x5a" * extent if extent <= 4096 else bytes(h) + cat)
    return path


def _stream_bomb(path: str) -> bool:
    """Replace the first grain of a streamOptimized VMDK by a stream inflating to 64 MiB (in place)."""
    bomb = zlib.compress(bytes(64 << 20), 9)
    with open(path, "r+b") as f:
        raw = f.read()
        for o in range(512, len(raw) - 512, 512):
            lba, size = struct.unpack_from("<QI", raw, o)
            if lba == 0 and len(bomb) <= size < 1 << 20 and raw[o + 12] == 0x78:
                f.seek(o)
                f.write(struct.pack("<QI", 0, len(bomb)) + bomb)
                return True
    return False


def _seed(d: str, name: str, fmt: str, size: str = "64M", opts: str = "", data: bool = True) -> str:
    path = os.path.join(d, name)
    raw = os.path.join(d, "seed.raw")
    if not os.path.exists(raw):
        with open(raw, "wb") as f:
            f.truncate(4 << 20)
            f.seek(0)
            f.write(os.urandom(1 << 20))
            f.seek(3 << 20)
            f.write(b"\x5a" * (256 << 10))
    if data:
        args = ["convert", "-f", "raw", "-O", fmt] + (["-o", opts] if opts else []) + [raw, path]
        _qemu(*args)
        if size:
            try:
                _qemu("resize", "-f", fmt, path, size)
            except subprocess.CalledProcessError:
                pass
    else:
        _qemu("create", "-f", fmt, *(["-o", opts] if opts else []), path, size)
    return path


def _variant(d: str, seed: str, name: str) -> str:
    path = os.path.join(d, name)
    shutil.copy(seed, path)
    return path


def craft(d: str, secret: str) -> list[Case]:
    """Every hostile image, written under ``d``; ``secret`` is a file outside ``d`` they may name."""
    cases: list[Case] = []

    def add(name, fmt, path, refs=False):
        cases.append(Case(name, fmt, path, refs))

    # ---- qcow2 ----
    q = _seed(d, "seed.qcow2", "qcow2")
    for name, off, fmt, val in (
        ("size-huge", 24, ">Q", (1 << 63) - 512),
        ("l1-size-huge", 36, ">I", 0x7FFFFFFF),
        ("l1-past-eof", 40, ">Q", 1 << 40),
        ("refcount-clusters-huge", 56, ">I", 0x7FFFFFFF),
        ("refcount-table-past-eof", 48, ">Q", 1 << 40),
        ("snapshots-huge", 60, ">I", 65536),
        ("cluster-bits-huge", 20, ">I", 31),
        ("header-length-huge", 100, ">I", 0xFFFFFFF8),
    ):
        p = _variant(d, q, f"qcow2-{name}.qcow2")
        _patch(p, off, fmt, val)
        if name == "snapshots-huge":
            _patch(p, 64, ">Q", 0x10000)
        add(f"qcow2/{name}", "qcow2", p)
    # an L1 entry past EOF and one misaligned
    for name, val in (("l2-past-eof", 1 << 40), ("l2-misaligned", 0x10200)):
        p = _variant(d, q, f"qcow2-{name}.qcow2")
        l1 = _field(p, 40, ">Q")
        _patch(p, l1, ">Q", val | (1 << 63))
        add(f"qcow2/{name}", "qcow2", p)
    # a header extension claiming a huge length
    p = _variant(d, q, "qcow2-ext-huge.qcow2")
    hl = _field(p, 100, ">I")
    _patch(p, hl, ">II", 0x12345678, 0xFFFFFFF0)
    add("qcow2/header-extension-huge", "qcow2", p)
    # references: an absolute path to the secret, a '..' escape, an external data file
    for name, ref in (("backing-absolute", secret),
                      ("backing-dotdot", os.path.join("..", os.path.basename(os.path.dirname(secret)),
                                                      os.path.basename(secret)))):
        p = os.path.join(d, f"qcow2-{name}.qcow2")
        _qemu("create", "-f", "qcow2", "-u", "-b", ref, "-F", "raw", p, "64M")
        add(f"qcow2/{name}", "qcow2", p, refs=True)
    p = os.path.join(d, "qcow2-datafile.qcow2")
    _qemu("create", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on", p, "64M")
    add("qcow2/data-file-escape", "qcow2", p, refs=True)
    # a backing loop a -> b -> a and a chain 24 deep
    a, b = os.path.join(d, "loop-a.qcow2"), os.path.join(d, "loop-b.qcow2")
    _qemu("create", "-f", "qcow2", "-u", "-b", "loop-b.qcow2", "-F", "qcow2", a, "64M")
    _qemu("create", "-f", "qcow2", "-u", "-b", "loop-a.qcow2", "-F", "qcow2", b, "64M")
    add("qcow2/backing-loop", "qcow2", a)
    prev = os.path.join(d, "deep-0.qcow2")
    _qemu("create", "-f", "qcow2", prev, "64M")
    for i in range(1, 25):
        cur = os.path.join(d, f"deep-{i}.qcow2")
        _qemu("create", "-f", "qcow2", "-u", "-b", os.path.basename(prev), "-F", "qcow2", cur, "64M")
        prev = cur
    add("qcow2/deep-chain", "qcow2", prev)
    # a compressed cluster whose stream inflates far past the cluster (a decompression bomb)
    p = os.path.join(d, "qcow2-bomb.qcow2")
    _qemu("create", "-f", "qcow2", p, "64M")
    co = zlib.compressobj(9, zlib.DEFLATED, -12)
    bomb = co.compress(bytes(64 << 20)) + co.flush()
    off = _append(p, bytes((-os.path.getsize(p)) % 65536))
    off = _append(p, bytes(65536))  # the L2 table
    host = _append(p, bomb)
    l1 = _field(p, 40, ">Q")
    _patch(p, l1, ">Q", off | (1 << 63))
    nsect = min(len(bomb) // 512, (1 << 8) - 1)  # cluster_bits 16: 62 - 8 = 54 offset bits
    _patch(p, off, ">Q", (1 << 62) | (nsect << 54) | host)
    add("qcow2/compressed-bomb", "qcow2", p)

    # ---- qcow (v1) ----
    c = _seed(d, "seed.qcow", "qcow")
    for name, off, fmt, val in (("size-huge", 24, ">Q", (1 << 63) - 512), ("l1-past-eof", 40, ">Q", 1 << 40),
                                ("cluster-bits-huge", 32, ">B", 30), ("l2-bits-huge", 33, ">B", 30)):
        p = _variant(d, c, f"qcow-{name}.qcow")
        _patch(p, off, fmt, val)
        add(f"qcow/{name}", "qcow", p)
    p = os.path.join(d, "qcow-backing-absolute.qcow")
    _qemu("create", "-f", "qcow", "-u", "-b", secret, "-F", "raw", p, "64M")
    add("qcow/backing-absolute", "qcow", p, refs=True)

    # ---- qed ----
    e = _seed(d, "seed.qed", "qed")
    for name, off, fmt, val in (("size-huge", 48, "<Q", (1 << 63) - 512), ("l1-past-eof", 40, "<Q", 1 << 40),
                                ("table-size-huge", 8, "<I", 16), ("header-size-huge", 12, "<I", 0xFFFFFFFF),
                                ("l1-in-header", 40, "<Q", 0)):
        p = _variant(d, e, f"qed-{name}.qed")
        _patch(p, off, fmt, val)
        add(f"qed/{name}", "qed", p)
    for name, val in (("l2-past-eof", 1 << 40), ("l2-misaligned", 0x10200), ("l2-is-l1", None)):
        p = _variant(d, e, f"qed-{name}.qed")
        l1 = _field(p, 40, "<Q")
        _patch(p, l1, "<Q", l1 if val is None else val)
        add(f"qed/{name}", "qed", p)
    p = os.path.join(d, "qed-backing-absolute.qed")
    _qemu("create", "-f", "qed", "-b", secret, "-F", "raw", p, "64M")
    add("qed/backing-absolute", "qed", p, refs=True)

    # ---- vdi ----
    v = _seed(d, "seed.vdi", "vdi")
    for name, off, fmt, val in (("blocks-huge", 0x180, "<I", 0x3FFFFFFF), ("size-huge", 0x170, "<Q", 1 << 62),
                                ("bmap-past-eof", 0x154, "<I", 0x7FFFFE00), ("bmap-in-header", 0x154, "<I", 0)):
        p = _variant(d, v, f"vdi-{name}.vdi")
        _patch(p, off, fmt, val)
        add(f"vdi/{name}", "vdi", p)
    p = _variant(d, v, "vdi-entry-past-eof.vdi")
    bmap = _field(p, 0x154, "<I")
    _patch(p, bmap, "<I", 3)  # inside the image's blocks, past the two the file holds
    add("vdi/entry-past-eof", "vdi", p)

    # ---- vpc (dynamic) ----
    h = _seed(d, "seed.vhd", "vpc")
    for name, dyn, fmt, val, foot in (("bat-entries-huge", 28, ">I", 0xFFFFFFFF, None),
                                      ("bat-past-eof", 16, ">Q", 1 << 40, None),
                                      ("block-size-huge", 32, ">I", 0x80000000, None),
                                      ("size-huge", None, ">Q", (1 << 63) - 512, 48),
                                      ("bat-over-header", 16, ">Q", 512, None)):
        p = _variant(d, h, f"vpc-{name}.vhd")
        _vpc_patch(p, dyn, fmt, val, foot)
        add(f"vpc/{name}", "vpc", p)
    p = _variant(d, h, "vpc-entry-past-eof.vhd")
    bat = _field(p, 512 + 16, ">Q")
    _patch(p, bat, ">I", 0x7FFFFFF0)
    add("vpc/entry-past-eof", "vpc", p)

    # ---- vhdx (CRC-protected headers: truncation and a polyglot) ----
    x = _seed(d, "seed.vhdx", "vhdx")
    p = _variant(d, x, "vhdx-truncated.vhdx")
    os.truncate(p, 1 << 20)
    add("vhdx/truncated", "vhdx", p)

    # ---- vmdk ----
    k = _seed(d, "seed.vmdk", "vmdk")
    for name, off, fmt, val in (("capacity-huge", 12, "<Q", (1 << 62)), ("gtes-huge", 44, "<I", 0x7FFFFFFF),
                                ("gd-past-eof", 56, "<Q", 1 << 31), ("desc-size-huge", 36, "<Q", 1 << 40),
                                ("grain-huge", 20, "<Q", 1 << 40)):
        p = _variant(d, k, f"vmdk-{name}.vmdk")
        _patch(p, off, fmt, val)
        add(f"vmdk/{name}", "vmdk", p)
    p = _variant(d, k, "vmdk-grain-past-eof.vmdk")
    gd = _field(p, 56, "<Q") * 512
    gt = _field(p, gd, "<I") * 512
    _patch(p, gt, "<I", 0x7FFFFFF0)
    add("vmdk/grain-past-eof", "vmdk", p)
    s = _seed(d, "seed-stream.vmdk", "vmdk", opts="subformat=streamOptimized", size="")
    add("vmdk/stream-seed", "vmdk", s)
    p = _variant(d, s, "vmdk-stream-bomb.vmdk")
    if _stream_bomb(p):
        add("vmdk/stream-grain-bomb", "vmdk", p)
    p = os.path.join(d, "vmdk-flat-escape.vmdk")
    with open(p, "w") as f:
        f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                f'RW 8 FLAT "{secret}" 0\nddb.virtualHWVersion = "4"\n')
    add("vmdk/flat-extent-escape", "vmdk", p, refs=True)
    p = os.path.join(d, "vmdk-many-extents.vmdk")
    with open(p, "w") as f:
        f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n')
        f.write(f'RW {1 << 40} ZERO\n' * 20000)
    add("vmdk/many-extents", "vmdk", p)

    # ---- parallels ----
    r = _seed(d, "seed.parallels", "parallels")
    for name, off, fmt, val in (("bat-entries-huge", 32, "<I", 0xFFFFFFFF), ("size-huge", 36, "<Q", 1 << 62),
                                ("cluster-huge", 28, "<I", 0x80000000)):
        p = _variant(d, r, f"parallels-{name}.parallels")
        _patch(p, off, fmt, val)
        add(f"parallels/{name}", "parallels", p)
    p = _variant(d, r, "parallels-entry-past-eof.parallels")
    _patch(p, 64, "<I", 0x7FFFFFF0)
    add("parallels/entry-past-eof", "parallels", p)

    # ---- dmg (written by hand: a plist of mish blocks and a koly trailer) ----
    zeros64 = zlib.compress(bytes(64 << 20), 9)
    past = zlib.compress(bytes(1 << 20), 9)
    for name, chunks, sectors in (
        ("zlib-64m-exact", [(0x80000005, 0, 131072, zeros64)], 131072),
        ("zlib-inflates-past-size", [(0x80000005, 0, 8, past)], 8),
        ("many-chunks", [(1, i, 1, b"\x5a" * 512) for i in range(60000)], 60000),
        ("sector-count-huge", [(1, 0, 1, b"\x5a" * 512)], (1 << 54)),
        ("chunk-past-eof", [(1, 0, 1, None)], 1),
    ):
        add(f"dmg/{name}", "dmg", _dmg(os.path.join(d, f"dmg-{name}.dmg"), chunks, sectors))

    # ---- cloop and bochs (read-only formats, written by hand) ----
    for name, bs, blocks in (("block-64m-bomb", 64 << 20, [zeros64]),
                             ("inflates-past-size", 512, [past]),
                             ("blocks-huge", 512, None)):
        add(f"cloop/{name}", "cloop", _cloop(os.path.join(d, f"cloop-{name}.cloop"), bs, blocks))
    for name, catalog, extent, disk, entry in (("catalog-huge", 1 << 24, 4096, 1 << 36, 0),
                                               ("extent-huge", 4, 1 << 30, 1 << 32, 0),
                                               ("disk-huge", 4, 4096, (1 << 63) - 512, 0),
                                               ("entry-past-eof", 4, 4096, 16384, 0x7FFFFFF0)):
        add(f"bochs/{name}", "bochs", _bochs(os.path.join(d, f"bochs-{name}.bochs"), catalog, extent, disk, entry))

    # ---- polyglot: a qcow2 header at the start of an ISO 9660 volume ----
    p = _variant(d, q, "polyglot.iso")
    with open(p, "r+b") as f:
        f.seek(0x8001)
        f.write(b"CD001")
    add("polyglot/qcow2-in-iso", "qcow2", p)
    return cases


@dataclass
class Outcome:
    case: str
    fmt: str
    mode: str
    command: str
    rc: int
    seconds: float
    rss: int
    err: str
    out: bytes


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def _argv(case: Case, command: str, untrusted: bool, out_dir: str) -> list[str]:
    g = ["--untrusted"] if untrusted else []
    p = case.path
    if command == "info":
        return g + ["info", "--output=json", "--backing-chain", p]
    if command == "map":
        return g + ["map", "--output=json", p]
    if command == "check":
        return g + ["check", p]
    if command == "convert":
        return g + ["convert", "-O", "raw", p, os.path.join(out_dir, "out.raw")]
    if command == "compare":
        return g + ["compare", p, p]
    return g + ["measure", "-O", "qcow2", p]


def run_one(case: Case, command: str, untrusted: bool, out_dir: str, root: str | None = None) -> Outcome:
    """One command on one case in a child process under the address-space limit."""
    env = dict(os.environ)
    env.pop("QIMG_UNTRUSTED", None)
    if root:
        env["PYTHONPATH"] = root
    argv = [sys.executable, "-m", "qimg", *_argv(case, command, untrusted, out_dir)]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         preexec_fn=_limit, env=env, cwd=out_dir)
    out, err, rc, rss = _wait(p)
    converted = os.path.join(out_dir, "out.raw")
    if os.path.exists(converted):
        with open(converted, "rb") as f:
            out += _find_secret(f)
        os.unlink(converted)
    return Outcome(case.name, case.fmt, "untrusted" if untrusted else "trusted", command, rc,
                   time.monotonic() - t0, rss, err.decode(errors="replace"), out)


def _wait(p):
    """(stdout, stderr, exit status, peak RSS in bytes) of a child, killed after HANG_TIMEOUT."""
    import threading

    bufs = {}

    def drain(name, stream):
        bufs[name] = stream.read()

    threads = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", p.stdout), ("err", p.stderr))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + HANG_TIMEOUT
    hung = False
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            p.kill()
            hung = True
            pid, status, ru = os.wait4(p.pid, 0)
            break
        time.sleep(0.01)
    p.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join()
    err = bufs.get("err", b"") + (b"\nHANG" if hung else b"")
    return bufs.get("out", b""), err, p.returncode, ru.ru_maxrss * 1024


def _find_secret(f) -> bytes:
    """The secret's marker if the converted file holds it (without reading a huge output into memory)."""
    marker = SECRET[:25]
    tail = b""
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            return b""
        if marker in tail + chunk:
            return marker
        tail = chunk[-len(marker):]


def problems(o: Outcome) -> list[str]:
    """What is wrong with an outcome (empty when it is clean)."""
    bad = []
    if "HANG" in o.err:
        bad.append("hang")
    if "Traceback" in o.err or "internal error" in o.err:
        bad.append("internal error: " + o.err.strip().splitlines()[-1][:200])
    # qemu-img's statuses: 1 error; check 2 (corruptions), 3 (leaks), 63 (no checks for the format);
    # compare 1 (different), 2 (error), 4 (read error)
    if o.rc not in (0, 1, 2, 3, 4, 63):
        bad.append(f"exit status {o.rc}")
    if o.rc != 0 and o.command != "check" and o.command != "compare":
        lines = [ln for ln in o.err.splitlines() if ln.strip()]
        if not lines or not lines[0].startswith("qimg: ") and "HANG" not in o.err:
            bad.append("unclean error: " + o.err[:200])
    if o.mode == "untrusted" and (SECRET[:25] in o.out or SECRET[:25].decode() in o.err):
        bad.append("secret leaked")
    return bad


def secret_file(parent: str) -> str:
    """The secret, in a folder beside the images' one (outside what untrusted mode allows)."""
    sd = os.path.join(parent, "outside")
    os.makedirs(sd, exist_ok=True)
    path = os.path.join(sd, "secret.raw")
    with open(path, "wb") as f:
        f.write(SECRET * 64)
        f.truncate(64 << 20)
    return path


def main(argv: list[str]) -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for the images (a temporary one unless given)")
    ap.add_argument("-k", help="only cases whose name contains this")
    a = ap.parse_args(argv)
    base = a.out or tempfile.mkdtemp(prefix="qimg-hostile-")
    img = os.path.join(base, "images")
    os.makedirs(img, exist_ok=True)
    secret = secret_file(base)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worst: dict[str, list] = {}
    failures = 0
    for case in craft(img, secret):
        if a.k and a.k not in case.name:
            continue
        for untrusted in (False, True):
            for cmd in COMMANDS:
                o = run_one(case, cmd, untrusted, img, root)
                w = worst.setdefault(case.fmt, [0.0, 0, ""])
                if o.seconds > w[0]:
                    w[0], w[2] = o.seconds, f"{o.mode} {cmd} {case.name}"
                w[1] = max(w[1], o.rss)
                bad = problems(o)
                if bad:
                    failures += 1
                    print(f"FAIL {o.mode} {cmd} {case.name}: {'; '.join(bad)}", flush=True)
    print("| format | max time (s) | slowest run | max RSS (MiB) |")
    print("|---|---|---|---|")
    for fmt, (sec, rss, what) in sorted(worst.items()):
        print(f"| {fmt} | {sec:.2f} | {what} | {rss / (1 << 20):.0f} |")
    print(f"failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
