"""Issue 16's divergences from qemu-img 7.2, each run through both tools on the same input."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.oracle.differential import _norm
from tests.oracle.twin import Twin, build


@pytest.fixture
def twin(tmp_path, qemu_img):
    return Twin(tmp_path)


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_commit_qed_overlay_keeps_its_allocation(twin, base_fmt):
    twin.build("qemu-img", "create", "-q", "-f", base_fmt, "base.img", "4M")
    twin.build("qemu-io", "-f", base_fmt, "-c", "write -P 1 0 2M", "base.img")
    twin.build("qemu-img", "create", "-q", "-f", "qed", "-b", "base.img", "-F", base_fmt, "ov.qed")
    twin.build("qemu-io", "-f", "qed", "-c", "write -P 5 0 64k", "-c", "write -P 6 1M 4k",
          "-c", "write -z 3M 64k", "ov.qed")
    twin.both("commit", "ov.qed")
    twin.both("map", "--output=json", "ov.qed")
    twin.same_file("ov.qed")
    twin.both("compare", "-f", base_fmt, "-F", "qed", "base.img", "ov.qed")
    twin.both("map", "--output=json", "-f", base_fmt, "base.img")


@pytest.fixture
def chain_and_ova(twin):
    """base.qcow2 <- ov.qcow2, and x.ova: a tar holding an OVF and a streamOptimized VMDK at offset 1536."""
    import tarfile

    twin.build("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    twin.build("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 4k", "-c", "write -P 8 512k 64k", "base.qcow2")
    twin.build("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2")
    twin.build("qemu-io", "-f", "qcow2", "-c", "write -P 9 64k 4k", "ov.qcow2")
    # built once (a VMDK's CID is random) and copied: a tar file has no holes, the copy is the same file
    build(twin.q, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "base.qcow2", "s.vmdk")
    sizes = []

    def ova(d):
        (d / "a.ovf").write_text("<Envelope/>\n")
        with tarfile.open(d / "x.ova", "w", format=tarfile.USTAR_FORMAT) as tar:
            tar.add(d / "a.ovf", "a.ovf")
            tar.add(d / "s.vmdk", "s.vmdk")
        with tarfile.open(d / "x.ova") as tar:
            member = tar.getmember("s.vmdk")
            assert member.offset_data == 1536
            sizes.append(member.size)

    ova(twin.q)
    shutil.copyfile(twin.q / "x.ova", twin.i / "x.ova")
    vmdk_size = sizes[0]
    return vmdk_size


IMAGE_OPTS = [
    "driver=qcow2,file.filename=ov.qcow2,foo=bar",                  # unknown format option
    "driver=qcow2,file.filename=ov.qcow2,file.foo=bar",             # unknown protocol option
    "file.filename=ov.qcow2,foo=bar",                               # probed format, then refused
    "driver=raw,file.filename=ov.qcow2,compress=on",
    "driver=qcow2,file.filename=ov.qcow2,lazy-refcounts=on,cache-size=1M,file.locking=off,discard=unmap",
    "driver=qcow2,file.filename=ov.qcow2,backing=null",             # a node reference, not "no backing"
    "driver=qcow2,file.filename=ov.qcow2,backing=",                 # deprecated spelling of no backing file
    "driver=qcow2,file.filename=ov.qcow2,backing.foo=1",
    # (a raw view of base.qcow2 is left to the convert test: map would show the host file's holes, which
    # the filesystem may lay out differently in the two twin directories)
    "driver=qcow2,file.filename=ov.qcow2,backing.driver=qcow2,backing.file.filename=base.qcow2",
    "driver=qcow2,file.filename=ov.qcow2,backing.file.filename=base.qcow2",
    "driver=qcow2,filename=ov.qcow2",
    "filename=ov.qcow2",
    "driver=qcow2,file.driver=file",
    "driver=vmdk,file.driver=raw,file.offset=1536,file.size=SIZE,file.file.filename=x.ova",
    "driver=vmdk,file.driver=raw,file.offset=1536,file.file.filename=x.ova",
    "driver=vmdk,file.driver=raw,file.offset=1536,file.size=SIZE,file.file.filename=x.ova,file.file.foo=1",
    "driver=qcow2,file.driver=raw,file.offset=1536,file.file.filename=x.ova,file.filename=x",
    "driver=raw,offset=1536,size=SIZE,file.filename=x.ova",
]


@pytest.mark.parametrize("spec", IMAGE_OPTS)
@pytest.mark.parametrize("cmd", ["info", "map", "check"])
def test_image_opts_as_qemu_img(twin, chain_and_ova, spec, cmd):
    spec = spec.replace("SIZE", str(chain_and_ova))
    twin.both(cmd, "--output=json", "--image-opts", spec)


JSON_NAMES = [
    '{"driver":"qcow2","file":{"driver":"file","filename":"ov.qcow2"}}',
    '{"driver":"qcow2","file":{"driver":"file","filename":"ov.qcow2"},"backing":null}',
    '{"driver":"qcow2","file.filename":"ov.qcow2","backing":{"driver":"qcow2","file":{"filename":"base.qcow2"}}}',
    '{"file":{"filename":"ov.qcow2"}}',
    '{"driver":"qcow2","file":{"driver":"file","filename":"ov.qcow2"},"foo":1}',
    '{"driver":"qcow2",',
    '{"driver":"qcow2","file":"ov.qcow2"}',
    '[]',
    '{"driver":"vmdk","file":{"driver":"raw","offset":1536,"size":SIZE,"file":{"driver":"file","filename":"x.ova"}}}',
    '{"driver":"qcow2","file":{"driver":"file","filename":"ov.qcow2"},"backing":"x"}',
    '{"driver":"qcow2","file":{"driver":"file","filename":"nonexist"}}',
    '{"driver": "raw", "file": {"driver": "file", "filename": "x.ova"}, "offset": 512, "size": 512}',
]


@pytest.mark.parametrize("name", JSON_NAMES)
@pytest.mark.parametrize("cmd", ["info", "map", "check"])
def test_json_filenames_as_qemu_img(twin, chain_and_ova, name, cmd):
    twin.both(cmd, "--output=json", "json:" + name.replace("SIZE", str(chain_and_ova)))


@pytest.mark.parametrize("src", [
    ["--image-opts", "driver=vmdk,file.driver=raw,file.offset=1536,file.size=SIZE,file.file.filename=x.ova"],
    ['json:{"driver":"qcow2","file":{"driver":"file","filename":"ov.qcow2"},"backing":null}'],
    ["--image-opts", "driver=qcow2,file.filename=ov.qcow2,backing.driver=raw,backing.file.filename=base.qcow2"],
])
def test_convert_reads_the_same_bytes(twin, chain_and_ova, src):
    src = [a.replace("SIZE", str(chain_and_ova)) for a in src]
    twin.both("convert", "-O", "raw", *src, "out.raw")
    twin.same_file("out.raw")


def test_json_backing_name_recorded_in_an_image(twin, chain_and_ova):
    back = 'json:{"driver":"vmdk","file":{"driver":"raw","offset":1536,"file":{"driver":"file","filename":"x.ova"}}}'
    twin.build("qemu-img", "create", "-q", "-f", "qcow2", "-b", back, "-F", "vmdk", "top.qcow2", "1M")
    twin.both("map", "--output=json", "top.qcow2")
    twin.both("convert", "-O", "raw", "top.qcow2", "out.raw")
    twin.same_file("out.raw")


MEASURE_LUKS = [
    ["--size", "10M", "-o", "key-secret=s"],
    ["--size", "1000", "-o", "key-secret=s,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc"],
    ["--size", "3M", "-o", "key-secret=s,iter-time=10,cipher-alg=aes-192,hash-alg=sha1", "--output=json"],
    ["--size", "3M", "-o", "key-secret=s,iter-time=10,preallocation=full"],
    ["--size", "3M", "-o", "key-secret=s,cipher-alg=foo"],
    ["--size", "3M", "-o", "key-secret=s,foo=1"],
    ["--size", "3M", "-o", "key-secret=s,iter-time=abc"],
    ["--size", "3M", "-o", "key-secret=nope"],
    ["--size", "3M"],
    ["-o", "key-secret=s,iter-time=10", "src.qcow2"],
    ["-o", "key-secret=s,iter-time=10", "--output=json", "src.qcow2"],
    ["src.qcow2"],
]


@pytest.mark.parametrize("args", MEASURE_LUKS)
def test_measure_luks(twin, args):
    twin.build("qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "10M")
    twin.build("qemu-io", "-f", "qcow2", "-c", "write 0 1M", "src.qcow2")
    argv = ["measure", "--object", "secret,id=s,data=x", "-O", "luks", *args]
    for _ in range(30):  # qemu-img times PBKDF2 with the CPU clock, which a busy machine can fail
        q = twin.qemu(*argv)
        if "accurate CPU usage" not in q[2]:
            break
    i = twin.qimg(*argv)
    assert (i[0], _norm(i[1]), _norm(i[2])) == (q[0], _norm(q[1]), _norm(q[2]))


def _qcow2_fields(path, **fields):
    """Patch header fields of a qcow2 file (offsets from qcow2.txt, "Header")."""
    import struct

    where = {"refcount_table_clusters": (56, ">I"), "incompatible_features": (72, ">Q")}
    with open(path, "r+b") as f:
        for name, value in fields.items():
            off, fmt = where[name]
            f.seek(off)
            f.write(struct.pack(fmt, value))


def _misalign_first_l2_entry(path):
    import struct

    data = bytearray(path.read_bytes())
    l1 = struct.unpack(">Q", data[40:48])[0]
    l2 = struct.unpack(">Q", data[l1:l1 + 8])[0] & 0x00FFFFFFFFFFFE00
    entry = struct.unpack(">Q", data[l2:l2 + 8])[0]
    data[l2:l2 + 8] = struct.pack(">Q", entry + 512)
    path.write_bytes(bytes(data))


@pytest.fixture
def small(twin):
    twin.build("qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "1M")
    twin.build("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "a.qcow2")
    return twin


READ_COMMANDS = [["info"], ["map", "--output=json"], ["map"], ["check"], ["check", "--output=json"],
                 ["convert", "-O", "raw", "@", "o.raw"], ["compare", "@", "a.qcow2"], ["measure", "-O", "qcow2"]]


def _args(cmd, name):
    return [name if a == "@" else a for a in cmd] + ([] if "@" in cmd else [name])


@pytest.mark.parametrize("cmd", READ_COMMANDS)
def test_qcow2_without_refcount_table_refused_but_checked(small, cmd):
    small.each(lambda d: (d / "t.qcow2").write_bytes((d / "a.qcow2").read_bytes()))
    small.each(lambda d: _qcow2_fields(d / "t.qcow2", refcount_table_clusters=0))
    small.both(*_args(cmd, "t.qcow2"))


@pytest.mark.parametrize("cmd", READ_COMMANDS + [["check", "-r", "leaks"]])
def test_qcow2_unaligned_data_cluster(small, cmd):
    small.each(lambda d: (d / "t.qcow2").write_bytes((d / "a.qcow2").read_bytes()))
    small.each(lambda d: _misalign_first_l2_entry(d / "t.qcow2"))
    small.both(*_args(cmd, "t.qcow2"))
    small.same_file("t.qcow2")


@pytest.mark.parametrize("repair", ["leaks", "all"])
def test_check_repairs_an_image_marked_corrupt(small, repair):
    small.each(lambda d: (d / "t.qcow2").write_bytes((d / "a.qcow2").read_bytes()))
    small.each(lambda d: _qcow2_fields(d / "t.qcow2", incompatible_features=2))
    small.both("check", "-r", repair, "t.qcow2")
    small.same_file("t.qcow2")
    small.both("info", "--output=json", "t.qcow2")  # "corrupt": false again


@pytest.mark.parametrize("length", [65536, 131072, 196608, 262144, 300000, 1000000])
@pytest.mark.parametrize("cmd", [["check"], ["check", "--output=json"], ["info"], ["map", "--output=json"],
                                 ["convert", "-O", "raw", "@", "o.raw"], ["check", "-r", "leaks"]])
def test_truncated_qcow2(twin, length, cmd):
    twin.build("qemu-img", "create", "-q", "-f", "qcow2", "big.qcow2", "64M")
    twin.build("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", "-c", "write -P 2 32M 1M", "big.qcow2")
    twin.each(lambda d: os.truncate(d / "big.qcow2", length))
    twin.both(*_args(cmd, "big.qcow2"), allocation=False)
    twin.same_file("big.qcow2")
    if "o.raw" in cmd and (twin.q / "o.raw").exists():
        twin.same_file("o.raw")


@pytest.mark.parametrize("field", ["l1_table_offset", "refcount_table_offset", "l1_entry"])
@pytest.mark.parametrize("cmd", [["info"], ["map", "--output=json"], ["check"], ["convert", "-O", "raw", "@", "o.raw"]])
def test_tables_far_past_the_end_of_the_file(small, field, cmd):
    # qemu reads what lies past the end of the file as zeros: the image opens, check counts the errors
    import struct

    def poke(d):
        p = d / "t.qcow2"
        data = bytearray((d / "a.qcow2").read_bytes())
        if field == "l1_entry":
            l1 = struct.unpack(">Q", data[40:48])[0]
            data[l1:l1 + 8] = struct.pack(">Q", (1 << 63) | (1 << 40))
        else:
            off = 40 if field == "l1_table_offset" else 48
            data[off:off + 8] = struct.pack(">Q", 1 << 40)
        p.write_bytes(bytes(data))

    small.each(poke)
    small.both(*_args(cmd, "t.qcow2"))
