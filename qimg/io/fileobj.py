"""A store over a Python binary file object: an open file, ``io.BytesIO``, an fsspec file.

The object needs ``seek`` and ``readinto`` (or ``read``); ``write``/``truncate``/``flush`` when the
image is opened writable.  A file object has one position, so every access is a seek and a read
under one lock: the store is safe from several threads.  qimg owns the object's position while
the image is open (it is not restored).
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any, Callable

from ..errors import CorruptImage, OpenError, QimgError
from .store import LARGE_READ, MAX_OFFSET, Store


def _file_method(obj: object, name: str) -> Callable[..., Any] | None:
    """The file object's method ``name``, or None: file objects (not drivers) differ in what they offer."""
    method = getattr(obj, name, None)
    return method if callable(method) else None


def is_file_object(obj: object) -> bool:
    """True for a binary file object qimg can read an image from (it has ``seek`` and a read method)."""
    if isinstance(obj, (str, bytes, os.PathLike)):
        return False
    if isinstance(obj, io.TextIOBase):
        return False
    return _file_method(obj, "seek") is not None and (
        _file_method(obj, "readinto") is not None or _file_method(obj, "read") is not None)


def display_name(obj: object) -> str:
    """The name a file object shows in messages: its ``name`` (open files, fsspec) or ``<TypeName>``."""
    name = getattr(obj, "path", None) or getattr(obj, "name", None)
    if isinstance(name, (str, os.PathLike)):
        return os.fspath(name)
    return f"<{type(obj).__name__}>"


class FileObjStore(Store):
    """Offset-addressed reads and writes over one file object (``seek`` + ``readinto``)."""

    def __init__(self, fileobj: Any, writable: bool = False, filename: str | None = None, close: bool = False):
        """``close``: close the file object with the store (when qimg opened it, e.g. from a URL)."""
        if not is_file_object(fileobj):
            raise OpenError(f"Could not open '{display_name(fileobj)}': not a binary file object "
                            "(it needs seek and readinto)")
        if isinstance(fileobj, io.TextIOBase):
            raise OpenError(f"Could not open '{display_name(fileobj)}': a text file (open it in binary mode)")
        seekable = _file_method(fileobj, "seekable")
        if seekable is not None and not seekable():
            raise OpenError(f"Could not open '{display_name(fileobj)}': the file object is not seekable")
        if writable and _file_method(fileobj, "write") is None:
            raise OpenError(f"Could not open '{display_name(fileobj)}': the file object is not writable")
        self.fileobj = fileobj
        self.filename = filename or display_name(fileobj)
        self.display_name = self.filename
        self.writable = writable
        self._close = close
        self._lock = threading.Lock()
        self._readinto = _file_method(fileobj, "readinto")
        self._size = None if writable else self._end()

    def _end(self) -> int:
        try:
            return self.fileobj.seek(0, io.SEEK_END)
        except (OSError, ValueError) as e:
            raise QimgError(f"Could not read '{self.filename}': {e}") from None

    def size(self) -> int:
        """The length of the file object (its end, found once when it is read-only)."""
        if self._size is not None:
            return self._size
        with self._lock:
            return self._end()

    def _read_at(self, offset: int, view: memoryview) -> int:
        """Fill ``view`` from ``offset`` (lock held); returns the bytes read before the end."""
        f = self.fileobj
        f.seek(offset)
        done = 0
        total = len(view)
        while done < total:
            if self._readinto is not None:
                n = self._readinto(view[done:])
            else:
                data = f.read(total - done)
                n = len(data)
                view[done:done + n] = data
            if not n:
                break
            done += n
        return done

    def readinto(self, offset: int, buf: Any) -> int:
        """Fill a writable buffer from ``offset``; returns the bytes read (the rest is left as it was)."""
        view = memoryview(buf).cast("B")
        if offset < 0 or offset >= MAX_OFFSET:
            raise CorruptImage(f"Offset {offset} in '{self.filename}' is outside the addressable range")
        try:
            with self._lock:
                return self._read_at(offset, view)
        except (OSError, ValueError) as e:
            raise QimgError(f"Could not read '{self.filename}': {e}") from None

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (short at the end of the object)."""
        if length <= 0:
            return b""
        if length > LARGE_READ:
            length = max(0, min(length, self.size() - offset))  # a length from an image never over-allocates
        buf = bytearray(length)
        n = self.readinto(offset, buf)
        del buf[n:]
        return bytes(buf)

    def pread_full(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes, zero-filled past the end."""
        data = self.pread(offset, length)
        return data + bytes(length - len(data)) if len(data) < length else data

    def pwrite(self, offset: int, data: Any) -> None:
        """Write ``data`` at ``offset`` (the object grows as a file does)."""
        if not self.writable:
            raise QimgError(f"Could not write '{self.filename}': opened read-only")
        try:
            with self._lock:
                f = self.fileobj
                end = f.seek(0, io.SEEK_END)
                if offset > end:  # BytesIO and files fill a gap with zeros; say so for the others
                    f.write(bytes(offset - end))
                f.seek(offset)
                view = memoryview(data).cast("B")
                done = 0
                while done < len(view):
                    n = f.write(view[done:])
                    done += len(view) - done if n is None else n
        except (OSError, ValueError) as e:
            raise QimgError(f"Could not write '{self.filename}': {e}") from None

    def truncate(self, size: int) -> None:
        """Set the object's length (growing writes zeros: ``BytesIO.truncate`` only shrinks)."""
        try:
            with self._lock:
                f = self.fileobj
                end = f.seek(0, io.SEEK_END)
                if size < end:
                    f.truncate(size)
                while end < size:  # zeros, a MiB at a time
                    end += f.write(bytes(min(size - end, 1 << 20)))
        except (OSError, ValueError, AttributeError) as e:
            raise QimgError(f"Could not resize '{self.filename}': {e}") from None

    def flush(self) -> None:
        """Flush the object's own buffers (no fsync: the object may not be a file)."""
        flush = _file_method(self.fileobj, "flush")
        if self.writable and flush is not None:
            with self._lock:
                flush()

    def close(self) -> None:
        """Release the object (closed only when the store was told to own it)."""
        f, self.fileobj = getattr(self, "fileobj", None), None
        if f is not None and self._close:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing must not hide the error that led here
                pass
