"""Which store reads a URL: HTTP(S) on the standard library, any other scheme through fsspec.

Kept apart from ``remote`` (the shared read side) so that the two stores import their base and
nothing imports them back.
"""

from __future__ import annotations

from .remote import url_scheme


def open_url(name: str):
    """The read-only store for a URL: HTTP(S) on the standard library, any other scheme through fsspec."""
    scheme = url_scheme(name)
    if scheme in ("http", "https"):
        from .http import HttpStore

        return HttpStore(name)
    from .fsspec import FsspecStore

    return FsspecStore(name)
