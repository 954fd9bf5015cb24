"""HTTP(S) images read with Range requests (RFC 9110, section 14: Range, Content-Range, 206).

Standard library only (http.client): kept-alive connections are reused from a small pool, each
read is one ``GET`` with ``Range: bytes=START-END``, and the answer must be a ``206`` whose
``Content-Range`` names exactly that range.  A server that answers a range request with the whole
object (``200``), an error status, a stall past the timeout or a body shorter than announced each
end the command with one line.
"""

from __future__ import annotations

import http.client
import queue
import re
import socket
import ssl
from urllib.parse import urlsplit

from ..errors import OpenError, QimgError
from .remote import CACHE_BLOCK, RemoteStore, remote_timeout

_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
#: connections kept alive per store
MAX_IDLE = 8
#: redirects followed while opening
MAX_REDIRECTS = 5
#: a reused connection the server closed meanwhile is retried this many times on a new one
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.BadStatusLine)


class _Redirect(Exception):
    def __init__(self, location: str):
        super().__init__(location)
        self.location = location


class _Redirect(Exception):
    def __init__(self, location: str):
        super().__init__(location)
        self.location = location


class HttpStore(RemoteStore):
    """An object on an HTTP(S) server, read by byte range."""

    def __init__(self, url: str):
        super().__init__(url)
        parts = urlsplit(url)
        if not parts.hostname:
            raise OpenError(f"no host in URL '{url}'")
        self._https = parts.scheme.lower() == "https"
        self._host = parts.hostname
        try:
            self._port = parts.port
        except ValueError:
            raise OpenError(f"bad port in URL '{url}'") from None
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout = remote_timeout()
        self._redirects = 0
        self._idle: queue.LifoQueue = queue.LifoQueue()
        # the first block answers three questions at once: does it exist, does Range work, how large
        head = bytearray(CACHE_BLOCK)
        self._size = None
        got = self._get(0, memoryview(head), opening=True)
        self._remember(0, 0, {0: bytes(head[:got])})

    # ----- connections -----
    def _connect(self):
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def _take(self):
        try:
            return self._idle.get_nowait(), True
        except queue.Empty:
            return self._connect(), False

    def _give_back(self, conn) -> None:
        if self._idle.qsize() < MAX_IDLE:
            self._idle.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        super().close()
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break

    # ----- ranged reads -----
    def _fetch_into(self, offset: int, view) -> None:
        self._get(offset, view)

    def _get(self, offset: int, view, opening: bool = False) -> int:
        """One ranged GET into ``view``; returns the bytes received (short only at the object's end
        while opening, when the size is not known yet)."""
        want = len(view)
        while True:
            conn, reused = self._take()
            try:
                conn.request("GET", self._path, headers={"Range": f"bytes={offset}-{offset + want - 1}",
                                                          "Accept-Encoding": "identity"})
                resp = conn.getresponse()
            except _STALE:
                conn.close()
                if reused:
                    continue  # the server closed an idle connection: try a fresh one
                raise self._error(offset, "the server closed the connection") from None
            except (socket.timeout, TimeoutError):
                conn.close()
                raise self._error(offset, f"timed out after {self._timeout:g} s") from None
            except ssl.SSLError as e:
                conn.close()
                raise self._error(offset, f"TLS error: {e.reason or e}") from None
            except OSError as e:
                conn.close()
                raise self._error(offset, e.strerror or str(e)) from None
            break
        self.requests += 1
        try:
            n = self._body(resp, offset, view, opening)
        except _Redirect as r:
            conn.close()
            self._follow(r.location)
            return self._get(offset, view, opening=True)
        except BaseException:
            conn.close()
            raise
        if resp.will_close:
            conn.close()
        else:
            self._give_back(conn)
        return n

    def _follow(self, location: str) -> None:
        """Go on at a redirect's target (mirrors, object stores' signed URLs); only while opening."""
        from urllib.parse import urljoin

        self._redirects += 1
        if self._redirects > MAX_REDIRECTS:
            raise self._error(0, f"more than {MAX_REDIRECTS} redirects")
        target = urlsplit(urljoin(f"{'https' if self._https else 'http'}://{self._host}"
                                  f"{':' + str(self._port) if self._port else ''}{self._path}", location))
        if target.scheme not in ("http", "https") or not target.hostname:
            raise self._error(0, f"redirected to an unusable location '{location}'")
        while True:  # connections to the old host are of no use any more
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        self._https, self._host, self._port = target.scheme == "https", target.hostname, target.port
        self._path = (target.path or "/") + (f"?{target.query}" if target.query else "")

    def _body(self, resp, offset: int, view, opening: bool) -> int:
        want = len(view)
        if resp.status in (301, 302, 303, 307, 308) and opening and resp.getheader("Location"):
            resp.read()
            raise _Redirect(resp.getheader("Location"))
        if resp.status == 416 and opening:
            resp.read()
            self._size = 0  # an empty object: no byte satisfies any range
            return 0
        if resp.status == 200:
            resp.close()
            raise self._error(offset, "the server does not support HTTP Range requests "
                                      "(it answered a range request with the whole object)")
        if resp.status != 206:
            resp.close()
            raise self._error(offset, f"HTTP error {resp.status} {resp.reason}".rstrip())
        m = _CONTENT_RANGE.match(resp.getheader("Content-Range", "").strip())
        if m is None or int(m.group(1)) != offset:
            resp.close()
            raise self._error(offset, "the server answered with a different range than asked for")
        start, end, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if opening:
            if total == "*":
                resp.close()
                raise self._error(offset, "the server does not tell the object's size")
            self._size = int(total)
            want = min(want, self._size)
        expected = end - start + 1
        if expected != want:
            resp.close()
            raise self._error(offset, f"the server answered {expected} bytes for a range of {want}")
        got = 0
        try:
            while got < want:
                n = resp.readinto(view[got:want])
                if not n:
                    break
                got += n
        except (socket.timeout, TimeoutError):
            raise self._error(offset, f"timed out after {self._timeout:g} s") from None
        except (http.client.IncompleteRead, OSError):
            pass
        if got < want:
            raise self._error(offset, f"truncated response: got {got} of {want} bytes")
        return got

    def _error(self, offset: int, reason: str) -> QimgError:
        if self._size is None:
            return OpenError(reason)  # the registry adds "Could not open 'URL': "
        return QimgError(f"Could not read '{self.filename}' at offset {offset}: {reason}")
