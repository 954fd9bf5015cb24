"""Image as a file: seek/tell/EOF, positional and threaded I/O, writes, and bad input as documented exceptions."""

from __future__ import annotations

import io
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import qimg
from tests.conftest import oracle_raw, qemu, run_qimg, write_pattern

MiB = 1 << 20


@pytest.fixture
def raw_and_qcow2(tmp_path, oracle):
    """A 16 MiB raw with scattered data and the same content as a qcow2 written by qemu-img."""
    raw = write_pattern(tmp_path / "src.raw", 16 * MiB, [(0, 70000), (3 * MiB + 17, MiB), (15 * MiB, MiB)])
    q = tmp_path / "src.qcow2"
    oracle("convert", "-f", "raw", "-O", "qcow2", raw, q)
    return raw, q


def test_file_semantics(raw_and_qcow2):
    raw, q = raw_and_qcow2
    data = raw.read_bytes()
    with qimg.open(q) as img:
        assert isinstance(img, io.RawIOBase)
        assert img.readable() and img.seekable() and not img.writable()
        assert img.read(100) == data[:100] and img.tell() == 100
        buf = bytearray(5000)
        assert img.readinto(buf) == 5000 and bytes(buf) == data[100:5100]
        assert img.seek(-10, io.SEEK_END) == len(data) - 10
        assert img.read() == data[-10:]
        assert img.read(1) == b"" and img.readinto(bytearray(8)) == 0
        assert img.seek(len(data) + 4096) == len(data) + 4096 and img.read(10) == b""
        assert img.seek(3 * MiB) == 3 * MiB and img.seek(5, io.SEEK_CUR) == 3 * MiB + 5
        assert img.read(MiB) == data[3 * MiB + 5:4 * MiB + 5]
        img.seek(0)
        assert b"".join(iter(lambda: img.read(1 << 20), b"")) == data
        assert img.pread(len(data) - 3, 10) == data[-3:]
        assert img.pread(len(data), 10) == b"" and img.pread(0, 0) == b""
        view = memoryview(bytearray(4096))
        assert img.preadinto(15 * MiB + 7, view) == 4096 and bytes(view) == data[15 * MiB + 7:15 * MiB + 4103]
    assert img.closed
    img.close()  # twice is fine


def test_parallel_preads(raw_and_qcow2):
    raw, q = raw_and_qcow2
    data = raw.read_bytes()
    rnd = random.Random(5)
    jobs = [(rnd.randrange(0, len(data)), rnd.randrange(1, 300000)) for _ in range(400)]
    with qimg.open(q) as img, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: img.pread(*j), jobs))
    for (off, n), got in zip(jobs, results):
        assert got == data[off:off + n]


def test_writes_land_where_qemu_reads_them(tmp_path, oracle):
    img_path = tmp_path / "w.qcow2"
    qimg.create(img_path, "8M", fmt="qcow2")
    expected = bytearray(8 * MiB)
    rnd = random.Random(3)
    # the threaded writes go to separate 512 KiB slots (their order among themselves is not defined)
    pieces = [(slot * 512 * 1024 + rnd.randrange(0, 300000), rnd.randbytes(rnd.randrange(1, 200000)))
              for slot in range(16)]
    pieces += [(rnd.randrange(0, 8 * MiB - 200000), rnd.randbytes(rnd.randrange(1, 200000))) for _ in range(16)]
    with qimg.open(img_path, writable=True) as img:
        assert img.writable()
        with ThreadPoolExecutor(4) as pool:  # positional writes from several threads at once
            list(pool.map(lambda p: img.pwrite(*p), pieces[:16]))
        for off, chunk in pieces[:16]:
            expected[off:off + len(chunk)] = chunk
        for off, chunk in pieces[16:]:  # and through the stream, in order
            img.seek(off)
            assert img.write(chunk) == len(chunk)
            expected[off:off + len(chunk)] = chunk
        assert img.pread(0, 8 * MiB) == bytes(expected)
    assert oracle("check", img_path).rc == 0
    raw = tmp_path / "expected.raw"
    raw.write_bytes(bytes(expected))
    assert oracle("compare", "-f", "raw", "-F", "qcow2", raw, img_path, check=False).rc == 0


def test_bytesio_written_as_an_image(tmp_path):
    """A raw image in memory, opened writable: the bytes land in the BytesIO."""
    buf = io.BytesIO(bytes(MiB))
    with qimg.open(buf, "raw", writable=True) as img:
        img.pwrite(4096, b"hello")
        img.flush()
    assert buf.getvalue()[4096:4101] == b"hello" and len(buf.getvalue()) == MiB


