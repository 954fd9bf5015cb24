"""A real `dask scheduler` and two `dask worker` processes on 127.0.0.1: a worker killed with SIGKILL in
the middle of a convert loses only that attempt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.batch.conftest import worker_env
from tests.conftest import qemu
from tests.servers import free_port, stop, wait_listening

MiB = 1 << 20


@pytest.fixture
def dask_cluster(tmp_path, moto_s3):
    """(scheduler address, {worker pid: Popen}): workers without a nanny, so a killed one stays dead."""
    port = free_port()
    env = worker_env(moto_s3)
    log = open(tmp_path / "dask.log", "wb")
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                              "--port", str(port), "--no-dashboard"], env=env, stdout=log, stderr=log,
                             stdin=subprocess.DEVNULL)
    procs = [sched]
    try:
        wait_listening(port, sched, "dask scheduler")
        addr = f"tcp://127.0.0.1:{port}"
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads",
                                           "1", "--no-nanny", "--host", "127.0.0.1", "--no-dashboard"], env=env,
                                          stdout=log, stderr=log, stdin=subprocess.DEVNULL))
        yield addr, {p.pid: p for p in procs[1:]}
    finally:
        for p in reversed(procs):
            stop(p)
        log.close()


def _holder(pids, path_part: str):
    """The pid among ``pids`` that has a file whose name contains ``path_part`` open, or None."""
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if path_part in os.readlink(f"/proc/{pid}/fd/{fd}"):
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds the converting worker through /proc")
def test_worker_killed_mid_convert(dask_cluster, tmp_path):
    import numpy as np
    from distributed import Client

    import qimg.batch

    addr, workers = dask_cluster
    src = tmp_path / "src.raw"
    rng = np.random.default_rng(5)
    with open(src, "wb") as f:
        for _ in range(48):
            f.write(rng.bytes(MiB))
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "img.qcow2"
    # compressed: slow enough that the kill lands in the middle
    job = {"id": "big", "op": "convert", "src": str(src), "fmt": "raw", "dst": str(dst), "out_fmt": "qcow2",
           "compress": True}
    client = Client(addr, timeout=30, set_as_default=False)
    try:
        client.wait_for_workers(2, timeout=60)
        pid_of = client.run(os.getpid)  # worker address -> pid
        assert sorted(pid_of.values()) == sorted(workers)
        results = []
        runner = threading.Thread(target=lambda: results.extend(qimg.batch.run([job], client=client)))
        runner.start()
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and runner.is_alive() and time.monotonic() < deadline:
            killed = _holder(list(workers), "qimg-partial")
            if killed is None:
                time.sleep(0.01)
        assert killed is not None, "no worker was seen converting"
        assert not dst.exists()
        os.kill(killed, signal.SIGKILL)
        workers[killed].wait()
        assert not dst.exists()  # nothing under the final name after the kill
        runner.join(180)
        assert not runner.is_alive()
    finally:
        client.close()
    [res] = results
    assert (res["status"], res["exit_code"], res["error"]) == ("ok", 0, None), res
    assert pid_of[res["worker"]] != killed  # completed on the other worker
    qemu("compare", "-F", "raw", dst, src)
    qemu("check", dst)
    # the retry took over the temporary name: only the complete image is under a name of its own
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["img.qcow2"]
