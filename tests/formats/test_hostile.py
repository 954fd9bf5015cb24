"""Hostile images: mutated and truncated files of every finished format must fail cleanly.

Each seed image is mutated deterministically (boundary values in header fields and tables, bit
flips, truncations, table entries pointing past the end of the file or into the header) and run
through info, map, convert, check and compare.  A command may succeed or fail, but a failure is
one ``qimg: ...`` line (a few documented messages carry more lines), never an internal error or
a traceback, and the input file is never written.  A subset runs in a child process with a time
limit and an address-space limit so hangs and huge allocations fail the test instead of the box.
Specific damage found while hardening the drivers is pinned as regression cases at the end.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, decompress_to, run_qimg, write_pattern

SECRET = ["--object", "secret,id=s0,data=abc"]

#: boundary values written over 4- and 8-byte fields
B2 = (0, 1, 0x7FFF, 0x8000, 0xFFFF)
B4 = (0, 1, 0x200, 0x10000, 0x7FFFFE00, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
B8 = (0, 1, 1 << 32, 1 << 40, 0x7FFFFFFF, 0xFFFFFFFF, (1 << 63) - 1, 1 << 63, (1 << 64) - 512, (1 << 64) - 1)

#: multi-line error messages qemu-img prints the same way (first line, then fixed follow-up lines)
MULTI_LINE_OK = ("contains a log that needs to be replayed",)

#: memory limit for the child-process runs (python + numpy need ~150 MiB; a hostile table must not add GiBs)
AS_LIMIT = 1536 << 20
CHILD_TIMEOUT = 20

# format, file name, extra convert options used to build the seed from a pattern file
BUILT = [
    ("vmdk", "sparse.vmdk", []),
    ("vmdk", "stream.vmdk", ["-o", "subformat=streamOptimized"]),
    ("vmdk", "flat.vmdk", ["-o", "subformat=monolithicFlat"]),
    ("vdi", "a.vdi", []),
    ("vpc", "dyn.vpc", []),
    ("vpc", "fixed.vpc", ["-o", "subformat=fixed"]),
    ("vhdx", "a.vhdx", ["-o", "block_size=1M"]),
    ("qcow", "a.qcow", []),
    ("qed", "a.qed", []),
    ("parallels", "a.parallels", []),
    ("cow", "a.cow", []),
    ("luks", "a.luks", [*SECRET, "-o", "key-secret=s0,iter-time=5"]),
]
# read-only formats: images from the shared corpus
CORPUS = [
    ("bochs", "bochs/empty.bochs.bz2"),
    ("cloop", "cloop/simple-pattern.cloop.bz2"),
    ("dmg", "dmg/simple-dmg.dmg.bz2"),
    ("dmg", "dmg/hfsplus_zlib.dmg"),
]
CASES_PER_SEED = 16


# ----- seeds -----

@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-seeds")
    pattern = write_pattern(d / "pattern.raw", 4 << 20, [(0, 65536), (1 << 20, 65536), (3 << 20, 4096)], seed=9)
    for fmt, name, opts in BUILT:
        r = run_qimg("convert", "-O", fmt, *opts, pattern, d / name)
        assert r.rc == 0, (name, r.err)
    return d


def _seed(request, seed_dir, fmt, name):
    """(seed bytes, sibling files {name: bytes}) for a built or corpus seed."""
    if "/" in name:
        shared = request.getfixturevalue("shared_images")
        src = shared / name
        if not src.exists():
            pytest.skip(f"{name} not in the corpus")
        path = decompress_to(src, seed_dir / "corpus")
        return path.name, path.read_bytes(), {}
    data = (seed_dir / name).read_bytes()
    siblings = {}
    if fmt == "vmdk" and name == "flat.vmdk":
        siblings["flat-flat.vmdk"] = (seed_dir / "flat-flat.vmdk").read_bytes()
    return name, data, siblings


# ----- mutations -----

def _meta_sectors(data: bytes) -> list[int]:
    """Offsets of 512-byte sectors that are not one repeated byte (headers, tables: not payload fill)."""
    out = []
    for s in range(0, len(data), 512):
        b = data[s:s + 512]
        if b.count(b[:1]) != len(b):
            out.append(s)
    return out or [0]


def _text_mutation(data: bytes, rnd: random.Random) -> bytes:
    """For descriptor text: replace a number with a boundary value."""
    import re

    nums = list(re.finditer(rb"\d+", data))
    if not nums:
        return data
    m = rnd.choice(nums)
    val = str(rnd.choice((0, 1, 0x7FFFFFFF, 0xFFFFFFFF, (1 << 63) - 1, (1 << 64) - 1, 1 << 52))).encode()
    return data[:m.start()] + val + data[m.end():]


def mutate(data: bytes, rnd: random.Random, meta: list[int]) -> tuple[bytes, str]:
    buf = bytearray(data)
    kind = rnd.randrange(7)
    # half of the field and table mutations aim at a sector holding metadata, the rest at the first 4 KiB
    base = rnd.choice(meta) if rnd.random() < 0.5 else 0
    if len(buf) < 16:
        return bytes(buf) + rnd.randbytes(rnd.randrange(1, 600)), "short"
    if base + 16 > len(buf):
        base = 0  # a previous truncation removed that sector
    lim = min(len(buf) - base, 512 if base else 4096)
    if kind in (0, 1):
        for _ in range(rnd.randint(1, 3)):
            w = rnd.choice((2, 4, 4, 8, 8))
            off = base + (rnd.randrange(max(1, lim - w)) & ~(w - 1))
            e = rnd.choice("<>")
            v = rnd.choice({2: B2, 4: B4, 8: B8}[w])
            buf[off:off + w] = struct.pack(e + {2: "H", 4: "I", 8: "Q"}[w], v)
        return bytes(buf), f"fields@{base}"
    if kind == 2:
        for _ in range(rnd.randint(1, 8)):
            off = rnd.randrange(min(len(buf), 4096))
            buf[off] ^= 1 << rnd.randrange(8)
        return bytes(buf), "flips"
    if kind == 3:
        for _ in range(rnd.randint(1, 8)):
            off = base + rnd.randrange(lim) if base else rnd.randrange(len(buf))
            n = rnd.choice((1, 4, 8))
            buf[off:off + n] = rnd.randbytes(n)
        return bytes(buf), f"bytes@{base}"
    if kind == 4:
        cut = rnd.choice((rnd.randrange(len(buf)), rnd.randrange(min(len(buf), 8192))))
        return bytes(buf[:cut]), f"truncate{cut}"
    if kind == 5:  # table entries to past the end of the file or into the header
        for _ in range(rnd.randint(1, 4)):
            off = (base + rnd.randrange(lim)) & ~3
            v = rnd.choice((len(buf) // 512 + 10, 1, 0, len(buf) + 4096, 0x7FFFFFFF, len(buf) * 2 // 4096))
            buf[off:off + 4] = struct.pack(rnd.choice("<>") + "I", v & 0xFFFFFFFF)
        return bytes(buf), f"tables@{base}"
    if data[:1] in (b"#", b"v") and len(data) < 4096:
        return _text_mutation(data, rnd), "text"
    keep = rnd.randrange(512, max(513, len(buf) // 2))
    return bytes(buf[:keep]) + bytes(rnd.randrange(1, 1 << 16)), "zero-tail"


# ----- running and checking -----

def _commands(path: Path, fmt: str, i: int, out: Path, forced: bool):
    f = ["-f", fmt] if forced else []
    if fmt == "luks":
        spec = f"driver=luks,key-secret=s0,file.filename={path}"
        cmds = [["info", *f, path], ["info", "--output=json", *f, path]]
        if _luks_cheap(path):
            cmds += [["map", "--output=json", *SECRET, "--image-opts", spec],
                     ["convert", *SECRET, "--image-opts", spec, "-O", "raw", out]]
        return cmds
    cmds = [["info", "--output=json", *f, path], ["map", "--output=json", *f, path],
            ["convert", *f, "-O", "raw", path, out]]
    if i % 3 == 0:
        cmds.append(["info", *f, path])
    cmds.append(["check", *f, path] if i % 2 == 0 else ["compare", *(["-f", fmt, "-F", fmt] if forced else []),
                                                        path, path])
    return cmds


def _luks_cheap(path: Path) -> bool:
    """Unlocking runs PBKDF2: only try it while every iteration count stays small."""
    head = path.read_bytes()[:592]
    if len(head) < 592:
        return True
    iters = [struct.unpack_from(">I", head, 168)[0]]
    iters += [struct.unpack_from(">I", head, 208 + 48 * k + 4)[0] for k in range(8)]
    return max(iters) <= 1 << 16


def assert_clean(args, r, allow_multiline=False):
    where = f"qimg {' '.join(map(str, args))}"
    assert "internal error" not in r.err and "Traceback" not in r.err, f"{where}: {r.err}"
    assert "Out of memory" not in r.err, f"{where}: {r.err}"
    if r.rc != 0 and args[0] not in ("check", "compare"):
        lines = [ln for ln in r.err.splitlines() if ln.strip()]
        assert lines and lines[0].startswith("qimg: "), f"{where}: rc {r.rc}, stderr {r.err!r}"
        if len(lines) > 1 and not allow_multiline:
            assert any(m in lines[0] for m in MULTI_LINE_OK), f"{where}: several lines: {r.err!r}"
    if args[0] in ("check", "compare") and r.err.strip():
        first = r.err.splitlines()[0]
        # check reports its findings on stderr with the image's own words; an error still has the prefix
        assert r.rc in (0, 1, 2, 3, 63) or first.startswith("qimg: "), f"{where}: {r.err!r}"


def _fingerprint(path: Path):
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size


def run_case(path: Path, fmt: str, i: int, forced: bool) -> list[str]:
    problems = []
    before = _fingerprint(path)
    out = path.parent / "out.raw"
    for args in _commands(path, fmt, i, out, forced):
        t = time.monotonic()
        r = run_qimg(*args)
        spent = time.monotonic() - t
        try:
            assert_clean(args, r)
        except AssertionError as e:
            problems.append(str(e))
        if spent > 15:
            problems.append(f"qimg {' '.join(map(str, args))}: took {spent:.0f} s")
        if out.exists():
            out.unlink()
    if _fingerprint(path) != before:
        problems.append(f"{path.name}: the input file changed")
    return problems


def _all_seeds():
    out = [pytest.param(fmt, name, id=name) for fmt, name, _ in BUILT]
    out += [pytest.param(fmt, rel, id=Path(rel).name) for fmt, rel in CORPUS]
    return out


@pytest.mark.parametrize("fmt,name", _all_seeds())
def test_mutated_images(request, seed_dir, tmp_path, fmt, name):
    fname, data, siblings = _seed(request, seed_dir, fmt, name)
    for sib, content in siblings.items():
        (tmp_path / sib).write_bytes(content)
    meta = _meta_sectors(data)
    path = tmp_path / fname
    problems = []
    for i in range(CASES_PER_SEED):
        rnd = random.Random(f"{fname}-{i}")
        mutated, what = mutate(data, rnd, meta)
        if rnd.random() < 0.25:
            mutated, what2 = mutate(mutated, rnd, meta)
            what += "+" + what2
        if path.exists():
            path.chmod(0o644)
        path.write_bytes(mutated)
        for p in run_case(path, fmt, i, forced=(i % 2 == 0 or fmt == "luks")):
            problems.append(f"case {i} ({what}): {p}")
    assert not problems, "\n".join(problems)


# ----- child processes: time and memory limits -----

def _limit_memory():  # pragma: no cover - runs in the child
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_limited(*args, timeout=CHILD_TIMEOUT):
    """qimg in a child process with an address-space limit; a hang fails the test after ``timeout`` s."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("QIMG_DEBUG", None)
    try:
        p = subprocess.run([sys.executable, "-m", "qimg", *map(str, args)], check=False, capture_output=True, text=True,
                           timeout=timeout, preexec_fn=_limit_memory, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        pytest.fail(f"qimg {' '.join(map(str, args))} did not finish within {timeout} s")
    from tests.conftest import Result

    return Result(p.returncode, p.stdout, p.stderr)


@pytest.mark.parametrize("fmt,name", [pytest.param(f, n, id=n) for f, n, _ in BUILT if f != "luks"])
def test_mutated_images_limited(seed_dir, tmp_path, fmt, name):
    """A mutation per format through a memory- and time-limited child (hangs, huge allocations)."""
    data = (seed_dir / name).read_bytes()
    if name == "flat.vmdk":
        (tmp_path / "flat-flat.vmdk").write_bytes((seed_dir / "flat-flat.vmdk").read_bytes())
    meta = _meta_sectors(data)
    path = tmp_path / name
    for i in (100,):
        mutated, _what = mutate(data, random.Random(f"{name}-{i}"), meta)
        path.write_bytes(mutated)
        before = _fingerprint(path)
        args = ["convert", "-f", fmt, "-O", "raw", path, tmp_path / "out.raw"]
        assert_clean(args, run_limited(*args))
        assert _fingerprint(path) == before


# ----- corpus fuzz cases -----

@pytest.mark.parametrize("rel,msg", [
    ("vmdk/afl9.vmdk.bz2", "L1 size too big"),
    ("vpc/afl5.img.bz2", "Max Table Entries too large (1073741825)"),
])
def test_corpus_fuzz_cases(shared_images, tmp_path, rel, msg):
    src = shared_images / rel
    if not src.exists():
        pytest.skip(f"{rel} not in the corpus")
    img = decompress_to(src, tmp_path)
    before = _fingerprint(img)
    for args in (["info", img], ["info", "--output=json", img], ["map", "--output=json", img],
                 ["convert", "-O", "raw", img, tmp_path / "o.raw"], ["check", img], ["compare", img, img]):
        r = run_qimg(*args)
        assert r.rc == (2 if args[0] == "compare" else 1), (args, r)
        assert r.err == f"qimg: Could not open '{img}': {msg}\n", (args, r.err)
    r = run_limited("convert", "-O", "raw", img, tmp_path / "o.raw")
    assert r.rc == 1 and r.err == f"qimg: Could not open '{img}': {msg}\n"
    assert _fingerprint(img) == before


# ----- regressions -----

def test_vpc_short_file_with_cookie(tmp_path):
    """A file shorter than a footer that starts with the cookie: a checksum error, as qemu-img says."""
    img = tmp_path / "short.vpc"
    img.write_bytes(b"conectix" + bytes(164))
    for args in (["info", img], ["info", "-f", "vpc", img], ["map", "--output=json", img]):
        r = run_qimg(*args)
        assert r.rc == 1 and r.err == f"qimg: Could not open '{img}': Incorrect header checksum\n", r


def _dmg_with_plist(path: Path, plist: bytes, data: bytes = bytes(512)):
    koly = bytearray(512)
    koly[:4] = b"koly"
    struct.pack_into(">QQ", koly, 216, len(data), len(plist))
    path.write_bytes(data + plist + bytes(koly))


@pytest.mark.parametrize("blkx,msg", [
    ([{"Data": 12}], "dmg plist blkx entry has no Data bytes"),
    ([{"Data": "mish"}], "dmg plist blkx entry has no Data bytes"),
    ({"a": 1}, "dmg plist has no usable blkx table (TypeError)"),
])
def test_dmg_plist_wrong_types(tmp_path, blkx, msg):
    import plistlib

    img = tmp_path / "p.dmg"
    _dmg_with_plist(img, plistlib.dumps({"resource-fork": {"blkx": blkx}}))
    r = run_qimg("info", img)
    assert r.rc == 1 and r.err == f"qimg: Could not open '{img}': {msg}\n", r


def test_dmg_binary_plist_garbage(tmp_path):
    img = tmp_path / "b.dmg"
    _dmg_with_plist(img, b"bplist00" + bytes(100))
    r = run_qimg("info", img)
    assert r.rc == 1 and r.err.startswith(f"qimg: Could not open '{img}': dmg plist has no usable blkx table")
    assert r.err.count("\n") == 1


def test_vmdk_create_type_with_control_characters(tmp_path):
    """Line-breaking control characters from the descriptor must not split the error message."""
    img = tmp_path / "d.vmdk"
    img.write_bytes(b'# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
                    b'createType="mono\x0clithic\x1cFlat\xc2\x85"\nRW 8 FLAT "x.raw" 0\n')
    r = run_qimg("info", img)
    assert r.rc == 1 and r.err.count("\n") == 1 and "Unsupported image type 'mono?lithic?Flat?'" in r.err, r


VHDX_LOG_GUID = bytes(range(1, 17))


def _vhdx_with_log(seed: bytes, log_offset: int, log_length: int) -> bytearray:
    """``seed`` with both headers naming a log (GUID, offset, length) and valid checksums."""
    from qimg.formats.vhdx.crc32c import crc32c

    d = bytearray(seed)
    for hoff in (0x10000, 0x20000):
        h = bytearray(d[hoff:hoff + 4096])
        h[48:64] = VHDX_LOG_GUID
        struct.pack_into("<IQ", h, 68, log_length, log_offset)
        h[4:8] = bytes(4)
        struct.pack_into("<I", h, 4, crc32c(h))
        d[hoff:hoff + 4096] = h
    return d


def _log_entry_header(length: int, seq=5, count=0) -> bytes:
    s = bytearray(4096)
    struct.pack_into("<4sIIIQII16sQQ", s, 0, b"loge", 0, length, 0, seq, count, 0, VHDX_LOG_GUID, 0, 0)
    return bytes(s)


@pytest.mark.parametrize("kind", ["entries-past-eof", "nested-entries"])
def test_vhdx_hostile_log_is_scanned_quickly(seed_dir, tmp_path, kind):
    """Log entry headers claiming long entries once cost a checksum over each claimed length
    (hundreds of MiB of zero padding, or overlapping entries over the whole file)."""
    seed = (seed_dir / "a.vhdx").read_bytes()
    end = (len(seed) + (1 << 20) - 1) & ~((1 << 20) - 1)
    seed = seed + bytes(end - len(seed))
    if kind == "entries-past-eof":
        d = _vhdx_with_log(seed, end, 4095 << 20)
        d += b"".join(_log_entry_header(256 << 20) for _ in range(8))
    else:
        d = _vhdx_with_log(seed, end, 4 << 20)
        d += b"".join(_log_entry_header(2 << 20) for _ in range(1024))
    img = tmp_path / "log.vhdx"
    img.write_bytes(d)
    before = _fingerprint(img)
    t = time.monotonic()
    r = run_limited("info", "--output=json", img)
    assert time.monotonic() - t < CHILD_TIMEOUT
    assert r.rc == 0, r.err  # no valid entry: nothing to replay
    assert _fingerprint(img) == before


def test_vhdx_log_replay_image_still_detected(shared_images, tmp_path):
    src = shared_images / "vhdx/vhdx-log-replay.vhdx.gz"
    if not src.exists():
        pytest.skip("log replay image not in the corpus")
    img = decompress_to(src, tmp_path)
    before = _fingerprint(img)
    r = run_qimg("info", img)
    assert r.rc == 1 and "contains a log that needs to be replayed" in r.err
    assert_clean(["info", img], r)
    assert _fingerprint(img) == before


def test_parallels_size_past_the_bat(seed_dir, tmp_path):
    """nb_sectors far beyond the BAT: the last allocated cluster must not stretch to the end of the disk."""
    d = bytearray((seed_dir / "a.parallels").read_bytes())
    cluster = struct.unpack_from("<I", d, 28)[0] * 512
    n_bat = struct.unpack_from("<I", d, 32)[0]
    struct.pack_into("<Q", d, 36, 0x7FFFFFFF)
    img = tmp_path / "big.parallels"
    img.write_bytes(d)
    from qimg.core.chain import Chain

    with Chain.open(str(img)) as ch:
        exts = [e for e in ch.extents() if e.data]
        assert exts and max(e.start + e.length for e in exts) <= n_bat * cluster
    r = run_limited("convert", "-O", "raw", img, tmp_path / "o.raw")
    assert r.rc == 0, r.err


def test_cow_bitmap_past_end_of_file(seed_dir, tmp_path):
    """A huge disk size whose bitmap lies past the end of the file reads as one unallocated run."""
    d = bytearray((seed_dir / "a.cow").read_bytes())
    version = struct.unpack_from(">I", d, 4)[0]
    size_off = {3: 12, 2: 4108}[version]
    struct.pack_into(">Q", d, size_off, 1 << 40)
    d = d[:4096 * 3]
    img = tmp_path / "big.cow"
    img.write_bytes(d)
    from qimg.core.chain import Chain

    with Chain.open(str(img)) as ch:
        drv = ch.layers[0]
        start = ((len(d) - drv.bitmap_off) * 8 + 1) * 512
        e = drv.block_status(start, (1 << 40) - start)
        assert e.length == (1 << 40) - start and not e.present
    r = run_limited("map", "--output=json", img)
    assert r.rc == 0 and r.out.rstrip().endswith('"present": false, "zero": true, "data": false}]'), r


def test_vdi_block_map_past_end_of_file(seed_dir, tmp_path):
    """blocks_in_image at its limit with a tiny file: refused without sizing a 2 GiB buffer."""
    from qimg.formats.vdi import _HEADER

    d = bytearray((seed_dir / "a.vdi").read_bytes())
    assert _HEADER.size == 512
    struct.pack_into("<I", d, 344, 0xFFFFFE00)            # offset_data: room for the claimed map
    struct.pack_into("<I", d, 384, 0x1FFFFF80)            # blocks_in_image
    img = tmp_path / "bigmap.vdi"
    img.write_bytes(d)
    before = _fingerprint(img)
    r = run_limited("map", "--output=json", img)
    expected = "qimg: Could not read file metadata: Could not read VDI block map: image is truncated\n"
    assert r.rc == 1 and r.err == expected, r
    r = run_limited("convert", "-O", "raw", img, tmp_path / "o.raw")
    assert r.rc == 1 and r.err == "qimg: Could not read VDI block map: image is truncated\n", r
    r = run_limited("check", img)
    assert "Out of memory" not in r.err and "internal error" not in r.err and r.rc == 2, r
    assert _fingerprint(img) == before
