"""qimg batch and qimg.batch.run on real Dask clusters, with images on local disk and on moto's S3 server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import qemu, run_qimg, sha256_file

MiB = 1 << 20
KEYS = ["id", "op", "status", "exit_code", "error", "bytes_read", "bytes_written", "seconds", "worker", "result"]


def _io(img, *cmds):
    args = []
    for c in cmds:
        args += ["-c", c]
    subprocess.run(["qemu-io", *args, str(img)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory, moto_s3):
    """Sources in four formats (local and uploaded to s3://src/), and one corrupt qcow2."""
    d = tmp_path_factory.mktemp("images")
    qemu("create", "-f", "qcow2", d / "base.qcow2", "8M")
    _io(d / "base.qcow2", "write -P 0x11 0 1M", "write -P 0x22 5M 64k")
    qemu("convert", "-O", "raw", d / "base.qcow2", d / "base.raw")
    qemu("convert", "-O", "vmdk", d / "base.qcow2", d / "base.vmdk")
    qemu("convert", "-O", "vdi", d / "base.qcow2", d / "base.vdi")
    bad = d / "corrupt.qcow2"
    data = bytearray((d / "base.qcow2").read_bytes())
    data[20:24] = (40).to_bytes(4, "big")  # cluster_bits 40
    bad.write_bytes(bytes(data))
    fs = moto_s3.filesystem()
    for name in ("base.qcow2", "base.vmdk", "base.raw"):
        fs.put(str(d / name), f"src/{name}")
    return d


def _results(text: str) -> list[dict]:
    rows = [json.loads(line) for line in text.splitlines()]
    for r in rows:
        assert list(r) == KEYS
    return rows


def _jobs_file(path, jobs) -> str:
    path.write_text("".join((j if isinstance(j, str) else json.dumps(j)) + "\n" for j in jobs))
    return str(path)


def test_twenty_jobs_one_corrupt_on_the_embedded_cluster(images, moto_s3, tmp_path, monkeypatch):
    """19 jobs succeed, the corrupt image gets the message and status `qimg convert` gives it; every
    destination is complete and accepted by qemu-img; nothing is left under a temporary name."""
    out = tmp_path / "out"
    out.mkdir()
    jobs = []
    for i, (src, fmt) in enumerate([("base.qcow2", "qcow2"), ("base.vmdk", "qcow2"), ("base.vdi", "raw"),
                                    ("base.raw", "vmdk"), ("base.qcow2", "vdi"), ("base.vmdk", "raw")]):
        jobs.append({"id": f"local-{i}", "op": "convert", "src": str(images / src), "dst": str(out / f"l{i}.{fmt}"),
                     "out_fmt": fmt})
    for i, src in enumerate(["base.qcow2", "base.vmdk", "base.raw"]):
        jobs.append({"id": f"from-s3-{i}", "op": "convert", "src": f"s3://src/{src}", "dst": str(out / f"s{i}.qcow2"),
                     "out_fmt": "qcow2", "compress": i == 0})
    for i, src in enumerate(["base.qcow2", "base.vdi", "base.raw"]):
        jobs.append({"id": f"to-s3-{i}", "op": "convert", "src": str(images / src), "dst": f"s3://dst/t{i}.qcow2",
                     "out_fmt": "qcow2"})
    jobs.append({"id": "s3-to-s3", "op": "convert", "src": "s3://src/base.vmdk", "dst": "s3://dst/v.raw"})
    jobs += [{"id": f"info-{i}", "op": "info", "src": f"s3://src/{s}"}
             for i, s in enumerate(["base.qcow2", "base.vmdk"])]
    jobs += [{"id": "check", "op": "check", "src": str(images / "base.qcow2")},
             {"id": "measure", "op": "measure", "src": "s3://src/base.qcow2", "out_fmt": "qcow2"},
             {"id": "map", "op": "map", "src": str(images / "base.vmdk")},
             {"id": "compare", "op": "compare", "a": "s3://src/base.raw", "b": str(images / "base.qcow2")},
             {"id": "corrupt", "op": "convert", "src": str(images / "corrupt.qcow2"), "dst": str(out / "c.raw")}]
    assert len(jobs) == 20
    for k, v in moto_s3.env().items():
        monkeypatch.setenv(k, v)  # the embedded cluster's workers inherit them
    r = run_qimg("batch", "--workers", "2", "--results", tmp_path / "results.jsonl",
                 _jobs_file(tmp_path / "jobs.jsonl", jobs))
    assert r.rc == 1, r.err
    rows = _results((tmp_path / "results.jsonl").read_text())
    assert sorted(x["id"] for x in rows) == sorted(j["id"] for j in jobs)
    by_id = {x["id"]: x for x in rows}
    failed = [x for x in rows if x["status"] != "ok"]
    assert [x["id"] for x in failed] == ["corrupt"], failed
    single = run_qimg("convert", "-O", "raw", images / "corrupt.qcow2", tmp_path / "single.raw")
    assert single.err == f"qimg: {failed[0]['error']}\n"
    assert failed[0]["exit_code"] == single.rc == 1
    assert not (out / "c.raw").exists()
    for x in rows:
        assert x["exit_code"] == (0 if x["status"] == "ok" else 1)
        assert x["seconds"] >= 0 and (x["worker"] or "").startswith("inproc://")  # the embedded cluster's threads
    # destinations: complete and equal to the source's guest data
    ref = images / "base.raw"
    for j in jobs:
        if j["op"] != "convert" or j["id"] == "corrupt":
            continue
        dst = j["dst"]
        if dst.startswith("s3://"):
            local = tmp_path / ("dl-" + dst.rsplit("/", 1)[1])
            moto_s3.filesystem().get(dst[len("s3://"):], str(local))
            dst = str(local)
        qemu("compare", "-F", "raw", dst, ref)
        assert by_id[j["id"]]["bytes_written"] > 0
    assert sorted(moto_s3.filesystem().ls("dst")) == ["dst/t0.qcow2", "dst/t1.qcow2", "dst/t2.qcow2", "dst/v.raw"]
    assert sorted(p.name for p in out.iterdir()) == sorted(j["dst"].rsplit("/", 1)[1] for j in jobs
                                                           if j["op"] == "convert" and j["dst"].startswith("/")
                                                           and j["id"] != "corrupt")
    # results as the library returns them
    assert by_id["info-0"]["result"]["virtual-size"] == 8 * MiB and by_id["info-1"]["result"]["format"] == "vmdk"
    assert by_id["check"]["result"]["check-errors"] == 0
    assert by_id["measure"]["result"] == json.loads(qemu("measure", "--output=json", "-O", "qcow2",
                                                         images / "base.qcow2").out)
    assert by_id["map"]["result"] == json.loads(run_qimg("map", "--output=json", images / "base.vmdk").out)
    assert by_id["compare"]["result"] == {"identical": True, "exit_code": 0, "messages": ["Images are identical."]}
    assert by_id["local-0"]["result"] == {"target": str(out / "l0.qcow2"), "format": "qcow2", "virtual_size": 8 * MiB}


def test_bad_lines_get_one_error_result_each(images, cluster, tmp_path):
    sched = cluster.scheduler.address
    good = {"id": "good", "op": "info", "src": str(images / "base.qcow2")}
    lines = [good, "{not json", "[1, 2]", {"id": "u", "op": "defrag", "src": "x"},
             {"id": "o", "op": "info", "src": str(images / "base.qcow2"), "compres": True},
             {"id": "t", "op": "convert", "src": str(images / "base.qcow2"), "dst": str(tmp_path / "x"),
              "compress": "yes"},
             {"id": "nodst", "op": "convert", "src": str(images / "base.qcow2")},
             {"id": "missing", "op": "check", "src": str(tmp_path / "none.qcow2")},
             {"id": "insp", "op": "inspect", "src": str(images / "base.qcow2")},
             {"id": "unt", "op": "info", "src": str(images / "base.qcow2"), "untrusted": True}]
    r = run_qimg("batch", "--scheduler", sched, _jobs_file(tmp_path / "jobs.jsonl", lines))
    assert r.rc == 1 and r.err == ""
    rows = {x["id"]: x for x in _results(r.out)}
    assert len(rows) == len(lines)
    assert rows["good"]["status"] == "ok"
    assert rows["2"]["error"].startswith("line 2: not JSON: ")
    assert rows["3"]["error"] == "line 3: a job is a JSON object, not list"
    assert rows["u"]["error"].startswith("unknown op 'defrag' (expected one of: convert, info, check, map, "
                                         "measure, compare")
    assert rows["o"]["error"] == "unknown option 'compres' for op info"
    assert rows["t"]["error"] == "option 'compress' of op convert must be true or false"
    assert rows["nodst"]["error"] == 'convert job needs "dst" (a path or URL)'
    single = run_qimg("check", tmp_path / "none.qcow2")
    assert (rows["missing"]["exit_code"], "qimg: " + rows["missing"]["error"] + "\n") == (single.rc, single.err)
    try:
        import qimg.ops.inspect  # noqa: F401
    except ImportError:
        assert rows["insp"]["error"].startswith("unknown op 'inspect'")
    else:
        assert rows["insp"]["status"] == "ok" and isinstance(rows["insp"]["result"], dict), rows["insp"]
    # confined, or refused where this build has no untrusted mode: never opened with the trusting rules
    assert rows["unt"]["status"] == "ok" or "untrusted mode is not available" in rows["unt"]["error"]
    for x in rows.values():
        assert (x["status"] == "ok") == (x["exit_code"] == 0)
        assert "Traceback" not in json.dumps(x)


def test_resume_runs_only_what_is_missing(images, cluster, tmp_path):
    """An interrupted run (the library's generator closed after three results) then --resume: only the
    jobs without an ok result run, and their results are appended."""
    import qimg.batch
    from qimg.batch.jobs import result_line

    jobs = [{"id": f"j{i}", "op": "convert", "src": str(images / "base.qcow2"), "dst": str(tmp_path / f"{i}.raw")}
            for i in range(8)]
    jobs_file = _jobs_file(tmp_path / "jobs.jsonl", jobs)
    results = tmp_path / "results.jsonl"
    gen = qimg.batch.run(jobs, client=cluster)
    with open(results, "w") as f:
        for _ in range(3):
            f.write(result_line(next(gen)))
        f.write('{"id": "j7", "op": "conv')  # a line cut short by the interruption
    gen.close()
    first = {x["id"] for x in map(json.loads, results.read_text().splitlines()[:3])}
    r = run_qimg("batch", "--scheduler", cluster.scheduler.address, "--results", results, "--resume", jobs_file)
    assert r.rc == 0, r.err
    lines = results.read_text().splitlines()
    assert lines[3] == '{"id": "j7", "op": "conv'
    rows = [json.loads(line) for line in lines[4:]]
    second = [x["id"] for x in rows]
    assert sorted(second) == sorted({j["id"] for j in jobs} - first)
    assert all(x["status"] == "ok" for x in rows)
    for i in range(8):
        assert sha256_file(tmp_path / f"{i}.raw") == sha256_file(images / "base.raw")
    # nothing left to do: no job runs, and the results file is unchanged
    before = results.read_text()
    r = run_qimg("batch", "--scheduler", cluster.scheduler.address, "--results", results, "--resume", jobs_file)
    assert (r.rc, results.read_text()) == (0, before)


def test_library_run_and_progress(images, cluster, tmp_path, capsys):
    import qimg.batch

    jobs = [{"id": "a", "op": "info", "src": str(images / "base.vdi")},
            {"id": "b", "op": "compare", "a": str(images / "base.raw"), "b": str(images / "base.vmdk")},
            {"id": "c", "op": "compare", "a": str(images / "base.raw"), "b": str(images / "corrupt.qcow2")}]
    rows = {x["id"]: x for x in qimg.batch.run(jobs, client=cluster)}
    assert rows["a"]["result"]["format"] == "vdi" and rows["b"]["status"] == "ok"
    single = run_qimg("compare", images / "base.raw", images / "corrupt.qcow2")
    assert rows["c"]["exit_code"] == single.rc == 2
    r = run_qimg("batch", "--scheduler", cluster.scheduler.address, "--progress=json",
                 _jobs_file(tmp_path / "j.jsonl", jobs))
    assert r.rc == 1
    progress = [json.loads(line) for line in r.err.splitlines()]
    assert progress[-1] == {**progress[-1], "done": 3, "total": 3, "failed": 1, "status": "error"}
    assert all(set(p) >= {"done", "total", "failed", "bytes_read", "bytes_written", "elapsed", "rate"}
               for p in progress)


def test_refusals_before_any_job_runs(images, tmp_path, monkeypatch):
    from tests.servers import free_port

    jobs = _jobs_file(tmp_path / "jobs.jsonl", [{"id": "a", "op": "info", "src": str(images / "base.raw")}])
    monkeypatch.setenv("QIMG_BATCH_CONNECT_TIMEOUT", "1")
    addr = f"tcp://127.0.0.1:{free_port()}"
    r = run_qimg("batch", "--scheduler", addr, jobs)
    assert (r.rc, r.out) == (1, "")
    assert r.err.startswith(f"qimg: Could not connect to the Dask scheduler at '{addr}': ") and r.err.count("\n") == 1
    dup = _jobs_file(tmp_path / "dup.jsonl", [{"id": "a", "op": "info", "src": "x"}, {"id": "a", "op": "map",
                                                                                       "src": "y"}])
    r = run_qimg("batch", dup)
    assert (r.rc, r.out, r.err) == (1, "", "qimg: line 2: job id 'a' is used twice\n")
    r = run_qimg("batch", tmp_path / "none.jsonl")
    assert (r.rc, r.err) == (1, f"qimg: Could not read jobs file '{tmp_path / 'none.jsonl'}': No such file or "
                                "directory\n")
    r = run_qimg("batch", "--resume", jobs)
    assert (r.rc, r.err) == (1, "qimg: --resume needs --results FILE\nTry 'qimg --help' for more information\n")
    code = ("import sys; sys.modules['distributed'] = None; from qimg.cli import run; "
            f"sys.exit(run(['batch', {jobs!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == "qimg: qimg batch needs the package dask[distributed]: pip install 'qimg[batch]'\n"


def test_transient_errors_are_retried_bad_images_are_not(images, cluster, tmp_path):
    """A source whose server cuts its answers short is tried 1 + retries times; a corrupt image once."""
    import qimg.batch
    from tests.servers import Misbehaving

    flaky = Misbehaving((images / "base.qcow2").read_bytes(), "truncate")
    corrupt = Misbehaving((images / "corrupt.qcow2").read_bytes(), "truncate")
    try:
        jobs = [{"id": "flaky", "op": "convert", "src": flaky.url(), "dst": str(tmp_path / "never.raw")},
                {"id": "corrupt", "op": "info", "src": corrupt.url()}]
        rows = {x["id"]: x for x in qimg.batch.run(jobs, client=cluster, retries=2)}
    finally:
        flaky.close()
        corrupt.close()
    assert (flaky.opens, corrupt.opens) == (3, 1), rows
    assert list(tmp_path.iterdir()) == []
    assert rows["flaky"]["exit_code"] == 1
    assert rows["flaky"]["error"].startswith(f"Could not read '{flaky.url()}' at offset ")
    assert "truncated response: got " in rows["flaky"]["error"]
    assert rows["corrupt"]["error"].startswith(f"Could not open '{corrupt.url()}': ")


def test_progress_bar_on_a_terminal(images, cluster, tmp_path, moto_s3):
    """On a terminal (here a pty that reports no size) the batch shows a bar: jobs, bytes, failures."""
    import os
    import pty
    import select

    from tests.batch.conftest import worker_env

    jobs = _jobs_file(tmp_path / "j.jsonl", [{"id": "a", "op": "info", "src": str(images / "base.vdi")},
                                             {"id": "b", "op": "info", "src": str(images / "corrupt.qcow2")}])
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "qimg", "batch", "--scheduler", cluster.scheduler.address,
                          "--results", str(tmp_path / "r.jsonl"), jobs], stdin=slave, stdout=slave, stderr=slave,
                         env=worker_env(moto_s3))
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the pty's last writer closed it
                    break
                if not data:
                    break
                out += data
            elif p.poll() is not None:
                break
    finally:
        os.close(master)
        p.wait(60)
    assert p.returncode == 1
    final = out.decode().replace("\r\n", "\r").split("\r")[-2]
    assert final.startswith("100%|") and "| 2/2 [" in final and "failed=1 " in final, out


