"""JSON output as qemu prints it: QDict key order and qemu's pretty layout.

qemu-img builds its JSON from a QDict, whose iteration order is its hash-bucket
order (512 buckets, newest insertion first within a bucket).  Reproducing that
order makes ``--output=json`` byte-compatible without a per-command key list.
"""

from __future__ import annotations

QDICT_BUCKET_MAX = 512


def _tdb_hash(name: str) -> int:
    """The gdbm/tdb string hash qemu's QDict uses to pick a bucket."""
    data = name.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, ch in enumerate(data):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys: list[str]) -> list[str]:
    """Order keys (given in insertion order) as qemu's QDict iterates them."""
    indexed = [(_tdb_hash(k) % QDICT_BUCKET_MAX, -i, k) for i, k in enumerate(keys)]
    indexed.sort()
    return [k for _b, _i, k in indexed]


def _scalar(value) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    import json  # (only JSON output pays for it)

    return json.dumps(value, ensure_ascii=False)


def dumps(value, indent: int = 0) -> str:
    """Pretty-print like qobject_to_json_pretty (4 spaces, QDict key order)."""
    pad = "    " * (indent + 1)
    end = "    " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        import json

        parts = [f"{pad}{json.dumps(k)}: {dumps(value[k], indent + 1)}" for k in qdict_order(list(value))]
        return "{\n" + ",\n".join(parts) + "\n" + end + "}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[\n" + end + "]"  # qemu prints an empty list over two lines
        parts = [pad + dumps(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(parts) + "\n" + end + "]"
    return _scalar(value)


def output_text(value) -> str:
    """The text ``--output=json`` prints for ``value``: the JSON and a newline."""
    return dumps(value) + "\n"
