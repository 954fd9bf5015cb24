"""What a library call accepts as an image: a path, an ``os.PathLike``, a URL or a binary file object.

Every source becomes a ``Chain`` (the image and its backing files) here, so ``open``, ``convert``,
``info`` and the rest read the same things the same way.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, Protocol, Union

from ..errors import InvalidArgument, QimgError, QimgWarning, Unsupported

if TYPE_CHECKING:
    from ..core.chain import Chain
    from ..core.policy import Policy
    from ..io.store import Store


class BinaryFile(Protocol):
    """A binary file object an image can be read from: an open file, ``io.BytesIO``, an fsspec file."""

    def seek(self, offset: int, whence: int = ..., /) -> int:
        """Move to ``offset``."""

    def readinto(self, buffer: Any, /) -> int | None:
        """Fill ``buffer``; the bytes read."""


#: what ``qimg.open`` and every command accept as an image
Source = Union[str, "os.PathLike[str]", BinaryFile]


def default_warn(message: str) -> None:
    """Warnings of a library call with no ``warn`` callback: issued as :class:`~qimg.QimgWarning`."""
    warnings.warn(message, QimgWarning, stacklevel=3)


def source_name(source: Source) -> str:
    """The name a source shows in results and messages."""
    from ..io.fileobj import display_name, is_file_object

    if is_file_object(source):
        return display_name(source)
    return os.fsdecode(os.fspath(source))  # type: ignore[arg-type]  # a file object was handled above


def path_of(source: Source, what: str = "image") -> str:
    """A source that must be a host path (or a URL qimg opens by name): its name as a str."""
    from ..io.fileobj import is_file_object

    if is_file_object(source):
        raise Unsupported(f"The {what} must be a file name, not a file object")
    try:
        return os.fsdecode(os.fspath(source))  # type: ignore[arg-type]  # anything else is a TypeError
    except TypeError:
        raise InvalidArgument(f"Could not open {source!r}: not a file name, URL or binary file object") from None



@contextlib.contextmanager
def call_scope(secrets: dict | None = None, force_share: bool = False) -> Iterator[None]:
    """What one library call sets up for its opens: its secrets, and ``force_share`` (qemu-img's -U)."""
    from ..objects import secrets_scope

    with secrets_scope(secrets), contextlib.ExitStack() as stack:
        if force_share:
            from ..io.lock import sharing

            stack.enter_context(sharing(True))
        yield


def as_policy(untrusted: Any) -> Policy:
    """The open policy a call's ``untrusted`` argument asks for: a :class:`qimg.core.policy.Policy` as
    given (the command line's, with --allow-dir and the limits), ``True`` for the untrusted mode's
    defaults, ``False`` for qemu-img's rules."""
    from ..core.policy import Policy

    if isinstance(untrusted, Policy):
        return untrusted
    return Policy(untrusted=bool(untrusted))


def open_chain(source: Source, fmt: str | None = None, *, writable: bool = False, backing: bool = True,
               untrusted: Any = False, options: dict | None = None,
               warn: Callable[[str], None] | None = None) -> Chain:
    """The ``Chain`` of any source: a host path or registry protocol (Chain.open), a URL or a file object.

    ``untrusted``: True, or a :class:`qimg.core.policy.Policy`, confines every file the image references."""
    from ..core.chain import Chain
    from ..io.fileobj import is_file_object

    policy = as_policy(untrusted)
    if is_file_object(source):
        from ..io.fileobj import FileObjStore

        if policy.untrusted:  # the policy confines references to the image's folder, and a file object has none
            raise Unsupported("untrusted mode opens images by name, not from file objects")
        store = FileObjStore(source, writable=writable)
        return chain_on_store(store, fmt, writable=writable, backing=backing, options=options, warn=warn,
                              policy=policy)
    # a path, or a URL: the registry opens http(s) and fsspec URLs through the remote stores
    return Chain.open(path_of(source), fmt, writable=writable, backing=backing, options=dict(options or {}),
                      warn=warn, policy=policy)

def chain_on_store(store: Store, fmt: str | None, *, writable: bool = False, backing: bool = True,
                   options: dict | None = None, warn: Callable[[str], None] | None = None,
                   policy: Any = None) -> Chain:
    """A chain whose top layer lives on ``store``; the files it names (backing files, extents) open by
    name under ``policy``, as a chain's do."""
    from ..core import registry
    from ..core.chain import Chain
    from ..core.policy import Guard

    name = store.filename
    guard = Guard(policy, name)
    try:
        try:
            if fmt is None:
                fmt = registry.probe(store.pread(0, registry.PROBE_BYTES), name)
                if fmt == "raw" and writable and warn is not None:
                    warn(f"Image format was not specified for '{name}' and probing guessed raw.")
            cls: Any = registry.get_driver(fmt)
            opener = registry.make_opener(name, writable, guard)
            top = cls.open(store, name, writable=writable, opener=opener, options=dict(options or {}))
        except QimgError as e:
            msg = str(e)
            if msg.startswith(f"Could not open '{name}'"):
                raise
            raise type(e)(f"Could not open '{name}': {msg}", e.exit_code) from None
    except BaseException:
        store.close()
        raise
    return Chain.below_top(top, name, guard, backing)
