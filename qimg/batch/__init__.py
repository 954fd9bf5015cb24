"""Many image jobs on Dask's distributed scheduler: ``run(jobs, client=None, ...)`` yields one result per job.

Each job runs the library in a worker (no subprocess): ``convert``, ``check``, ``info``, ``measure``,
``compare``, ``map`` (and ``inspect`` where the inspect command exists), with sources and destinations
as paths or URLs.  Without a client, an embedded ``LocalCluster`` of workers in this process (one job at
a time each, one per core by default) runs the batch and is closed after it.  Example, from an existing
client::

    from dask.distributed import Client
    import qimg.batch

    client = Client("tcp://scheduler:8786")
    jobs = [{"id": "a", "op": "convert", "src": "s3://in/a.vmdk", "dst": "s3://out/a.qcow2", "out_fmt": "qcow2"},
            {"id": "b", "op": "check", "src": "https://images.example/b.qcow2"}]
    for result in qimg.batch.run(jobs, client=client):
        print(result["id"], result["status"], result["error"])

dask[distributed] is an optional dependency (``pip install 'qimg[batch]'``).
"""

from __future__ import annotations

import os
import uuid

from .jobs import RESULT_KEYS, BatchError, error_result, prepare

__all__ = ["run", "BatchError", "RESULT_KEYS", "DEFAULT_RETRIES"]

#: attempts after the first for a job that failed on the network or lost its worker
DEFAULT_RETRIES = 2
#: seconds to reach a scheduler given by address (QIMG_BATCH_CONNECT_TIMEOUT overrides)
CONNECT_TIMEOUT = 20.0


def distributed():
    """The dask.distributed module, or BatchError naming the package to install."""
    try:
        import distributed as dist
    except ImportError:
        raise BatchError("qimg batch needs the package dask[distributed]: pip install 'qimg[batch]'") from None
    return dist


def has_dashboard() -> bool:
    """Whether Dask's dashboard can be served here (it needs bokeh)."""
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def connect(address: str | None, workers: int | None = None, retries: int = DEFAULT_RETRIES,
            processes: bool = False):
    """(client, cluster or None): a client of the scheduler at ``address``, or of a new LocalCluster of
    ``workers`` workers running one job at a time each.

    The embedded cluster's workers are threads of this process (``processes=False``): they start in a
    fraction of a second where worker processes take seconds (a fresh interpreter each, importing
    Dask and qimg again), and jobs go to them without pickling.  A convert spends its time in system
    calls, zlib and numpy, which release the GIL, so two threads keep two cores busy.  ``processes``
    gives each worker its own process (what a job that may crash its interpreter, or a worker killed
    in the middle of a job, needs); a cluster given by address is whatever it was started as."""
    dist = distributed()
    import logging

    import dask

    if address:
        timeout = float(os.environ.get("QIMG_BATCH_CONNECT_TIMEOUT", CONNECT_TIMEOUT))
        try:
            return dist.Client(address, timeout=timeout, set_as_default=False), None
        except (OSError, TimeoutError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BatchError(f"Could not connect to the Dask scheduler at '{address}': {reason}") from None
    n = workers or os.cpu_count() or 1
    # no dashboard without bokeh: Dask would only warn that it cannot serve one
    dashboard = ":0" if has_dashboard() else None
    settings = {"distributed.scheduler.allowed-failures": max(retries, 0)}
    if processes:
        extra = {"host": "127.0.0.1"}
    else:
        # the scheduler and the workers share the jobs' process: their periodic chores (the event
        # loop's 20 ms tick, a psutil sample of the process every 100-500 ms, work stealing's
        # rebalancing) each take the GIL from the jobs, and a busy machine makes every wake-up
        # costly.  Results are small dicts: no memory limit to watch (it is the worker processes'
        # guard), and stealing cannot place a job better among identical threads.
        extra = {"memory_limit": 0}
        settings.update({"distributed.admin.tick.interval": "1s", "distributed.admin.system-monitor.interval": "5s",
                         "distributed.scheduler.work-stealing": False,
                         "distributed.worker.profile.enabled": False})
    with dask.config.set(settings):
        cluster = dist.LocalCluster(n_workers=n, threads_per_worker=1, processes=processes,
                                    dashboard_address=dashboard, silence_logs=logging.ERROR, **extra)
    try:
        return dist.Client(cluster, set_as_default=False), cluster
    except BaseException:
        cluster.close()
        raise


def run(jobs, client=None, *, workers: int | None = None, retries: int = DEFAULT_RETRIES, untrusted=False,
        skip=(), on_client=None):
    """Run ``jobs`` (dicts, or JSON strings one per job) and yield one result dict per job as it finishes.

    A job that cannot run (malformed, unknown op or option) gets its error result at once, before the
    others.  ``client``: an existing ``dask.distributed.Client``; None starts a LocalCluster of
    ``workers`` worker threads for this call (``connect``).  ``retries``: further attempts for a job whose failure was
    transient (a network error, a lost worker); a bad image is never retried.  ``untrusted`` runs every
    job in the untrusted mode: True for its defaults, or a ``qimg.core.policy.Policy`` with its folders
    and limits (a job may also ask with ``"untrusted": true``).  ``skip``: ids not to run
    (``--resume``).  ``on_client(client)`` is called once the cluster is up (e.g. to show its dashboard).
    Results have the keys RESULT_KEYS.
    """
    prepared = prepare(jobs)
    dist = distributed()
    skip = {str(s) for s in skip}
    runnable = []
    for job, reason in prepared:
        if job["id"] in skip:
            continue
        if reason is not None:
            yield error_result(job["id"], job.get("op"), reason)
        else:
            runnable.append(job)
    if not runnable:
        return
    cluster = None
    if client is None:
        client, cluster = connect(None, workers, retries)
    futures = {}
    try:
        if on_client is not None:
            on_client(client)
        from .worker import execute

        # one message for the whole batch (client.map), each job its own task and key
        keys = [f"qimg-{job['op']}-{uuid.uuid4().hex}" for job in runnable]
        submitted = client.map(execute, runnable, [untrusted] * len(runnable), key=keys, pure=False, retries=retries)
        futures = dict(zip(submitted, runnable))
        for fut in dist.as_completed(list(futures), loop=client.loop):
            job = futures.pop(fut)
            yield _result(fut, job, dist)
    finally:
        for fut in futures:
            fut.cancel()
        if cluster is not None:
            client.close()
            cluster.close()


def _result(fut, job: dict, dist) -> dict:
    """A finished future's result dict; failures after the retries become error results."""
    from .ops import one_line
    from .worker import TransientError

    try:
        return fut.result()
    except TransientError as e:
        return error_result(job["id"], job["op"], str(e))
    except dist.KilledWorker:
        return error_result(job["id"], job["op"], "the job's worker died on every attempt")
    except Exception as e:  # the scheduler's own errors (cancelled, lost): one line each
        return error_result(job["id"], job["op"], one_line(e))
