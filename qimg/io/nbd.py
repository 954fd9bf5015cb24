"""An NBD client: the protocol under qemu-nbd, nbdkit and nbd-server exports, and a byte store over it.

References:
  - The NBD protocol specification (NetworkBlockDevice/nbd, doc/proto.md): fixed newstyle negotiation,
    NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT ("base:allocation"), NBD_OPT_GO with NBD_INFO_EXPORT,
    NBD_OPT_EXPORT_NAME fallback, transmission requests, simple and structured replies (OFFSET_DATA,
    OFFSET_HOLE, BLOCK_STATUS, ERROR, ERROR_OFFSET), the NBD_STATE_HOLE / NBD_STATE_ZERO flags.
  - The NBD URI specification (doc/uri.md): nbd://host[:port]/export, nbd+unix:///export?socket=path;
    qemu's legacy "nbd:host:port[:exportname=X]" and "nbd:unix:path[:exportname=X]" forms.
  - Observed qemu-img 7.2 behaviour: creating on an export only checks its size ("Cannot grow NBD
    nodes"), and error wording.

``NbdStore`` offers the byte-store interface, so any format can live on an export (the ``raw`` view with
block status is ``formats.nbd.NbdDriver``).  Every socket operation has a timeout, and every length a
server sends is checked against a named limit before it is read.
"""

from __future__ import annotations

import socket
import struct
import threading
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import OpenError, QimgError, check_limit

NBD_DEFAULT_PORT = 10809
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
NBD_OPT_REPLY_MAGIC = 0x3E889045565A9
NBD_CLISERV_MAGIC_OLDSTYLE = 0x00420281861253
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_SET_META_CONTEXT = 10

NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5

NBD_INFO_EXPORT = 0
NBD_INFO_BLOCK_SIZE = 3

NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_FLAG_NO_HOLE = 1 << 1

NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR_BIT = 1 << 15

NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

#: limits on what a server may send or what we ask for
MAX_OPTION_REPLY = 64 << 10
MAX_ERROR_MESSAGE = 4096
MAX_REQUEST = 32 << 20
MAX_BLOCK_STATUS_DESCRIPTORS = 1 << 16
MAX_REPLY_CHUNKS = 1 << 16
MAX_EXPORT_SIZE = (1 << 63) - 1
MAX_BLOCK_STATUS_LENGTH = 1 << 30
#: seconds to wait for a connection and for each reply
CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 60.0

_ERRNO_NAMES = {1: "Operation not permitted", 5: "Input/output error", 12: "Cannot allocate memory",
                22: "Invalid argument", 28: "No space left on device", 75: "Value too large for defined data type",
                95: "Operation not supported", 108: "Cannot send after transport endpoint shutdown"}


class NbdError(QimgError):
    """The server refused a request or broke the protocol."""


def parse_uri(filename: str) -> tuple[tuple, str, str]:
    """(address for socket.connect as (family, addr), display address, export name) from an NBD filename."""
    if filename.startswith("nbd:") and not filename.startswith("nbd://") and "://" not in filename[:10]:
        # legacy: nbd:unix:PATH[:exportname=X] or nbd:HOST:PORT[:exportname=X]
        rest = filename[4:]
        export = ""
        if ":exportname=" in rest:
            rest, _, export = rest.partition(":exportname=")
        if rest.startswith("unix:"):
            path = rest[5:]
            return (socket.AF_UNIX, path), path, export
        host, _, port = rest.rpartition(":")
        if not host:
            host, port = rest, str(NBD_DEFAULT_PORT)
        try:
            port_n = int(port)
        except ValueError:
            raise OpenError("No valid URL specified") from None
        return (socket.AF_UNSPEC, (host, port_n)), f"{host}:{port_n}", export
    try:
        u = urlsplit(filename)
        port = u.port
    except ValueError:
        raise OpenError("No valid URL specified") from None
    scheme = u.scheme
    export = unquote(u.path.removeprefix("/"))
    if scheme == "nbd+unix":
        sock = parse_qs(u.query).get("socket")
        if not sock or u.netloc:
            raise OpenError("No valid URL specified")
        return (socket.AF_UNIX, sock[0]), sock[0], export
    if scheme not in ("nbd", "nbd+tcp") or not u.hostname:
        raise OpenError("No valid URL specified")
    port = port or NBD_DEFAULT_PORT
    return (socket.AF_UNSPEC, (u.hostname, port)), f"{u.hostname}:{port}", export


