"""Human and JSON output, byte-compatible with qemu-img 7.2."""

from __future__ import annotations

import time

from ..qjson import dumps, qdict_order
from ..units import size_to_str


def info_human(info: dict) -> str:
    """qemu-img info's human layout for one ImageInfo dict."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        "disk size: " + (size_to_str(info["actual-size"]) if "actual-size" in info else "unavailable"),
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if info.get("cluster-size"):
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full and full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.extend(snapshot_table(info["snapshots"]))
    spec = info.get("format-specific")
    if spec is not None and spec.get("data") is not None:
        lines.append("Format specific information:")
        lines.extend(dump_qobject(spec["data"], 1))
    return "\n".join(lines) + "\n"


def dump_qobject(value, indent: int) -> list[str]:
    """qemu's dump_qdict/dump_qlist: keys with '-' shown as ' ', nested values indented by 4."""
    pad = "    " * indent
    out = []
    if isinstance(value, dict):
        for key in qdict_order(list(value)):
            v = value[key]
            name = key.replace("-", " ")
            if isinstance(v, (dict, list)):
                out.append(f"{pad}{name}:")
                out.extend(dump_qobject(v, indent + 1))
            else:
                out.append(f"{pad}{name}: {_scalar(v)}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, (dict, list)):
                out.append(f"{pad}[{i}]:")
                out.extend(dump_qobject(v, indent + 1))
            else:
                out.append(f"{pad}[{i}]: {_scalar(v)}")
    return out


def _scalar(v) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    return str(v)


def snapshot_table(snaps: list[dict]) -> list[str]:
    """The snapshot table of ``info`` and ``snapshot -l``."""
    fmt = "%-9s %-17s %7s%20s%13s%11s"
    lines = [fmt % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.get("date-sec", 0)))
        ns = s.get("vm-clock-sec", 0) * 1_000_000_000 + s.get("vm-clock-nsec", 0)
        secs = ns // 1_000_000_000
        clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60, (ns // 1_000_000) % 1000)
        icount = s.get("icount")
        lines.append(fmt % (s.get("id", ""), s.get("name", ""), size_to_str(s.get("vm-state-size", 0)),
                            date, clock, "" if icount is None else str(icount)))
    return lines


def to_json(value) -> str:
    return dumps(value) + "\n"


def map_json_line(ext) -> str:
    """One entry of qemu-img map --output=json."""
    s = (f'{{ "start": {ext.start}, "length": {ext.length}, "depth": {ext.depth}, '
         f'"present": {_scalar(ext.present)}, "zero": {_scalar(ext.zero)}, "data": {_scalar(ext.data)}')
    if ext.offset is not None:
        s += f', "offset": {ext.offset}'
    return s + "}"


def map_human_header() -> str:
    """The header of qemu-img map's human table."""
    return "%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File")


def _hex(v: int) -> str:
    # C's "%#x": no 0x prefix for zero
    return "%#x" % v if v else "0"


def map_human_line(ext) -> str:
    """One data row of qemu-img map's human table."""
    offset = ext.offset if ext.offset is not None else 0
    return "%-16s%-16s%-16s%s\n" % (_hex(ext.start), _hex(ext.length), _hex(offset), ext.filename or "")
