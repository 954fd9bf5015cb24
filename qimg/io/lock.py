"""Image locking as qemu does it: open-file-description byte-range locks on the image file.

References:
  - fcntl(2): open file description locks (F_OFD_SETLK, F_OFD_GETLK), struct flock.
  - qemu-img(1): ``-U``/``--force-share``; qemu's "image locking" documentation.
  - Behaviour observed from qemu-img, qemu-io and qemu-nbd 7.2 (/proc/locks, the fcntl calls they make).

Every user of an image file announces what it does with it and what it lets others do, as shared
(read) OFD locks on single bytes: byte ``100 + bit`` for each permission it holds, byte ``200 + bit``
for each permission it refuses to share.  Bits: 0 consistent read, 1 write, 2 write unchanged,
3 resize.  After taking its bytes a user asks F_OFD_GETLK (as for a write lock) whether anybody else
holds byte ``200 + bit`` of a permission it takes ("Failed to get "write" lock") or byte ``100 + bit``
of a permission it refuses to share ("Failed to get shared "write" lock").

What qemu-img 7.2 takes on the image file (bytes locked, as observed):

  ==========================================  ==================  ==============
  open                                        held (100+)         unshared (200+)
  ==========================================  ==================  ==============
  format image, read-only (map, check, ...)   consistent read     write, resize
  format image, info (metadata only)          --                  write, resize
  format image, read-write                    cons. read, write,  write, resize
                                              resize
  raw or luks, read-only                      consistent read     --
  raw or luks, info (metadata only)           --                  --
  raw or luks, convert source                 consistent read     write, resize
  raw or luks, read-write (resize: + resize)  cons. read, write   --
  data file / flat extent, read-only          consistent read     resize
  data file / flat extent, read-write         cr, write, resize   resize
  file being created (before truncation)      write, resize       resize
  ==========================================  ==================  ==============

``-U`` (force share) drops the unshared bytes of read-only opens.  Opens within this process
share one open file description per file, so they never conflict with each other (qimg opens a
file again where qemu reopens a node, e.g. commit's base); the bytes held are their union.
Filesystems that refuse OFD locks get no locks at all, quietly.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import struct
import threading

from ..errors import OpenError

CONSISTENT_READ = 1
WRITE = 2
WRITE_UNCHANGED = 4
RESIZE = 8
ALL = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE
NAMES = ("consistent read", "write", "write unchanged", "resize")
PERM_BASE = 100
SHARED_BASE = 200

#: open options (keys of the ``options`` dict handed to ``registry.open_image``)
FORCE_SHARE = "force-share"          #: qemu's runtime option, also settable with --image-opts
LOCKING = "file.locking"             #: "off" disables locking for the file (qemu's file.locking)
EXCLUSIVE_READ = "_lock_exclusive"   #: a raw image refuses writers too (qemu-img convert's sources)
TAKE_RESIZE = "_lock_resize"         #: a writable raw image also takes "resize" (qemu-img resize)

_FLOCK = "hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid (+ padding to 32 bytes)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class LockError(OpenError):
    """The image is in use in a way that conflicts with this open (qemu-img exits 1)."""


def bits(mask: int):
    return [b for b in range(len(NAMES)) if mask & (1 << b)]


# ----- what an open takes -----

class _Settings(threading.local):
    opening = None  # (no_io, force_share, locking) of the image being opened, for its sibling files


_settings = _Settings()
#: -U while a command (or one library call) runs: a context variable, so a call in one thread never
#: changes how another thread's call locks its images
_force_share: contextvars.ContextVar[bool] = contextvars.ContextVar("qimg_force_share", default=False)


@contextlib.contextmanager
def sharing(force_share: bool = True):
    """-U: read-only opens made inside refuse nothing to other users."""
    token = _force_share.set(bool(force_share) or _force_share.get())
    try:
        yield
    finally:
        _force_share.reset(token)


@contextlib.contextmanager
def opening(no_io: bool = False, force_share: bool = False, locking: bool = True):
    """While an image is opened: how files its driver opens beside it (extents, data files) lock."""
    old = _settings.opening
    _settings.opening = (no_io, force_share, locking)
    try:
        yield
    finally:
        _settings.opening = old


def flag(value) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("on", "yes", "true", "1"))


def open_settings(options: dict | None, writable: bool) -> tuple[bool, bool]:
    """(force_share, locking) for an open with these options; -U only ever applies to read-only opens."""
    options = options or {}
    if flag(options.get(FORCE_SHARE)) and writable:
        raise OpenError("force-share=on can only be used with read-only images")
    force = not writable and (flag(options.get(FORCE_SHARE)) or _force_share.get())
    locking = str(options.get(LOCKING, options.get("locking", "auto"))).lower() not in ("off", "false", "no")
    return force, locking


def image_perms(passthrough: bool, writable: bool, no_io: bool, force_share: bool, options: dict | None = None):
    """(held, unshared) for an image file opened by a format driver; ``passthrough``: the driver's
    ``lock_passthrough`` (the file is the guest's bytes: raw, luks)."""
    options = options or {}
    perm = 0 if no_io else CONSISTENT_READ
    if passthrough:
        # raw (and luks) pass their user's permissions through; qemu-img's users share everything but
        # convert's sources
        if writable:
            perm |= WRITE | (RESIZE if options.get(TAKE_RESIZE) else 0)
        exclusive = options.get(EXCLUSIVE_READ) and not writable and not force_share
        return perm, (WRITE | RESIZE) if exclusive else 0
    if writable:
        perm |= WRITE | RESIZE
    return perm, 0 if force_share else WRITE | RESIZE


def sibling_perms(writable: bool, metadata: bool = False):
    """(held, unshared) for a file opened beside an image: a data file (qcow2 data_file, flat vmdk
    extent) refuses only resizes; one with its own metadata (sparse vmdk extent) is locked as an image."""
    no_io, force, _ = _settings.opening or (False, _force_share.get() and not writable, True)
    force = force and not writable
    perm = (0 if no_io else CONSISTENT_READ) | ((WRITE | RESIZE) if writable else 0)
    if force:
        return perm, 0
    return perm, (WRITE | RESIZE) if metadata else RESIZE


def sibling_locking() -> bool:
    return _settings.opening is None or _settings.opening[2]


CREATE_PERMS = (WRITE | RESIZE, RESIZE)


# ----- the fcntl side -----

def supported() -> bool:
    """Whether this system has OFD locks at all (Linux); without them images open unlocked, as qemu's do."""
    try:
        import fcntl
    except ImportError:
        return False
    return hasattr(fcntl, "F_OFD_SETLK") and hasattr(fcntl, "F_OFD_GETLK")


def _fcntl(fd: int, cmd_name: str, l_type: int, start: int):
    import fcntl

    arg = struct.pack(_FLOCK, l_type, os.SEEK_SET, start, 1, 0)
    return struct.unpack(_FLOCK, fcntl.fcntl(fd, getattr(fcntl, cmd_name), arg))


class _Unsupported(Exception):
    pass


def _set(fd: int, byte: int, lock: bool) -> None:
    import fcntl

    try:
        _fcntl(fd, "F_OFD_SETLK", fcntl.F_RDLCK if lock else fcntl.F_UNLCK, byte)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            raise _Unsupported() from None
        if lock:
            raise LockError(f"Failed to lock byte {byte}") from None
        raise LockError(f"Failed to unlock byte {byte}") from None


def held_elsewhere(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on ``byte`` (F_OFD_GETLK)."""
    import fcntl

    try:
        l_type = _fcntl(fd, "F_OFD_GETLK", fcntl.F_WRLCK, byte)[0]
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            raise _Unsupported() from None
        raise LockError(f"Failed to get lock on byte {byte}") from None
    return l_type != fcntl.F_UNLCK


def _apply(fd: int, old_perm: int, old_unshare: int, perm: int, unshare: int) -> None:
    """Move the bytes locked on ``fd`` from one (held, unshared) pair to another, in qemu's order."""
    # new held bytes, new unshared bytes, then the held and unshared bytes given up
    steps = ((perm, old_perm, PERM_BASE, True), (unshare, old_unshare, SHARED_BASE, True),
             (old_perm, perm, PERM_BASE, False), (old_unshare, unshare, SHARED_BASE, False))
    for want, have, base, take in steps:
        for b in bits(ALL):
            if want & (1 << b) and not have & (1 << b):
                _set(fd, base + b, take)


def _check_masks(their_perm: int, their_unshare: int, perm: int, unshare: int, filename: str) -> None:
    hint = f"\nIs another process using the image [{filename}]?"
    for b in bits(perm & their_unshare):
        raise LockError(f'Failed to get "{NAMES[b]}" lock{hint}')
    for b in bits(unshare & their_perm):
        raise LockError(f'Failed to get shared "{NAMES[b]}" lock{hint}')


def _check(fd: int, perm: int, unshare: int, filename: str) -> None:
    hint = f"\nIs another process using the image [{filename}]?"
    for b in bits(perm):
        if held_elsewhere(fd, SHARED_BASE + b):
            raise LockError(f'Failed to get "{NAMES[b]}" lock{hint}')
    for b in bits(unshare):
        if held_elsewhere(fd, PERM_BASE + b):
            raise LockError(f'Failed to get shared "{NAMES[b]}" lock{hint}')


# ----- the process-wide table: one open file description per locked file -----

class _File:
    def __init__(self, fd: int):
        self.fd = fd
        self.holds: dict[int, tuple[int, int]] = {}
        self.perm = 0
        self.unshare = 0

    def union(self) -> tuple[int, int]:
        perm = unshare = 0
        for p, u in self.holds.values():
            perm |= p
            unshare |= u
        return perm, unshare


_table: dict[tuple[int, int], _File] = {}
_mutex = threading.RLock()


class Hold:
    """One user's locks on a file; ``release()`` (idempotent) gives them back."""

    def __init__(self, key, perm: int, unshare: int):
        self.key = key
        self.perm = perm
        self.unshare = unshare
        self.active = True

    def release(self) -> None:
        with _mutex:
            if not self.active:
                return
            self.active = False
            entry = _table.get(self.key)
            if entry is None:
                return
            entry.holds.pop(id(self), None)
            if not entry.holds:
                del _table[self.key]
                try:
                    os.close(entry.fd)  # closing the description drops every byte it holds
                except OSError:
                    pass
                return
            perm, unshare = entry.union()
            try:
                _apply(entry.fd, entry.perm, entry.unshare, perm, unshare)
            except (LockError, _Unsupported):
                return
            entry.perm, entry.unshare = perm, unshare


def acquire(fd: int, key: tuple[int, int], filename: str, perm: int, unshare: int,
            strict: bool = False) -> Hold | None:
    """Take (held, unshared) on the file open as ``fd``; LockError on a conflict with another process
    (``strict``: with this process's own users of the file too, as for a file about to be truncated).

    None when locking is not available (no OFD locks, or a filesystem that refuses them)."""
    if not supported():
        return None
    with _mutex:
        entry = _table.get(key)
        new = entry is None
        if strict and not new:
            _check_masks(entry.perm, entry.unshare, perm, unshare, filename)
        if new:
            entry = _File(os.dup(fd))
        want_perm, want_unshare = entry.perm | perm, entry.unshare | unshare
        try:
            _apply(entry.fd, entry.perm, entry.unshare, want_perm, want_unshare)
            _check(entry.fd, want_perm, want_unshare, filename)
        except _Unsupported:
            if new:
                os.close(entry.fd)
            return None
        except LockError:
            try:
                _apply(entry.fd, want_perm, want_unshare, entry.perm, entry.unshare)
            except (LockError, _Unsupported):
                pass
            if new:
                os.close(entry.fd)
            raise
        entry.perm, entry.unshare = want_perm, want_unshare
        hold = Hold(key, perm, unshare)
        entry.holds[id(hold)] = (perm, unshare)
        _table[key] = entry
        return hold


def held_files() -> dict:
    """{(dev, ino): (held, unshared)} of the files this process has locked (for tests)."""
    with _mutex:
        return {k: (e.perm, e.unshare) for k, e in _table.items()}


def check_free(filename: str, perm: int, unshare: int, locking: bool = True):
    """Lock an existing file as (held, unshared) if it exists, strictly (this process's own users of
    it count too: qemu-img refuses to convert an image onto itself); returns the Hold (or None)."""
    if not locking:
        return None
    try:
        fd = os.open(filename, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        return acquire(fd, (st.st_dev, st.st_ino), filename, perm, unshare, strict=True)
    finally:
        os.close(fd)
