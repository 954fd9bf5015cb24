"""The open policy: which files an image may make qimg open, and how much metadata it may cost.

Untrusted mode (``qimg --untrusted CMD ...``, or ``QIMG_UNTRUSTED=1``) is for images an attacker
may have written: forensic inspection, cloud image import.  It promises:

- **No file is opened but the images named on the command line and the files they reference that
  resolve, after every symlink is followed, inside the top image's own folder or a folder given
  with ``--allow-dir DIR``.**  Every reference goes through this module, whatever its kind:
  backing files of every format (qcow2, qcow, qed, cow, vmdk parents), qcow2 external data files,
  VMDK extents of every subformat, Parallels bundle storages, and any other file a header or
  descriptor names.  Refused, with one line naming the image, the reference and the rule:
  absolute paths outside the allowed folders, ``..`` escapes, symlinks leading outside,
  ``json:`` and protocol names (``nbd://``, ``http://``, ``fat:``, ...), device nodes, FIFOs and
  sockets (looked at with ``stat`` before anything is opened, so nothing blocks), a backing file
  with no recorded format that would be probed as raw, and chains deeper than ``--max-depth``
  layers below the top image (16 unless told).
- **Strict structure.**  A table entry pointing past the end of the file, a host offset not
  aligned as the format requires, metadata overlapping metadata, or a compressed cluster that
  does not inflate to exactly its size is an error naming the image and the offset, never read
  as zeros.  A DMG chunk compressed with LZFSE is refused (its optional decoder has no output bound).
- **A metadata budget.**  The tables an open keeps in memory (L1/L2/refcount/BAT/grain tables,
  snapshot tables, descriptors) are counted against ``--max-metadata-memory`` (64 MiB unless
  told); an image that needs more is refused with the limit in the message.

Without the mode, qimg opens references as qemu-img 7.2 does (the policy then only bounds the
chain depth, at 64 backing files).  The policy is a value handed to ``Chain.open`` and carried by
each ``Opener``: nothing here reads the environment or keeps process-wide state.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field, replace

from ..errors import OpenError

#: chain depth (backing files below the top image) allowed without and with --untrusted
TRUSTED_MAX_DEPTH = 64
UNTRUSTED_MAX_DEPTH = 16
#: metadata memory an untrusted open may use unless --max-metadata-memory says otherwise
DEFAULT_MAX_METADATA_MEMORY = 64 << 20

#: reference kinds (``Reference.kind``)
BACKING = "backing file"
DATA_FILE = "data file"
EXTENT = "extent"
STORAGE = "storage"


class PolicyError(OpenError):
    """A reference or a budget refused by the untrusted-mode policy (exit 1)."""

    def __init__(self, message: str, reference: Reference | None = None):
        super().__init__(message)
        self.reference = reference


@dataclass(frozen=True)
class Reference:
    """A file an image names: its kind, the name as stored, where it resolves and the verdict."""

    kind: str
    image: str
    name: str
    resolved: str | None
    allowed: bool
    reason: str | None = None


def _is_protocol(name: str) -> bool:
    # qemu reads "proto:..." as a protocol whenever the colon comes before any slash
    head = name.split("/", 1)[0]
    return ":" in head


def _inside(path: str, folders: tuple[str, ...]) -> bool:
    return any(path == d or path.startswith(d.rstrip(os.sep) + os.sep) for d in folders)


@dataclass(frozen=True)
class Policy:
    """What an open may reach.  ``untrusted=False`` is qemu-img's behaviour."""

    untrusted: bool = False
    allow_dirs: tuple[str, ...] = ()
    max_depth: int | None = None
    max_metadata_memory: int | None = None
    #: folders references may resolve into: allow_dirs plus the top image's folder (see rooted())
    roots: tuple[str, ...] = field(default=(), compare=False)

    @property
    def depth_limit(self) -> int:
        """Backing files allowed below the top image."""
        if self.max_depth is not None:
            return self.max_depth
        return UNTRUSTED_MAX_DEPTH if self.untrusted else TRUSTED_MAX_DEPTH

    @property
    def memory_limit(self) -> int | None:
        """Metadata bytes an open may keep (None: unbounded, qemu-img's behaviour)."""
        if self.max_metadata_memory is not None:
            return self.max_metadata_memory
        return DEFAULT_MAX_METADATA_MEMORY if self.untrusted else None

    @property
    def strict(self) -> bool:
        """Whether structure errors qemu-img reads past (zeros past EOF, ...) are refused."""
        return self.untrusted

    def rooted(self, top_filename: str) -> Policy:
        """This policy for an open whose top image is ``top_filename``: its folder is allowed too."""
        if not self.untrusted:
            return self
        top_dir = os.path.dirname(os.path.abspath(top_filename))
        roots = tuple(dict.fromkeys(os.path.realpath(d) for d in (top_dir, *self.allow_dirs)))
        return replace(self, roots=roots)

    def judge(self, image: str, name: str, resolved: str | None, kind: str) -> Reference:
        """The verdict on one reference, without raising (``inspect`` lists them all)."""
        reason = self._reason(name, resolved) if self.untrusted else None
        return Reference(kind, image, name, resolved, reason is None, reason)

    def check(self, image: str, name: str, resolved: str | None, kind: str) -> Reference:
        """Refuse a reference the policy does not allow (PolicyError naming image, reference, rule)."""
        ref = self.judge(image, name, resolved, kind)
        if not ref.allowed:
            raise PolicyError(refusal(ref), ref)
        return ref

    def _reason(self, name: str, resolved: str | None) -> str | None:
        if name.startswith("json:"):
            return "json: filenames are not allowed"
        if _is_protocol(name) or resolved is None:
            return "protocol names are not allowed"
        roots = self.roots or self.rooted(resolved).roots
        lexical = os.path.normpath(os.path.abspath(resolved))
        real = os.path.realpath(resolved)
        if not _inside(lexical, roots):
            if os.path.isabs(name):
                return "absolute path outside the allowed folders"
            return "'..' escapes the allowed folders"
        if not _inside(real, roots):
            return f"symlink leads outside the allowed folders (to '{real}')"
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return None  # missing: the open fails with qemu-img's own message
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return "device nodes are not allowed"
        if stat.S_ISFIFO(mode):
            return "FIFOs are not allowed"
        if stat.S_ISSOCK(mode):
            return "sockets are not allowed"
        return None