class NbdClient:
    """One NBD connection: negotiation, then one request in flight at a time (a lock orders threads)."""

    def __init__(self, filename: str, writable: bool):
        self.filename = filename
        (family, addr), self.display, self.export = parse_uri(filename)
        self.lock = threading.Lock()
        self.sock = None
        self.handle = 0
        self.structured = False
        self.meta_context_id = None
        self.min_block = 1
        self.max_block = MAX_REQUEST
        self._connect(family, addr)
        try:
            self._negotiate()
        except BaseException:
            self._close_socket()
            raise
        if writable and self.tflags & NBD_FLAG_READ_ONLY:
            self.close()
            raise OpenError("Could not open image: Permission denied")

    # ----- connection -----
    def _connect(self, family, addr) -> None:
        try:
            if family == socket.AF_UNIX:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(CONNECT_TIMEOUT)
                try:
                    s.connect(addr)
                except BaseException:
                    s.close()
                    raise
            else:
                s = socket.create_connection(addr, timeout=CONNECT_TIMEOUT)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            msg = e.strerror or str(e)
            raise OpenError(f"Failed to connect to '{self.display}': {msg}") from None
        s.settimeout(IO_TIMEOUT)
        self.sock = s

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view) -> None:
        got = 0
        n = len(view)
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError:
                raise NbdError(f"NBD server '{self.display}' did not answer within {IO_TIMEOUT:.0f} s") from None
            except OSError as e:
                raise NbdError(f"Failed to read from NBD server '{self.display}': {e.strerror or e}") from None
            if k == 0:
                raise NbdError(f"NBD server '{self.display}' closed the connection unexpectedly")
            got += k

    def _send(self, *parts) -> None:
        try:
            for p in parts:
                self.sock.sendall(p)
        except TimeoutError:
            raise NbdError(f"NBD server '{self.display}' did not accept data within {IO_TIMEOUT:.0f} s") from None
        except OSError as e:
            raise NbdError(f"Failed to write to NBD server '{self.display}': {e.strerror or e}") from None

    # ----- negotiation -----
    def _negotiate(self) -> None:
        magic, second = struct.unpack(">QQ", self._recv(16))
        if magic != NBDMAGIC:
            raise NbdError("Server is not an NBD server (bad magic)")
        if second == NBD_CLISERV_MAGIC_OLDSTYLE:
            size, flags = struct.unpack(">QI", self._recv(12))
            self._recv(124)
            self._set_export(size, flags & 0xFFFF)
            return
        if second != IHAVEOPT:
            raise NbdError(f"Unexpected NBD handshake magic 0x{second:x}")
        (hflags,) = struct.unpack(">H", self._recv(2))
        if not hflags & NBD_FLAG_FIXED_NEWSTYLE:
            raise NbdError("NBD server does not support the fixed newstyle handshake")
        no_zeroes = bool(hflags & NBD_FLAG_NO_ZEROES)
        self._send(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | (NBD_FLAG_C_NO_ZEROES if no_zeroes else 0)))
        rtype, _ = self._option(NBD_OPT_STRUCTURED_REPLY, b"")
        self.structured = rtype == NBD_REP_ACK
        if self.structured:
            self._set_meta_context()
        name = self.export.encode()
        check_limit("NBD export name length", len(name), 4096)
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, NBD_INFO_BLOCK_SIZE)
        self._send_option(NBD_OPT_GO, data)
        got_export = False
        for _ in range(MAX_REPLY_CHUNKS):
            rtype, payload = self._option_reply(NBD_OPT_GO)
            if rtype == NBD_REP_ACK:
                break
            if rtype == NBD_REP_INFO:
                if len(payload) < 2:
                    raise NbdError("NBD server sent a malformed NBD_REP_INFO")
                (itype,) = struct.unpack_from(">H", payload)
                if itype == NBD_INFO_EXPORT:
                    if len(payload) != 12:
                        raise NbdError("NBD server sent a malformed NBD_INFO_EXPORT")
                    size, tflags = struct.unpack_from(">QH", payload, 2)
                    self._set_export(size, tflags)
                    got_export = True
                elif itype == NBD_INFO_BLOCK_SIZE and len(payload) == 14:
                    mn, _pref, mx = struct.unpack_from(">III", payload, 2)
                    if 1 <= mn <= 65536 and mn & (mn - 1) == 0:
                        self.min_block = mn
                    if mx >= self.min_block:
                        self.max_block = min(mx, MAX_REQUEST)
                continue
            if rtype == NBD_REP_ERR_UNSUP:
                self._export_name_fallback(name, no_zeroes)
                return
            if rtype & NBD_REP_FLAG_ERROR:
                self._option_error(rtype, payload)
            raise NbdError(f"Unexpected NBD option reply type {rtype}")
        else:
            raise NbdError("NBD server sent too many option replies")
        if not got_export:
            raise NbdError("NBD server did not describe the export")

    def _export_name_fallback(self, name: bytes, no_zeroes: bool) -> None:
        self.structured = False
        self.meta_context_id = None
        self._send_option(NBD_OPT_EXPORT_NAME, name)
        size, tflags = struct.unpack(">QH", self._recv(10))
        if not no_zeroes:
            self._recv(124)
        self._set_export(size, tflags)

    def _set_export(self, size: int, tflags: int) -> None:
        check_limit("NBD export size", size, MAX_EXPORT_SIZE)
        self.size = size
        self.tflags = tflags

    def _set_meta_context(self) -> None:
        name = self.export.encode()
        query = b"base:allocation"
        data = (struct.pack(">I", len(name)) + name + struct.pack(">I", 1) + struct.pack(">I", len(query))
                + query)
        self._send_option(NBD_OPT_SET_META_CONTEXT, data)
        for _ in range(MAX_REPLY_CHUNKS):
            rtype, payload = self._option_reply(NBD_OPT_SET_META_CONTEXT)
            if rtype == NBD_REP_ACK:
                return
            if rtype == NBD_REP_META_CONTEXT:
                if len(payload) >= 4 and payload[4:] == query:
                    (self.meta_context_id,) = struct.unpack_from(">I", payload)
                continue
            if rtype & NBD_REP_FLAG_ERROR:
                return  # no block status: everything reads as data
            raise NbdError(f"Unexpected NBD option reply type {rtype}")
        raise NbdError("NBD server sent too many option replies")

    def _send_option(self, opt: int, data: bytes) -> None:
        self._send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def _option(self, opt: int, data: bytes) -> tuple[int, bytes]:
        self._send_option(opt, data)
        return self._option_reply(opt)

    def _option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, length = struct.unpack(">QIII", self._recv(20))
        if magic != NBD_OPT_REPLY_MAGIC:
            raise NbdError("NBD server sent a bad option reply magic")
        if ropt != opt:
            raise NbdError(f"NBD server replied to option {ropt} instead of {opt}")
        check_limit("NBD option reply length", length, MAX_OPTION_REPLY)
        return rtype, self._recv(length)

    def _option_error(self, rtype: int, payload: bytes) -> None:
        text = payload.decode("utf-8", "replace")
        if rtype == NBD_REP_ERR_UNKNOWN:
            msg = "Requested export not available"
        elif rtype == NBD_REP_ERR_TLS_REQD:
            msg = "TLS negotiation required before option 7 (go)"
        else:
            msg = f"NBD option failed (error 0x{rtype & 0x7FFFFFFF:x})"
        if text:
            msg += f"\nserver reported: {text}"
        raise OpenError(msg)

    # ----- transmission -----
    def _request(self, cmd: int, offset: int, length: int, flags: int = 0, data=None) -> int:
        self.handle += 1
        self._send(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, self.handle, offset, length),
                   *([data] if data is not None else []))
        return self.handle

    def _reply(self, handle: int, read_into=None, offset: int = 0, on_status=None) -> None:
        """Read the whole reply to ``handle``; data goes into ``read_into`` (a memoryview of the request)."""
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            err, h = struct.unpack(">IQ", self._recv(12))
            if h != handle:
                raise NbdError("NBD server replied with an unexpected handle")
            if err:
                self._fail(err, "")
            if read_into is not None:
                self._recv_into(read_into)
            return
        if magic != NBD_STRUCTURED_REPLY_MAGIC or not self.structured:
            raise NbdError(f"NBD server sent a bad reply magic 0x{magic:x}")
        covered = 0
        error = None
        for i in range(MAX_REPLY_CHUNKS):
            if i:
                (magic,) = struct.unpack(">I", self._recv(4))
                if magic != NBD_STRUCTURED_REPLY_MAGIC:
                    raise NbdError(f"NBD server sent a bad reply magic 0x{magic:x}")
            flags, rtype, h, length = struct.unpack(">HHQI", self._recv(16))
            if h != handle:
                raise NbdError("NBD server replied with an unexpected handle")
            want = len(read_into) if read_into is not None else 0
            check_limit("NBD reply chunk length", length, max(want, 0) + MAX_OPTION_REPLY)
            if rtype == NBD_REPLY_TYPE_OFFSET_DATA and read_into is not None:
                if length < 8:
                    raise NbdError("NBD server sent a malformed data chunk")
                (off,) = struct.unpack(">Q", self._recv(8))
                n = length - 8
                rel = off - offset
                if rel < 0 or rel + n > want:
                    raise NbdError("NBD server sent data outside the requested range")
                self._recv_into(read_into[rel:rel + n])
                covered += n
            elif rtype == NBD_REPLY_TYPE_OFFSET_HOLE and read_into is not None:
                if length != 12:
                    raise NbdError("NBD server sent a malformed hole chunk")
                off, n = struct.unpack(">QI", self._recv(12))
                rel = off - offset
                if rel < 0 or rel + n > want:
                    raise NbdError("NBD server sent a hole outside the requested range")
                read_into[rel:rel + n] = bytes(n)
                covered += n
            elif rtype == NBD_REPLY_TYPE_BLOCK_STATUS and on_status is not None:
                if length < 12 or (length - 4) % 8:
                    raise NbdError("NBD server sent a malformed block status chunk")
                check_limit("NBD block status descriptors", (length - 4) // 8, MAX_BLOCK_STATUS_DESCRIPTORS)
                payload = self._recv(length)
                (ctx,) = struct.unpack_from(">I", payload)
                if ctx == self.meta_context_id:
                    on_status(payload[4:])
            elif rtype & NBD_REPLY_TYPE_ERROR_BIT:
                payload = self._recv(length)
                if len(payload) < 6:
                    raise NbdError("NBD server sent a malformed error chunk")
                err, mlen = struct.unpack_from(">IH", payload)
                check_limit("NBD error message length", mlen, MAX_ERROR_MESSAGE)
                error = (err, payload[6:6 + mlen].decode("utf-8", "replace"))
            elif rtype == NBD_REPLY_TYPE_NONE:
                if length:
                    raise NbdError("NBD server sent a malformed NONE chunk")
            else:
                raise NbdError(f"NBD server sent an unexpected reply chunk type {rtype}")
            if flags & NBD_REPLY_FLAG_DONE:
                break
        else:
            raise NbdError("NBD server sent too many reply chunks")
        if error is not None:
            self._fail(*error)
        if read_into is not None and covered != len(read_into):
            raise NbdError("NBD server's read reply did not cover the requested range")

    def _fail(self, err: int, msg: str) -> None:
        text = _ERRNO_NAMES.get(err, f"error {err}")
        raise NbdError(f"NBD request failed: {msg or text}")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise QimgError(f"NBD request at offset {offset} length {length} is beyond the export size "
                            f"{self.size}")

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        pos = 0
        with self.lock:
            while pos < len(view):
                n = min(len(view) - pos, self.max_block)
                h = self._request(NBD_CMD_READ, offset + pos, n)
                self._reply(h, view[pos:pos + n], offset + pos)
                pos += n

    def pwrite(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        pos = 0
        with self.lock:
            while pos < len(view):
                n = min(len(view) - pos, self.max_block)
                h = self._request(NBD_CMD_WRITE, offset + pos, n, data=view[pos:pos + n])
                self._reply(h)
                pos += n

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> bool:
        if not self.tflags & NBD_FLAG_SEND_WRITE_ZEROES:
            return False
        self._check_range(offset, length)
        pos = 0
        step = 1 << 30
        with self.lock:
            while pos < length:
                n = min(length - pos, step)
                h = self._request(NBD_CMD_WRITE_ZEROES, offset + pos, n, 0 if may_trim else NBD_CMD_FLAG_NO_HOLE)
                self._reply(h)
                pos += n
        return True

    def flush(self) -> None:
        if not self.tflags & NBD_FLAG_SEND_FLUSH:
            return
        with self.lock:
            self._reply(self._request(NBD_CMD_FLUSH, 0, 0))

    def block_status(self, offset: int, length: int) -> tuple[int, int]:
        """(length, flags) of the first run at ``offset``: NBD_STATE_HOLE / NBD_STATE_ZERO bits."""
        length = min(length, self.size - offset, MAX_BLOCK_STATUS_LENGTH)
        if self.meta_context_id is None or length <= 0:
            return max(length, 1), 0
        result = []

        def on_status(desc: bytes) -> None:
            if not result:
                n, fl = struct.unpack_from(">II", desc)
                result.append((n, fl))

        with self.lock:
            self._reply(self._request(NBD_CMD_BLOCK_STATUS, offset, length), on_status=on_status)
        if not result or result[0][0] == 0:
            raise NbdError("NBD server sent no usable block status")
        n, fl = result[0]
        return min(n, length), fl

    def _close_socket(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def close(self) -> None:
        if self.sock is None:
            return
        try:
            with self.lock:
                self._request(NBD_CMD_DISC, 0, 0)
        except QimgError:
            pass
        self._close_socket()


class NbdStore:
    """The byte-store interface over an NBD export (so any format can be read from or written to one)."""

    is_block = True
    #: no host allocation to report (info shows "disk size: unavailable")
    allocation_unknown = True

    def __init__(self, filename: str, writable: bool = False):
        self.filename = self.display_name = filename
        self.writable = writable
        self.client = NbdClient(filename, writable)

    def size(self) -> int:
        return self.client.size

    def pread(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.client.size - offset))
        buf = bytearray(length)
        if length:
            self.client.readinto(offset, buf)
        return bytes(buf)

    def pread_full(self, offset: int, length: int) -> bytes:
        data = self.pread(offset, length)
        return data + bytes(length - len(data))

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self.client.size - offset))
        if n:
            self.client.readinto(offset, view[:n])
        return n

    def pwrite(self, offset: int, data) -> None:
        if offset + len(data) > self.client.size:
            raise QimgError("Cannot grow NBD nodes")
        self.client.pwrite(offset, data)

    def truncate(self, size: int) -> None:
        if size > self.client.size:
            raise QimgError("Cannot grow NBD nodes")

    def fallocate(self, offset: int, length: int) -> None:
        pass

    def punch_hole(self, offset: int, length: int) -> bool:
        return self.client.write_zeroes(offset, length, True)

    def flush(self) -> None:
        self.client.flush()

    def allocated_size(self) -> int:
        # NBD has no notion of host allocation; formats on top see the export as fully used
        return self.client.size

    def next_data(self, offset: int) -> int | None:
        pos = offset
        for _ in range(MAX_REPLY_CHUNKS):
            if pos >= self.client.size:
                return None
            n, fl = self.client.block_status(pos, self.client.size - pos)
            if not fl & NBD_STATE_HOLE:
                return pos
            pos += n
        return pos

    def next_hole(self, offset: int) -> int:
        pos = offset
        for _ in range(MAX_REPLY_CHUNKS):
            if pos >= self.client.size:
                return self.client.size
            n, fl = self.client.block_status(pos, self.client.size - pos)
            if fl & NBD_STATE_HOLE:
                return pos
            pos += n
        return pos

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["NbdClient", "NbdError", "NbdStore", "parse_uri"]