def test_bad_input_raises_documented_errors(raw_and_qcow2, tmp_path):
    raw, q = raw_and_qcow2
    with pytest.raises(qimg.OpenError, match=r"Could not open '.*missing.qcow2': No such file or directory") as e:
        qimg.open(tmp_path / "missing.qcow2")
    assert e.value.exit_code == 1
    with pytest.raises(qimg.OpenError, match="Unknown driver 'nosuch'"):
        qimg.open(q, "nosuch")
    with pytest.raises(qimg.InvalidArgument, match="Could not open 12345: not a file name"):
        qimg.open(12345)
    with pytest.raises(qimg.CheckUnsupported) as e:
        qimg.check(raw, fmt="raw")
    assert e.value.exit_code == 63
    with pytest.raises(qimg.Unsupported):
        qimg.snapshot_create(raw, "s1", fmt="raw")
    # a read-only format opened writable: qemu-img's message
    bochs = tmp_path / "x.bochs"
    import bz2

    from tests.conftest import SHARED_IMAGES

    bochs.write_bytes(bz2.decompress((SHARED_IMAGES / "bochs" / "empty.bochs.bz2").read_bytes()))
    with pytest.raises(qimg.OpenError, match="Driver 'bochs' can only be used for read-only devices"):
        qimg.open(bochs, "bochs", writable=True)
    with qimg.open(q) as img:
        with pytest.raises(qimg.ReadOnlyError):
            img.write(b"x")
        with pytest.raises(io.UnsupportedOperation):  # what code written for files expects
            img.pwrite(0, b"x")
        with pytest.raises(qimg.InvalidArgument, match="Negative offset"):
            img.pread(-1, 10)
        with pytest.raises(ValueError, match="Negative length"):
            img.pread(0, -10)
        with pytest.raises(qimg.InvalidArgument):
            img.seek(-1)
        with pytest.raises(qimg.ReadOnlyError):
            img.check(repair="all")
        with pytest.raises(qimg.UsageError, match="Unknown option value for -r"):
            img.check(repair="some")
    for op in (lambda: img.read(1), lambda: img.pread(0, 1), lambda: img.info(), lambda: img.seek(0),
               lambda: list(img.extents())):
        with pytest.raises(qimg.ClosedImage, match="closed image"):
            op()
    with qimg.open(q, writable=True) as img:
        with pytest.raises(qimg.InvalidArgument, match="the image ends at"):
            img.pwrite(img.size - 1, b"xy")


def test_same_message_as_the_command_line(raw_and_qcow2, tmp_path):
    """The library and the command line refuse the same things with the same words and status."""
    raw, q = raw_and_qcow2
    out = tmp_path / "out.qcow2"
    cases = [
        (lambda: qimg.convert(raw, out, copy_offload=True, compress=True), ["convert", "-C", "-c", raw, out]),
        (lambda: qimg.convert(raw, out, sparse_size="513"), ["convert", "-S", "513", raw, out]),
        (lambda: qimg.convert(raw, out, coroutines=17), ["convert", "-m", "17", raw, out]),
        (lambda: qimg.convert(raw, out, out_fmt="nosuch"), ["convert", "-O", "nosuch", raw, out]),
        (lambda: qimg.convert(raw, out, target_is_zero=True), ["convert", "--target-is-zero", raw, out]),
        (lambda: qimg.convert(raw, out, cache="bogus"), ["convert", "-t", "bogus", raw, out]),
        (lambda: qimg.convert(tmp_path / "none", out), ["convert", tmp_path / "none", out]),
        (lambda: qimg.create(out, "1Q"), ["create", out, "1Q"]),
        (lambda: qimg.check(q, repair="x"), ["check", "-r", "x", q]),
        (lambda: qimg.commit(q, rate="x1"), ["commit", "-r", "x1", q]),
        (lambda: qimg.rebase(q, None), ["rebase", q]),
        (lambda: qimg.resize(q, "-1G"), ["resize", q, "-1G"]),
        (lambda: qimg.resize(q, "1G", preallocation="bogus"), ["resize", "--preallocation=bogus", q, "1G"]),
        (lambda: qimg.amend(q, {}), ["amend", q]),
        (lambda: qimg.measure(raw, size=1), ["measure", "--size", "1", raw]),
        (lambda: qimg.map(q, start_offset="x"), ["map", "--start-offset", "x", q]),
        (lambda: qimg.dd(raw, out, bs=0), ["dd", "bs=0", f"if={raw}", f"of={out}"]),
        (lambda: qimg.snapshot_create(q, "s", force_share=True), ["snapshot", "-U", "-c", "s", q]),
    ]
    for call, argv in cases:
        with pytest.raises(qimg.QimgError) as e:
            call()
        r = run_qimg(*argv)
        assert r.rc == e.value.exit_code != 0, argv
        first = r.err.splitlines()[0]
        assert first == f"qimg: {str(e.value).splitlines()[0]}", argv
    assert not out.exists()


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2", "vmdk"])
def test_no_partial_target_after_a_failed_convert(tmp_path, raw_and_qcow2, out_fmt):
    """A convert that fails part-way (here: the progress callback raises) leaves no new target behind
    (nor its NAME.qimg-partial), and an existing file of that name is the one written."""
    raw, q = raw_and_qcow2
    out = tmp_path / f"out.{out_fmt}"

    class Stop(Exception):
        pass

    def progress(done, total):
        if done:
            raise Stop

    with pytest.raises(Stop):
        qimg.convert(q, out, out_fmt=out_fmt, progress=progress)
    assert sorted(os.listdir(tmp_path)) == ["src.qcow2", "src.raw"]
    out.write_bytes(b"keep me")
    ino = out.stat().st_ino
    with pytest.raises(Stop):
        qimg.convert(q, out, out_fmt=out_fmt, progress=progress)
    # an existing target is written in place, as qemu-img writes it (its inode, owner, mode and links
    # stay): what was there is gone, and no other file appears
    assert out.stat().st_ino == ino
    assert sorted(os.listdir(tmp_path)) == ["out." + out_fmt, "src.qcow2", "src.raw"]


