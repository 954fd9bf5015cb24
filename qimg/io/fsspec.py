"""Images behind any URL scheme fsspec knows (``s3://``, ``gs://``, ``az://``, ...), read by byte range.

fsspec and its backend are optional (``pip install 'qimg[remote]'``); without them the error names
the package to install.  The backend's settings come from fsspec's own configuration: its config
files and ``FSSPEC_<PROTOCOL>_<OPTION>`` variables (e.g. ``FSSPEC_S3_ENDPOINT_URL``), and the
backend's usual credentials (``AWS_ACCESS_KEY_ID``...).
"""

from __future__ import annotations

from ..errors import OpenError, QimgError
from .remote import RemoteStore, url_scheme

#: the package that implements a scheme, for the message when it is missing
BACKENDS = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
    "abfss": "adlfs", "adl": "adlfs", "hf": "huggingface_hub", "sftp": "paramiko", "ssh": "paramiko",
    "oci": "ocifs", "webdav": "webdav4",
}


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL, or OpenError naming what to install."""
    scheme = url_scheme(url) or ""
    try:
        import fsspec
        import fsspec.config
    except ImportError:
        raise OpenError(f"{scheme}:// URLs need the package fsspec"
                        f"{' and ' + BACKENDS[scheme] if scheme in BACKENDS else ''}: "
                        "pip install 'qimg[remote]'") from None
    # FSSPEC_<PROTOCOL>_<OPTION> variables as they are now (fsspec reads them once, when imported)
    fsspec.config.set_conf_env(fsspec.config.conf)
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        pkg = BACKENDS.get(scheme, f"the fsspec backend for {scheme}://")
        raise OpenError(f"{scheme}:// URLs need the package {pkg}: pip install {pkg}") from None
    except ValueError as e:
        if "Protocol not known" in str(e):
            raise OpenError(f"unknown URL scheme '{scheme}://'") from None
        raise OpenError(str(e)) from None


def describe(e: BaseException) -> str:
    """One line for an error raised by an fsspec backend."""
    if isinstance(e, FileNotFoundError):
        return "No such file or directory"
    if isinstance(e, PermissionError):
        return "Permission denied"
    if isinstance(e, TimeoutError):
        return "timed out"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class FsspecStore(RemoteStore):
    """An object behind an fsspec URL, read with ``cat_file(path, start, end)``."""

    def __init__(self, url: str):
        super().__init__(url)
        self.fs, self.path = filesystem(url)
        try:
            info = self.fs.info(self.path)
        except Exception as e:  # backends raise their own types (botocore, aiohttp...)
            raise OpenError(describe(e)) from None
        if info.get("type") == "directory":
            raise OpenError("Is a directory")
        self._size = int(info.get("size") or 0)

    def _fetch_into(self, offset: int, view) -> None:
        want = len(view)
        try:
            data = self.fs.cat_file(self.path, start=offset, end=offset + want)
        except Exception as e:
            raise QimgError(f"Could not read '{self.filename}' at offset {offset}: {describe(e)}") from None
        self.requests += 1
        if len(data) != want:
            raise QimgError(f"Could not read '{self.filename}' at offset {offset}: "
                            f"truncated response: got {len(data)} of {want} bytes")
        view[:] = data
