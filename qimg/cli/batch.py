"""qimg batch JOBS: run a JSON-lines file of jobs on Dask, one JSON result line per job."""

from __future__ import annotations

import json
import sys
import time

import click

from . import common as c


class BatchProgress:
    """The batch's progress on stderr: a tqdm bar on a terminal, JSON lines with --progress=json."""

    def __init__(self, mode: str | None, total: int):
        self.mode, self.total = mode, total
        self.done = self.failed = self.read = self.written = 0
        self.start = time.monotonic()
        self.last = 0.0
        self.bar = None
        if mode == "bar":
            import os

            from tqdm import tqdm

            try:
                size = os.get_terminal_size(sys.stderr.fileno())
            except OSError:
                size = os.terminal_size((0, 0))
            # a terminal that reports no size (a bare pty) still gets an 80-column bar (tqdm hides
            # bars below a height of 0)
            fit = {"dynamic_ncols": True} if size.columns and size.lines else {"ncols": 80, "nrows": 24}
            self.bar = tqdm(total=total, unit="job", file=sys.stderr, leave=True, **fit)

    def note(self, text: str) -> None:
        if self.mode == "json":
            sys.stderr.write(json.dumps({"message": text}) + "\n")
        elif self.mode == "bar":
            self.bar.write(text, file=sys.stderr)

    def update(self, result: dict) -> None:
        self.done += 1
        self.failed += result.get("status") != "ok"
        self.read += result.get("bytes_read") or 0
        self.written += result.get("bytes_written") or 0
        if self.bar is not None:
            from ..units import size_to_str

            self.bar.set_postfix_str(f"failed={self.failed} read={size_to_str(self.read)} "
                                     f"written={size_to_str(self.written)}", refresh=False)
            self.bar.update(1)
        elif self.mode == "json":
            now = time.monotonic()
            if now - self.last >= 0.1 or self.done == self.total:  # at most 10 lines a second
                self.last = now
                self._json()

    def _json(self, **extra) -> None:
        elapsed = time.monotonic() - self.start
        line = {"done": self.done, "total": self.total, "failed": self.failed, "bytes_read": self.read,
                "bytes_written": self.written, "elapsed": round(elapsed, 3),
                "rate": round(self.done / elapsed, 3) if elapsed > 0 else 0.0, **extra}
        sys.stderr.write(json.dumps(line) + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "json":
            self._json(status="ok" if not self.failed else "error")


@click.command("batch", add_help_option=False)
@click.option("--scheduler", "scheduler", default=None, metavar="ADDRESS")
@click.option("--workers", "workers", type=int, default=None)
@click.option("--results", "results", default=None, metavar="FILE")
@click.option("--resume", "resume", is_flag=True)
@click.option("--untrusted", "untrusted", is_flag=True)
@click.option("--retries", "retries", type=int, default=None)
@click.option("--progress", "progress", default=None, metavar="json")
@c.quiet_opt
@click.option("-h", "--help", "help_", is_flag=True)
@click.argument("jobs_file", metavar="JOBS")
def command(scheduler, workers, results, resume, untrusted, retries, progress, quiet, help_, jobs_file):
    from .. import batch
    from ..batch.jobs import done_ids, prepare, read_jobs, result_line
    from ..errors import UsageError

    if progress not in (None, "json"):
        raise UsageError(f"--progress must be json, not '{progress}'")
    if workers is not None and workers < 1:
        raise UsageError("--workers must be at least 1")
    if workers is not None and scheduler:
        raise UsageError("--workers starts a local cluster; it cannot be used with --scheduler")
    if retries is not None and retries < 0:
        raise UsageError("--retries must be 0 or more")
    if resume and not results:
        raise UsageError("--resume needs --results FILE")
    lines = read_jobs(jobs_file)
    prepare(lines)  # a malformed file (ids used twice) fails before any cluster starts
    batch.distributed()
    skip = done_ids(results) if resume else set()
    client, cluster = batch.connect(scheduler, workers, batch.DEFAULT_RETRIES if retries is None else retries) \
        if lines else (None, None)
    mode = "json" if progress == "json" else ("bar" if not quiet and sys.stderr.isatty() else None)
    total = sum(1 for job, _ in prepare(lines) if job["id"] not in skip)
    bar = BatchProgress(mode, total)
    failed = 0
    try:
        out = open(results, "a" if resume else "w", encoding="utf-8") if results else sys.stdout
        if resume and out.tell() and not _ends_with_newline(results):
            out.write("\n")  # after a line an interrupted run cut short
    except OSError as e:
        _close(client, cluster)
        raise batch.BatchError(f"Could not open results file '{results}': {e.strerror}") from None
    try:
        def show_dashboard(cl):
            if mode and batch.has_dashboard() and cl.scheduler_info().get("services", {}).get("dashboard"):
                bar.note(f"Dask dashboard: {cl.dashboard_link}")

        # the global options' policy (qimg --untrusted --allow-dir ... batch), and batch's own --untrusted
        pol = c.policy()
        if untrusted and not pol.untrusted:
            import dataclasses

            pol = dataclasses.replace(pol, untrusted=True)
        for result in batch.run(lines, client, retries=batch.DEFAULT_RETRIES if retries is None else retries,
                                untrusted=pol, skip=skip, on_client=show_dashboard):
            out.write(result_line(result))
            out.flush()
            failed += result["status"] != "ok"
            bar.update(result)
        bar.finish()
    finally:
        if out is not sys.stdout:
            out.close()
        _close(client, cluster)
    if failed:
        raise click.exceptions.Exit(1)


def _close(client, cluster) -> None:
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"