def short_read(raw: bytes, want: int, strict: bool, image: str, what: str, offset: int) -> bytes:
    """``raw`` read for ``want`` bytes of metadata at ``offset``: zero-padded past EOF as qemu-img reads
    it, or, in strict (untrusted) mode, refused naming the image and the offset."""
    if len(raw) >= want:
        return raw
    if strict:
        from ..errors import CorruptImage

        raise CorruptImage(f"'{image}': {what} at offset {offset:#x} lies past the end of the file "
                           f"(offset {offset + len(raw):#x})")
    return raw + bytes(want - len(raw))


def read_host(store, host: int, view, strict: bool, image: str) -> None:
    """Fill ``view`` from ``store`` at ``host``: past the end of the file zeros, as qemu-img reads them,
    or, in strict (untrusted) mode, an error naming the image and the offset."""
    got = store.readinto(host, view)
    if got < len(view):
        if strict:
            from ..errors import CorruptImage

            raise CorruptImage(f"'{image}': data at host offset {host + got:#x} lies past the end of the file")
        view[got:] = bytes(len(view) - got)


def check_host(store, host: int, align: int, guest_offset: int, image: str, what: str = "host offset") -> None:
    """Strict mode: a table entry's host offset is aligned to ``align`` and lies inside ``store`` (qemu-img
    reads zeros past the end of the file); else an error naming the image and the offset.  The file's
    size is asked again only for an offset past the last one seen (the file may have grown)."""
    from ..errors import CorruptImage

    if align > 1 and host % align:
        raise CorruptImage(f"'{image}': {what} {host:#x} of guest offset {guest_offset:#x} is not "
                           f"aligned to {align} bytes")
    if host >= getattr(store, "strict_size", 0):
        store.strict_size = store.size()
        if host >= store.strict_size:
            raise CorruptImage(f"'{image}': {what} {host:#x} of guest offset {guest_offset:#x} lies "
                               "past the end of the file")


def refuse_overlaps(image: str, ranges) -> None:
    """Strict mode: metadata areas [(name, offset, length), ...] must not overlap one another."""
    from ..errors import CorruptImage

    spans = sorted((off, off + n, name) for name, off, n in ranges if n > 0)
    for (a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise CorruptImage(f"'{image}': {bn} at offset {b0:#x} overlaps {an} at offset {a0:#x}")


def refusal(ref: Reference) -> str:
    """The one-line message for a refused reference."""
    return f"Untrusted image '{ref.image}': {ref.kind} '{ref.name}' refused: {ref.reason}"


class Guard:
    """One open's policy at work: every reference checked and recorded, metadata memory counted.

    A Chain makes one for its top image and hands it to every Opener below, so the budget and the
    list of references cover the whole open."""

    def __init__(self, policy: Policy | None = None, top_filename: str | None = None,
                 references: list | None = None):
        policy = policy or Policy()
        self.policy = policy.rooted(top_filename) if top_filename is not None else policy
        self.references: list[Reference] = references if references is not None else []
        self.metadata_bytes = 0

    @property
    def untrusted(self) -> bool:
        return self.policy.untrusted

    @property
    def strict(self) -> bool:
        return self.policy.strict

    def reference(self, image: str, name: str, resolved: str | None, kind: str) -> Reference:
        """Record a reference and refuse it if the policy does (PolicyError)."""
        ref = self.policy.judge(image, name, resolved, kind)
        if ref not in self.references:  # a driver may check a name before it opens it
            self.references.append(ref)
        if not ref.allowed:
            raise PolicyError(refusal(ref), ref)
        return ref

    def depth(self, top: str, depth: int) -> None:
        """Refuse a backing file at ``depth`` (1 = the top image's) beyond the limit of the chain of ``top``."""
        from ..errors import BackingChainError

        limit = self.policy.depth_limit
        if depth > limit:
            if self.untrusted:
                raise PolicyError(f"Untrusted image '{top}': backing chain refused: deeper than {limit} "
                                  "backing files (--max-depth)")
            raise BackingChainError(f"Backing chain of '{top}' is deeper than the limit of {limit} images")

    def charge(self, image: str, what: str, nbytes: int) -> None:
        """Count ``nbytes`` of metadata kept in memory; refuse when the open goes over its budget."""
        self.metadata_bytes += max(0, int(nbytes))
        limit = self.policy.memory_limit
        if limit is not None and self.metadata_bytes > limit:
            raise PolicyError(f"Untrusted image '{image}': {what} needs {int(nbytes)} bytes, which takes the "
                              f"metadata memory of this open over its limit of {limit} bytes "
                              "(--max-metadata-memory)")

    def release(self, nbytes: int) -> None:
        """Give back metadata memory an open no longer holds (a table freed, a cache entry dropped)."""
        self.metadata_bytes = max(0, self.metadata_bytes - max(0, int(nbytes)))
