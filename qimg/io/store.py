"""Byte stores: one host file (or memory) addressed by offset.

Everything a driver reads or writes goes through a store, so holes, page-aligned
buffers and locking live in one place.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import CorruptImage, OpenError, QimgError, WriteError

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
#: offsets at or past this do not fit the kernel's off_t
MAX_OFFSET = 1 << 63
#: reads longer than this are clamped to the file size before a buffer is allocated
LARGE_READ = 16 << 20


def aligned_buffer(size: int):
    """A page-aligned anonymous buffer (an mmap): copies into it run several times faster."""
    import mmap  # a C extension: loaded only by the commands that move data

    return mmap.mmap(-1, max(size, 1))


class BufferPool:
    """Reusable page-aligned buffers of one size (``aligned_buffer``): ``count`` made up front, more
    when a caller asks for one and none is free."""

    def __init__(self, size: int, count: int = 0):
        self.size = size
        self.free = [aligned_buffer(size) for _ in range(count)]

    def get(self):
        return self.free.pop() if self.free else aligned_buffer(self.size)

    def put(self, buf) -> None:
        self.free.append(buf)

    def close(self) -> None:
        for b in self.free:
            try:
                b.close()
            except BufferError:  # a view is still alive somewhere: the collector frees it later
                pass
        self.free = []


_FALLOCATE = []


def _libc_fallocate():
    """libc's fallocate(2) wrapper, looked up once (os has no fallocate with mode flags)."""
    if not _FALLOCATE:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).fallocate
            fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
            fn.restype = ctypes.c_int
            _FALLOCATE.append(fn)
        except (OSError, AttributeError, ImportError):
            _FALLOCATE.append(None)
    return _FALLOCATE[0]


