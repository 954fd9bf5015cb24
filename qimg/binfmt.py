"""Declarative on-disk records: one definition per structure, fields by name, over ``struct.Struct``.

A ``Record`` lists a structure's fields in on-disk order with their ``struct`` codes and byte
order, as the format's specification tables them.  Code then reads and writes fields by the
spec's names (``unpack`` gives a dict, ``pack``/``pack_into`` take keywords), so a field is never
identified by its position in a tuple.  Fields whose name starts with ``_`` are reserved: they
read back like any other and pack as zeros unless given.
"""

from __future__ import annotations

import struct


class Record:
    """One on-disk structure: ``Record("<", ("signature", "4s"), ("checksum", "I"), ...)``."""

    def __init__(self, byte_order: str, *fields: tuple[str, str]):
        if byte_order not in "<>!=":
            raise ValueError(f"byte order must be one of < > ! =, not {byte_order!r}")
        self.names = tuple(name for name, _code in fields)
        if len(set(self.names)) != len(self.names):
            raise ValueError("field names must be unique")
        self.struct = struct.Struct(byte_order + "".join(code for _name, code in fields))
        self.size = self.struct.size
        self._defaults = {name: (b"" if code.endswith("s") else 0)
                          for name, code in fields if name.startswith("_")}

    def unpack(self, buf, offset: int = 0) -> dict:
        """The fields at ``offset`` of ``buf``, by name."""
        return dict(zip(self.names, self.struct.unpack_from(buf, offset)))

    def _values(self, values: dict) -> list:
        unknown = set(values) - set(self.names)
        if unknown:
            raise TypeError(f"unknown fields: {', '.join(sorted(unknown))}")
        missing = [n for n in self.names if n not in values and n not in self._defaults]
        if missing:
            raise TypeError(f"missing fields: {', '.join(missing)}")
        return [values[n] if n in values else self._defaults[n] for n in self.names]

    def pack(self, /, **values) -> bytes:
        """The structure's bytes; every field not reserved must be given."""
        return self.struct.pack(*self._values(values))

    def pack_into(self, buf, offset: int, /, **values) -> None:
        self.struct.pack_into(buf, offset, *self._values(values))
