"""A chain of layers: an image and its backing files, read as one guest view."""

from __future__ import annotations

import os
from dataclasses import replace

from ..errors import BackingChainError, QimgError
from . import registry
from .extent import Extent, clip
from .policy import TRUSTED_MAX_DEPTH, Guard, Policy, PolicyError

MAX_CHAIN_DEPTH = TRUSTED_MAX_DEPTH


class Chain:
    """The top layer and its backing files, outermost first."""

    def __init__(self, layers: list, filenames: list[str]):
        self.layers = layers
        self.filenames = filenames
        self._backing_checked: set[int] = set()
        self.guard: Guard | None = None

    def _check_backing(self, depth: int) -> None:
        """Before layer ``depth`` first reads through to its backing file, let it refuse one that has
        changed under it (``check_backing``: a VMDK whose parent's CID moved on)."""
        self.layers[depth].check_backing(self.layers[depth + 1], self.filenames[depth + 1])
        self._backing_checked.add(depth)

    @classmethod
    def open(cls, filename: str, fmt: str | None = None, writable: bool = False, backing: bool = True,
             options: dict | None = None, warn=None, max_depth: int | None = None, policy: Policy | None = None,
             references: list | None = None) -> Chain:
        """Open an image and (unless backing=False) its whole backing chain, read-only below the top.

        Every file the chain reaches is admitted by ``policy`` (qimg.core.policy; default: qemu-img's
        rules) and recorded, allowed or refused, in ``references`` (also ``Chain.references``)."""
        policy = policy or Policy()
        if max_depth is not None:
            policy = replace(policy, max_depth=max_depth)
        from .imageopts import expand

        filename, fmt, options = expand(filename, fmt, options)  # a json:{...} name: its options
        guard = Guard(policy, filename, references)
        top = registry.open_image(filename, fmt, writable, options, warn=warn, guard=guard)
        return cls.below_top(top, filename, guard, backing, options)

    @classmethod
    def below_top(cls, top, filename: str, guard: Guard, backing: bool = True, options: dict | None = None) -> Chain:
        """The chain of an opened top layer: its backing files opened (unless backing=False) under ``guard``,
        each layer handed the guest view below it.  Closes ``top`` on failure.  ``options`` (the top's
        open options) may name the backing file themselves (--image-opts backing.*, json: "backing")."""
        layers = [top]
        names = [filename]
        chain = cls(layers, names)
        chain.guard = guard
        try:
            seen = {_identity(top, filename)}
            cur, cur_name = top, filename
            if backing:
                from .imageopts import BACKING
                from .registry import backing_override

                # --image-opts backing=... / json:{"backing": ...}: no backing file, or one of the user's
                first = backing_override(options, filename, top, guard)
                if first is not None:
                    cur.below = _Below(chain, len(layers))
                    layers.append(first[0])
                    names.append(first[1])
                    cur, cur_name = first
                    seen.add(_identity(cur, cur_name))
                elif options and BACKING in options:
                    backing = False
            while backing and cur.backing is not None and cur.backing.filename:
                name, bfmt = registry.admit_backing(guard, cur_name, cur.backing.filename, cur.backing.fmt, len(layers),
                                                    filename)
                ident = _identity_path(name)
                if ident is not None and ident in seen:
                    raise BackingChainError(f"Backing file '{name}' of '{cur_name}' loops back into the chain")
                try:
                    layer = registry.open_image(name, bfmt, False, guard=guard)
                except PolicyError:
                    raise
                except QimgError as e:
                    # qemu's wording: the top image, one "Could not open backing file" per level, the file's error
                    inner = str(e).removeprefix(f"Could not open '{name}': ")
                    raise QimgError(f"Could not open '{filename}': " + "Could not open backing file: " * len(layers)
                                    + inner) from None
                if ident is not None:
                    seen.add(ident)
                cur.below = _Below(chain, len(layers))
                layers.append(layer)
                names.append(name)
                cur, cur_name = layer, name
        except BaseException:
            chain.close()
            raise
        return chain

    @property
    def references(self) -> list:
        """Every file this chain's images named, with where it resolved and the policy's verdict."""
        return self.guard.references if self.guard is not None else []

    @property
    def top(self):
        return self.layers[0]

    @property
    def virtual_size(self) -> int:
        return self.layers[0].virtual_size

    def block_status(self, offset: int, length: int, base_depth: int | None = None) -> Extent:
        """The first extent at ``offset`` through the chain, with ``depth`` set as qemu-img map does.

        ``base_depth`` stops the walk above that layer (it and the ones below read as unallocated).
        """
        stop = len(self.layers) if base_depth is None else base_depth
        depth = 0
        above = None
        while True:
            layer = self.layers[depth]
            if offset >= layer.virtual_size:
                # past the end of a short backing file: zeros, not allocated; the overlay answers
                # (qemu-img map reports the depth of the layer above the short one, and the host offset
                # that layer gave: an unallocated subcluster of an allocated extended-L2 cluster has one)
                ext = Extent(offset, length, data=False, zero=True, present=False, depth=max(depth - 1, 0))
                if above is not None and above.offset is not None:
                    ext.offset = above.offset
                    ext.filename = above.filename or self.filenames[depth - 1]
                return ext
            length = min(length, layer.virtual_size - offset)
            ext = layer.block_status(offset, length)
            ext.depth = depth
            if ext.present or depth + 1 >= stop:
                if not ext.present:
                    ext.zero = True
                    ext.data = False
                if ext.filename is None and ext.offset is not None:
                    ext.filename = self.filenames[depth]
                return ext
            length = ext.length
            above = ext
            depth += 1

    def extents(self, start: int = 0, end: int | None = None, base_depth: int | None = None):
        """Extents covering [start, end) through the chain (not merged)."""
        end = self.virtual_size if end is None else end
        pos = start
        while pos < end:
            ext = self.block_status(pos, end - pos, base_depth)
            if ext.length <= 0:
                raise QimgError(f"driver returned an empty extent at offset {pos}")
            ext = clip(ext, pos, end)
            yield ext
            pos = ext.end

    def readinto(self, offset: int, buf, depth: int = 0) -> None:
        """Fill ``buf`` with the guest view of layer ``depth`` (and those below) from ``offset``."""
        view = memoryview(buf).cast("B")
        total = len(view)
        layer = self.layers[depth]
        pos = 0
        while pos < total:
            off = offset + pos
            if off >= layer.virtual_size:
                view[pos:] = bytes(total - pos)
                return
            n = min(total - pos, layer.virtual_size - off)
            ext = layer.block_status(off, n)
            n = min(ext.length, n)
            if n <= 0:
                raise QimgError(f"driver returned an empty extent at offset {off}")
            sub = view[pos:pos + n]
            if ext.present and ext.data and not ext.zero:
                layer.readinto(off, sub)
            elif ext.present or depth + 1 >= len(self.layers):
                sub[:] = bytes(n)
            else:
                if depth not in self._backing_checked:
                    self._check_backing(depth)
                self.readinto(off, sub, depth + 1)
            pos += n

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def close(self) -> None:
        for layer in self.layers:
            try:
                layer.close()
            except Exception:
                pass
        self.layers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_for_command(filename: str, fmt: str | None = None, **kw) -> Chain:
    """``Chain.open`` for a command that names the image (check, commit, rebase, resize, amend,
    snapshot): a backing file that cannot be opened is reported with qemu-img's wording,
    "Could not open 'TOP': Could not open backing file: ..."."""
    try:
        return Chain.open(filename, fmt, **kw)
    except QimgError as e:
        msg = str(e)
        if not msg.startswith("Could not open backing file"):
            raise
        import re

        msg = re.sub(r"Could not open '([^']*)': Could not open '\1': ", r"Could not open '\1': ", msg)
        raise type(e)(f"Could not open '{filename}': {msg}", e.exit_code) from None


class _Below:
    """The guest view of a chain from one layer down: what the layer above reads for copy-on-write."""

    def __init__(self, chain: Chain, depth: int):
        self.chain = chain
        self.depth = depth

    @property
    def virtual_size(self) -> int:
        return self.chain.layers[self.depth].virtual_size

    def readinto(self, offset: int, buf) -> None:
        self.chain.readinto(offset, buf, self.depth)


def _identity(driver, filename):
    store = getattr(driver, "store", None)
    ident = getattr(store, "dev_ino", None)
    return ident if ident is not None else _identity_path(filename)


def _identity_path(filename):
    try:
        st = os.stat(filename)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