def test_untrusted_batches_confine_every_job(images, cluster, tmp_path):
    """An overlay whose backing file lies in another folder opens in a trusted batch, and is refused by
    the untrusted mode however it is asked for: qimg --untrusted batch, batch --untrusted, or per job."""
    over_dir = tmp_path / "uploads"
    over_dir.mkdir()
    over = over_dir / "over.qcow2"
    qemu("create", "-f", "qcow2", "-b", images / "base.qcow2", "-F", "qcow2", over)
    sched = cluster.scheduler.address
    plain = _jobs_file(tmp_path / "plain.jsonl", [{"id": "m", "op": "map", "src": str(over)}])
    asked = _jobs_file(tmp_path / "asked.jsonl", [{"id": "m", "op": "map", "src": str(over), "untrusted": True}])
    trusted = run_qimg("batch", "--scheduler", sched, plain)
    assert trusted.rc == 0 and _results(trusted.out)[0]["status"] == "ok", trusted.out
    single = run_qimg("--untrusted", "map", over)
    assert single.rc == 1
    for argv in (["--untrusted", "batch", "--scheduler", sched, plain], ["batch", "--untrusted", "--scheduler", sched,
                                                                          plain],
                 ["batch", "--scheduler", sched, asked]):
        r = run_qimg(*argv)
        [row] = _results(r.out)
        assert (r.rc, row["status"], row["exit_code"]) == (1, "error", single.rc), argv
        assert single.err == f"qimg: {row['error']}\n"
