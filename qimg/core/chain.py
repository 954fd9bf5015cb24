"""A chain of layers: an image and its backing files, read as one guest view."""

from __future__ import annotations

import os

from ..errors import BackingChainError, QimgError
from . import registry
from .extent import Extent, clip

MAX_CHAIN_DEPTH = 64


class Chain:
    """The top layer and its backing files, outermost first."""

    def __init__(self, layers: list, filenames: list[str]):
        self.layers = layers
        self.filenames = filenames
        self._backing_checked: set[int] = set()

    def _check_backing(self, depth: int) -> None:
        """Before layer ``depth`` first reads through to its backing file, let it refuse one that has
        changed under it (``check_backing``: a VMDK whose parent's CID moved on)."""
        self.layers[depth].check_backing(self.layers[depth + 1], self.filenames[depth + 1])
        self._backing_checked.add(depth)

    @classmethod
    def open(cls, filename: str, fmt: str | None = None, writable: bool = False, backing: bool = True,
             options: dict | None = None, warn=None, max_depth: int = MAX_CHAIN_DEPTH) -> Chain:
        """Open an image and (unless backing=False) its whole backing chain, read-only below the top."""
        top = registry.open_image(filename, fmt, writable, options, warn=warn)
        layers = [top]
        names = [filename]
        chain = cls(layers, names)
        try:
            seen = {_identity(top, filename)}
            cur, cur_name = top, filename
            while backing and cur.backing is not None and cur.backing.filename:
                if len(layers) > max_depth:
                    raise BackingChainError(
                        f"Backing chain of '{filename}' is deeper than the limit of {max_depth} images")
                name = registry.resolve_backing(cur_name, cur.backing.filename)
                ident = _identity_path(name)
                if ident is not None and ident in seen:
                    raise BackingChainError(f"Backing file '{name}' of '{cur_name}' loops back into the chain")
                try:
                    layer = registry.open_image(name, cur.backing.fmt, False)
                except QimgError as e:
                    # qemu's wording: the top image, one "Could not open backing file" per level, the file's error
                    inner = str(e).removeprefix(f"Could not open '{name}': ")
                    raise QimgError(f"Could not open '{filename}': " + "Could not open backing file: " * len(layers)
                                    + inner) from None
                if ident is not None:
                    seen.add(ident)
                layers.append(layer)
                names.append(name)
                cur, cur_name = layer, name
        except BaseException:
            chain.close()
            raise
        return chain

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
        while True:
            layer = self.layers[depth]
            if offset >= layer.virtual_size:
                # past the end of a short backing file: zeros, not allocated; the overlay answers
                # (qemu-img map reports the depth of the layer above the short one)
                return Extent(offset, length, data=False, zero=True, present=False, depth=max(depth - 1, 0))
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
