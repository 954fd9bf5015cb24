"""Progress: qemu-img's "    (xx.xx/100%)\\r" lines when not on a terminal, nothing with -q."""

from __future__ import annotations

import io
import re

from qimg.engine.progress import Progress

LINE = re.compile(r"    \((\d{1,3}\.\d\d)/100%\)\r")


def _values(text):
    assert text.endswith("\r\n")
    parts = LINE.findall(text[:-1])
    assert "".join(f"    ({p}/100%)\r" for p in parts) == text[:-1]
    return [float(p) for p in parts]


def test_format_and_steps():
    out = io.StringIO()
    p = Progress(1000, stream=out)
    for _ in range(100):
        p.update(10)
    p.finish()
    vals = _values(out.getvalue())
    assert vals[0] == 0.0
    assert vals[-1] == 100.0 and vals[-2] == 100.0  # qemu-img also repeats 100% when it finishes
    assert vals == sorted(vals)
    assert all(b - a >= 1.0 for a, b in zip(vals[:-2], vals[1:-1]))
    assert out.getvalue().startswith("    (0.00/100%)\r    (1.00/100%)\r")


def test_small_updates_are_batched():
    out = io.StringIO()
    p = Progress(10_000_000, stream=out)
    for _ in range(10_000):
        p.update(100)  # 0.001% each
    p.finish()
    vals = _values(out.getvalue())
    assert len(vals) <= 13


def test_disabled_prints_nothing():
    out = io.StringIO()
    p = Progress(100, enabled=False, stream=out)
    p.update(50)
    p.finish()
    assert out.getvalue() == ""


def test_zero_total_and_overshoot():
    out = io.StringIO()
    p = Progress(0, stream=out)
    p.update(5)
    p.finish()
    vals = _values(out.getvalue())
    assert vals[0] == 0.0 and vals[-1] == 100.0
    out = io.StringIO()
    p = Progress(10, stream=out)
    p.update(50)
    p.finish()
    assert max(_values(out.getvalue())) == 100.0


def test_finish_twice_is_harmless():
    out = io.StringIO()
    p = Progress(10, stream=out)
    p.finish()
    text = out.getvalue()
    p.finish()
    assert out.getvalue() == text


def test_tracker_calls_back_with_done_and_total():
    from qimg.engine.progress import Tracker, tracker

    seen = []
    t = tracker(lambda done, total: seen.append((done, total)))
    assert isinstance(t, Tracker)
    t.total = 100
    t.update(30)
    t.update(0)
    t.update(80)
    t.finish()
    assert seen == [(30, 100), (100, 100), (100, 100)]
    assert tracker(None) is None and tracker(t) is t


def test_json_lines_are_rate_limited_and_end_with_status():
    import json

    from qimg.engine.progress import JsonLines

    now = [100.0]
    out = io.StringIO()
    view = JsonLines(out, clock=lambda: now[0])
    for i in range(1, 101):
        now[0] += 0.01  # 100 updates in one second
        view(i * 10, 1000)
    view.close("completed")
    recs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(recs) <= 11 + 1
    assert all(list(r)[:4] == ["done", "total", "elapsed", "rate"] for r in recs)
    assert recs[-1] == {"done": 1000, "total": 1000, "elapsed": 1.0, "rate": 1000, "status": "completed"}
    assert all("status" not in r for r in recs[:-1])
    times = [r["elapsed"] for r in recs[:-1]]
    assert all(b - a >= 0.1 - 1e-9 for a, b in zip(times, times[1:]))