class Store:
    """The store protocol: pread/pwrite/size/truncate/flush, plus optional hole queries."""

    filename: str = ""
    writable: bool = False

    def pread(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def pwrite(self, offset: int, data) -> None:
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def truncate(self, size: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def allocated_size(self) -> int:
        return self.size()

    def next_data(self, offset: int) -> int | None:
        """The next offset >= offset holding data, or None: no hole information means all data."""
        return offset if offset < self.size() else None

    def next_hole(self, offset: int) -> int:
        return self.size()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FileStore(Store):
    """A host file through os.pread/os.pwrite, with SEEK_DATA/SEEK_HOLE."""

    def __init__(self, filename: str, writable: bool = False, create: bool = False, display_name: str | None = None,
                 lock: str | None = "data"):
        """``lock``: "data" locks the file as a data file beside an image (the default, for extents and
        data files), "image" as an image with its own metadata, None leaves locking to the caller
        (``lock()``).  A file being created is locked before it is truncated."""
        self.filename = filename
        self.display_name = display_name or filename
        self.writable = writable
        self._hold = None
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT  # truncated only once locked: a file in use elsewhere stays intact
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(filename, flags, 0o644)
        except OSError as e:
            verb = "create" if create else "open"
            raise OpenError(f"Could not {verb} '{filename}': {e.strerror}") from None
        st = os.fstat(self.fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(self.fd)
            self.fd = -1
            raise OpenError(f"'file' driver requires '{filename}' to be a regular file")
        self.is_block = stat.S_ISBLK(st.st_mode)
        self.dev_ino = (st.st_dev, st.st_ino)
        #: whether this store changed the file since its last flush (a flush with nothing new to make
        #: durable skips the fdatasync); true at first, so the first flush always syncs
        self._unsynced = writable
        self._holes_ok = True
        try:
            from . import lock as _lock

            if create:
                self.lock(*_lock.CREATE_PERMS, strict=True)  # not even over an image this process reads
                if stat.S_ISREG(st.st_mode) and st.st_size:
                    try:
                        os.ftruncate(self.fd, 0)
                    except OSError as e:
                        raise OpenError(f"Could not create '{filename}': {e.strerror}") from None
            elif lock is not None and _lock.sibling_locking():
                self.lock(*_lock.sibling_perms(writable, metadata=lock == "image"))
        except BaseException:
            self.close()
            raise

    def lock(self, perm: int, unshare: int, strict: bool = False) -> None:
        """Hold (perm, unshare) on this file as qemu does (qimg.io.lock); replaces what it held before."""
        from . import lock as _lock

        old = self._hold
        self._hold = (_lock.acquire(self.fd, self.dev_ino, self.filename, perm, unshare, strict)
                      if perm or unshare else None)
        if old is not None:
            old.release()

    def unlock(self) -> None:
        hold, self._hold = getattr(self, "_hold", None), None
        if hold is not None:
            hold.release()

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to length bytes; a short read past EOF is padded by callers that need it."""
        if length <= 0:
            return b""
        if offset < 0 or offset >= MAX_OFFSET:
            raise CorruptImage(f"Offset {offset} in '{self.filename}' is outside the addressable range")
        if length > LARGE_READ:
            # never let a length read from an image allocate more than the file holds
            length = max(0, min(length, self.size() - offset))
            if length == 0:
                return b""
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise QimgError(f"Could not read '{self.filename}' at offset {offset}: {e.strerror}") from None
        if len(data) < length:
            # large reads may return short; loop until EOF
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self.fd, length - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    def pread_full(self, offset: int, length: int) -> bytes:
        """Read exactly length bytes, zero-filled past the end of the file."""
        data = self.pread(offset, length)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def readinto(self, offset: int, buf) -> int:
        """Fill a writable buffer from offset; returns the bytes read (rest untouched)."""
        view = memoryview(buf)
        done = 0
        total = len(view)
        while done < total:
            try:
                n = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as e:
                raise QimgError(f"Could not read '{self.filename}': {e.strerror}") from None
            if n <= 0:
                break
            done += n
        return done

    def pwrite(self, offset: int, data) -> None:
        self._unsynced = True
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                n = os.pwrite(self.fd, view[done:], offset + done)
            except OSError as e:
                raise WriteError(f"Could not write '{self.filename}': {e.strerror}", strerror=e.strerror) from None
            done += n

    def size(self) -> int:
        if self.is_block:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def allocated_size(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def truncate(self, size: int) -> None:
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            # devices keep their size (qemu: a device can be "truncated" to at most what it holds)
            if size > self.size():
                raise QimgError("Cannot grow device files")
            return
        self._unsynced = True
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise QimgError(f"Could not resize '{self.filename}': {e.strerror}") from None

    def fallocate(self, offset: int, length: int) -> None:
        """Reserve space (preallocation=falloc)."""
        self._unsynced = True
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as e:
            raise QimgError(f"Could not preallocate '{self.filename}': {e.strerror}") from None

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range (reads back as zeros). False when the filesystem cannot."""
        self._unsynced = True
        try:
            fallocate = _libc_fallocate()
            if fallocate is None:
                return False
            FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
            return fallocate(self.fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length) == 0
        except Exception:
            return False

    def flush(self) -> None:
        """Make what this store wrote durable (fdatasync); nothing to do when it wrote nothing since."""
        if self.writable and self._unsynced:
            self._unsynced = False
            try:
                os.fdatasync(self.fd)
            except OSError:
                pass

    def next_data(self, offset: int) -> int | None:
        if offset >= self.size():
            return None
        if not self._holes_ok:
            return offset
        try:
            return os.lseek(self.fd, offset, SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return None
            self._holes_ok = False
            return offset

    def next_hole(self, offset: int) -> int:
        size = self.size()
        if offset >= size:
            return size
        if not self._holes_ok:
            return size
        try:
            return min(os.lseek(self.fd, offset, SEEK_HOLE), size)
        except OSError:
            self._holes_ok = False
            return size

    def close(self) -> None:
        try:
            self.unlock()
        finally:
            if getattr(self, "fd", -1) >= 0:
                os.close(self.fd)
                self.fd = -1

    def __del__(self):
        # a store nobody closed still gives back its locks (and its descriptor)
        try:
            self.close()
        except Exception:
            pass


class MemoryStore(Store):
    """A bytearray store for tests and in-memory images."""

    def __init__(self, data: bytes = b"", writable: bool = True, filename: str = "<memory>"):
        self.buf = bytearray(data)
        self.writable = writable
        self.filename = filename
        self.display_name = filename
        self.dev_ino = (0, id(self))

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset:offset + length])

    def pread_full(self, offset: int, length: int) -> bytes:
        data = self.pread(offset, length)
        return data + bytes(length - len(data))

    def readinto(self, offset: int, buf) -> int:
        data = self.pread(offset, len(buf))
        memoryview(buf)[:len(data)] = data
        return len(data)

    def pwrite(self, offset: int, data) -> None:
        end = offset + len(data)
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[offset:end] = data

    def size(self) -> int:
        return len(self.buf)

    def truncate(self, size: int) -> None:
        if size < len(self.buf):
            del self.buf[size:]
        else:
            self.buf.extend(bytes(size - len(self.buf)))