def test_library_calls_print_nothing_and_leave_signals_alone(tmp_path, raw_and_qcow2, capfd):
    import signal

    raw, q = raw_and_qcow2
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    seen = []

    class Catch:
        def __call__(self, *a):
            seen.append(a)

    qimg.convert(raw, tmp_path / "a.qcow2", out_fmt="qcow2", progress=lambda done, total: seen.append((done, total)))
    qimg.info(tmp_path / "a.qcow2")
    qimg.check(tmp_path / "a.qcow2")
    qimg.compare(raw, tmp_path / "a.qcow2")
    assert {s: signal.getsignal(s) for s in before} == before
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert seen and seen[-1] == (16 * MiB, 16 * MiB)
    assert all(a[0] <= a[1] for a in seen)


def test_secrets_stay_with_their_call(tmp_path):
    """Two threads opening encrypted images with different keys never see each other's."""
    paths = []
    for i in range(2):
        p = tmp_path / f"enc{i}.qcow2"
        qimg.create(p, "1M", fmt="qcow2", options={"encrypt.format": "luks", "encrypt.key-secret": "k",
                                                   "encrypt.iter-time": "10"}, secrets={"k": f"pw{i}"})
        with qimg.open(p, writable=True, secrets={"k": f"pw{i}"}, options={"encrypt.key-secret": "k"}) as img:
            img.pwrite(0, bytes([i + 1]) * 512)
        paths.append(p)
    errors = []

    def read(i):
        try:
            for _ in range(3):
                with qimg.open(paths[i], secrets={"k": f"pw{i}"}, options={"encrypt.key-secret": "k"}) as img:
                    assert img.pread(0, 512) == bytes([i + 1]) * 512
        except Exception as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with pytest.raises(qimg.QimgError, match="No secret with id 'k'"):
        qimg.open(paths[0], options={"encrypt.key-secret": "k"})
    assert qemu("info", paths[0]).rc == 0


def test_check_and_map_of_a_file_object(raw_and_qcow2, oracle):
    import json

    raw, q = raw_and_qcow2
    buf = io.BytesIO(q.read_bytes())
    res = qimg.check(buf)
    assert res.exit_code == 0 and res.filename == "<BytesIO>"
    assert res.to_dict() | {"filename": str(q)} == json.loads(oracle("check", "--output=json", q).out)
    expected = json.loads(oracle("map", "--output=json", q).out)
    assert [e.to_dict() for e in qimg.map(buf)] == expected


def test_untrusted_mode(raw_and_qcow2):
    """untrusted=True opens through the confining policy; a build without it refuses instead of trusting."""
    import importlib.util

    raw, q = raw_and_qcow2
    calls = [lambda: qimg.open(q, untrusted=True).close(), lambda: qimg.info(q, untrusted=True),
             lambda: qimg.check(q, untrusted=True), lambda: qimg.map(q, untrusted=True)]
    if importlib.util.find_spec("qimg.core.policy") is None:
        for call in calls:
            with pytest.raises(qimg.Unsupported, match="untrusted mode"):
                call()
        return
    for call in calls:
        call()
    assert qimg.info(q, untrusted=True).to_dict() == qimg.info(q).to_dict()
    with pytest.raises(qimg.Unsupported):
        qimg.open(io.BytesIO(q.read_bytes()), untrusted=True)


@pytest.mark.parametrize("fmt", ["qcow2", "qed", "vdi", "vmdk", "vpc", "vhdx", "parallels"])
def test_writable_image_in_a_bytesio(tmp_path, oracle, fmt):
    """An image held in memory, opened writable: what lands in the BytesIO is an image qemu-img accepts."""
    made = tmp_path / f"made.{fmt}"
    qimg.create(made, "8M", fmt=fmt)
    buf = io.BytesIO(made.read_bytes())
    data = random.Random(7).randbytes(300000)
    with qimg.open(buf, fmt, writable=True) as img:
        img.pwrite(4096, data)
        img.seek(6 * MiB)
        img.write(data[:65536])
    out = tmp_path / f"out.{fmt}"
    out.write_bytes(buf.getvalue())
    assert oracle("check", "-f", fmt, out, check=False).rc in (0, 63)
    raw = oracle_raw(out, tmp_path, fmt)
    with open(raw, "rb") as f:
        content = f.read()
    assert content[4096:4096 + len(data)] == data and content[6 * MiB:6 * MiB + 65536] == data[:65536]
