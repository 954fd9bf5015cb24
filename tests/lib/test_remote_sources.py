"""URLs as library sources: an Image over HTTP Range requests (nginx) reads what the local file holds."""

from __future__ import annotations

import io
import subprocess

import pytest

import qimg
from tests.conftest import qemu
from tests.servers import Nginx

MiB = 1 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    base = root / "base.qcow2"
    qemu("create", "-f", "qcow2", base, "16M")
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 7 9M 64k", str(base)], check=True,
                   capture_output=True)
    qemu("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", root / "over.qcow2")
    subprocess.run(["qemu-io", "-c", "write -P 9 2M 64k", str(root / "over.qcow2")], check=True, capture_output=True)
    server = Nginx(root, tmp_path_factory.mktemp("nginx"))
    yield server, root
    server.close()


def test_image_over_http_reads_as_the_local_file(served, tmp_path):
    server, root = served
    url = server.url("over.qcow2")
    with qimg.open(root / "over.qcow2") as local, qimg.open(url) as remote:
        assert remote.name == url and remote.format == "qcow2" and remote.size == 16 * MiB
        assert [la.depth for la in remote.layers] == [0, 1]  # the backing file comes over HTTP too
        assert remote.read() == local.read()
        assert [e.to_dict() for e in remote.extents()] == [e.to_dict() for e in local.extents()]
        assert remote.pread(2 * MiB, 65536) == b"\x09" * 65536
    info = qimg.info(url)
    assert (info.format, info.virtual_size, info.filename) == ("qcow2", 16 * MiB, url)
    buf = io.BytesIO()
    qimg.convert(url, buf, out_fmt="raw")
    assert buf.getvalue() == qimg.open(root / "over.qcow2").read()
    with pytest.raises(qimg.OpenError):
        qimg.open(url, writable=True)
    with pytest.raises(qimg.OpenError, match="Could not open"):
        qimg.open(server.url("none.qcow2"))
