"""Where convert writes, decided as qemu-img decides it.

An existing target is written in place: the name is opened (symlinks followed), so the file keeps
its inode, owner, mode and hard links, and block and character devices are written as they are.
A new target is built under a visible temporary name beside it (``NAME.qimg-partial``) and renamed
to NAME only once it is complete: an interrupted convert never leaves a file that looks finished
under the target's name.  A pipe, FIFO or socket (``/dev/stdout`` in a pipeline) is a stream target,
written front to back (see ``qimg.io.stream``).

Observed from qemu-img 7.2: a missing or read-only folder fails the creation with
``NAME: error while converting FMT: Could not create 'NAME': <strerror>``, exit 1.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from ..errors import OpenError

PARTIAL_SUFFIX = ".qimg-partial"

NEW, FILE, DEVICE, STREAM, DIRECTORY = "new", "file", "device", "stream", "directory"


def kind(name: str) -> str:
    """What ``name`` is now: NEW (nothing, or a dangling link), FILE, DEVICE, STREAM or DIRECTORY."""
    try:
        st = os.stat(name)
    except OSError:
        return NEW
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return STREAM
    if stat.S_ISDIR(mode):
        return DIRECTORY
    return DEVICE  # block and character devices


def inherited_fd(name: str) -> int | None:
    """The descriptor behind /dev/stdin, /dev/stdout, /dev/fd/N or /proc/self/fd/N, if ``name`` is one
    (a socket there cannot be opened again by name: its descriptor is used instead)."""
    special = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
    if name in special:
        return special[name]
    for prefix in ("/dev/fd/", "/proc/self/fd/", f"/proc/{os.getpid()}/fd/"):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return int(name[len(prefix):])
    return None


def open_stream(name: str, write: bool) -> int:
    """A descriptor of its own for a pipe, FIFO or socket named ``name``."""
    fd = inherited_fd(name)
    try:
        if fd is not None:
            return os.dup(fd)
        return os.open(name, (os.O_WRONLY if write else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as e:
        raise OpenError(f"Could not open '{name}': {e.strerror}") from None


@dataclass
class Target:
    """A resolved convert target."""

    name: str            # as the user gave it (every message uses it)
    kind: str            # NEW, FILE, DEVICE, STREAM
    path: str            # where the image is written
    final: str | None = None   # NEW: the name ``path`` becomes once complete
    owned: bool = False        # this call created ``path`` (and removes it on failure)

    def commit(self) -> None:
        """The image is complete: give it its name."""
        if self.final is not None and self.path != self.final:
            os.replace(self.path, self.final)
            self.path = self.final
        self.owned = False

    def discard(self, files=None) -> None:
        """Remove what this call created (``files``: every file of a multi-file image)."""
        if not self.owned:
            return
        for f in files or [self.path]:
            try:
                os.unlink(f)
            except OSError:
                pass
        self.owned = False


def partial_name(path: str) -> str:
    return path + PARTIAL_SUFFIX


def prepare(name: str, single_file: bool = True) -> Target:
    """Resolve ``name`` for a convert that creates its image; a new file's folder is checked now.

    ``single_file``: the format writes one file (multi-file images are written under their own
    names, and removed on failure)."""
    k = kind(name)
    if k == DIRECTORY:
        # qemu-img: the host file driver refuses a directory
        raise OpenError(f"Could not create '{name}': Is a directory")
    if k != NEW:
        return Target(name, k, name)
    # a dangling link: its target is created, as open(O_CREAT) would
    real = os.path.realpath(name) if os.path.islink(name) else name
    path = partial_name(real) if single_file else real
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)  # as qemu creates files
    except FileExistsError:
        if not single_file:
            return Target(name, FILE, path)  # appeared meanwhile: written in place
        _stale_partial(name, path)
        return Target(name, NEW, path, real, owned=True)
    except OSError as e:
        raise OpenError(f"Could not create '{name}': {e.strerror or os.strerror(e.errno or errno.EIO)}") from None
    os.close(fd)
    return Target(name, NEW, path, real, owned=True)


def _stale_partial(name: str, path: str) -> None:
    """A partial file left by a killed convert is taken over; one a running convert writes is not."""
    from . import lock

    try:
        guard = lock.check_free(path, *lock.CREATE_PERMS)
    except OpenError as e:
        raise OpenError(f"Could not create '{name}': {path} is being written by another process ({e})") from None
    if guard is not None:
        guard.release()
