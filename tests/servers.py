"""Real servers for the remote tests, started on 127.0.0.1 and stopped after: nginx and moto's S3 server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

#: one line per request: method, path, Range header, status, body bytes
_LOG_FORMAT = "'$request_method $uri \"$http_range\" $status $body_bytes_sent'"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port}")


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Nginx:
    """nginx serving ``root`` on a free port: ``/`` with Range support, ``/norange/`` without it, ``/moved/X``
    redirecting to ``/X``."""

    def __init__(self, root, workdir):
        if NGINX is None:
            pytest.skip("nginx is not installed")
        self.root = str(root)
        self.dir = str(workdir)
        os.makedirs(self.dir, exist_ok=True)
        self.log = os.path.join(self.dir, "access.log")
        self.port = free_port()
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""{user}daemon off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 256; }}
http {{
    log_format counted {_LOG_FORMAT};
    access_log {self.log} counted;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    keepalive_requests 100000;
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        location /norange/ {{ alias {self.root}/; max_ranges 0; }}
        location /moved/ {{ rewrite ^/moved/(.*)$ /$1 redirect; }}
    }}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-p", self.dir, "-c", conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_listening(self.port, self.proc, "nginx")
        except RuntimeError:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
            stop(self.proc)
            raise RuntimeError(f"nginx did not start: {err}") from None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def requests(self) -> list[str]:
        """The access log's lines so far (nginx writes each line when its request ends)."""
        try:
            with open(self.log) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def count(self, name: str) -> int:
        return sum(1 for line in self.requests() if line.split(" ")[1] == f"/{name}")

    def close(self) -> None:
        stop(self.proc, signal.SIGQUIT)
        self.proc.stderr.close()


class MotoS3:
    """moto's S3 server on a free port, with dummy credentials in the environment of what it serves."""

    def __init__(self, workdir):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(str(workdir), "moto.log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)
        wait_listening(self.port, self.proc, "moto server")
        # moto answers once its app is loaded
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).read()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def env(self) -> dict:
        """What a process needs to reach this server through s3fs."""
        return {"FSSPEC_S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=self.endpoint,
                                 skip_instance_cache=True)

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


class Misbehaving:
    """A deliberately broken HTTP server for the error paths nginx cannot show: it serves ``data``
    correctly for ranges starting at 0 and, for the others, ``mode`` "truncate" sends half of the body
    and closes, "stall" never answers."""

    def __init__(self, data: bytes, mode: str):
        import threading

        self.data, self.mode = data, mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.opens = 0  # requests for the range at 0: one per opening
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self, name="x.qcow2") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def _serve(self):
        import threading

        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        f = conn.makefile("rb")
        try:
            while True:
                lines = []
                while True:
                    line = f.readline()
                    if not line:
                        return
                    if line in (b"\r\n", b"\n"):
                        break
                    lines.append(line.decode("latin-1").strip())
                rng = next(v.split("=", 1)[1] for k, _, v in (x.partition(": ") for x in lines) if k.lower() == "range")
                start, end = (int(x) for x in rng.split("-"))
                end = min(end, len(self.data) - 1)
                body = self.data[start:end + 1]
                head = (f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{end}/{len(self.data)}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()
                if start == 0:
                    self.opens += 1
                    conn.sendall(head + body)
                elif self.mode == "truncate":
                    conn.sendall(head + body[:len(body) // 2])
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                else:
                    self._stop.wait(60)
                    return
        except OSError:
            return
        finally:
            f.close()
            conn.close()

    def close(self):
        self._stop.set()
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
