"""One moto S3 server and one embedded Dask cluster per test session of tests/batch (they take seconds to start)."""

from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT
from tests.servers import MotoS3

pytest.importorskip("distributed")
pytest.importorskip("s3fs")


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    fs = server.filesystem()
    fs.mkdir("src")
    fs.mkdir("dst")
    yield server
    server.close()


@pytest.fixture(scope="session")
def cluster(moto_s3):
    """A LocalCluster of two worker processes (not the embedded cluster's threads: the worker processes
    of a cluster given by address) that reach moto's S3 server (the address is passed to
    ``qimg batch --scheduler`` and the client to ``qimg.batch.run``)."""
    import qimg.batch

    mp = pytest.MonkeyPatch()
    for k, v in {**moto_s3.env(), "PYTHONPATH": str(ROOT)}.items():
        mp.setenv(k, v)  # inherited by the worker processes
    try:
        client, local = qimg.batch.connect(None, workers=2, processes=True)
    finally:
        mp.undo()
    yield client
    client.close()
    local.close()


def worker_env(moto_s3) -> dict:
    """The environment of a `qimg batch` or `dask worker` process of the tests."""
    env = dict(os.environ, **moto_s3.env())
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
