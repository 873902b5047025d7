"""Pytest plugin: a real S3-compatible server (moto's server mode) on a free loopback port.

``s3_server`` runs ``python -m moto.server`` as a child process for the session; ``s3`` gives a
test a clean server, the ``AWS_*`` variables boto3 reads, and a client; ``s3_proxy`` puts a
small HTTP proxy in front of the server that records every request and can answer like a
failing or stalling S3. Nothing patches boto3: every request is real HTTP.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import boto3
import pytest
from helpers import S3_PART_MIN_BYTES

from inferq.processes import spawn, stop, wait_until
from inferq.stack import free_port


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The endpoint URL of a moto S3 server for the session, stopped by PID at the end."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log:
        process = spawn(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            # multipart uploads with small parts, so tests need not write 5 MiB per part
            env={**os.environ, "S3_UPLOAD_PART_MIN_SIZE": str(S3_PART_MIN_BYTES)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with {process.returncode}:\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    return True
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_until(answers, 30, what=f"moto server on port {port} answering")
        yield url
    finally:
        stop(process)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """An empty S3 server that boto3 reaches through its own ``AWS_*`` configuration."""
    request = urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return boto3.client("s3", endpoint_url=s3_server)


class S3Proxy:
    """A loopback HTTP proxy to the S3 server that records requests and injects failures.

    ``requests`` lists ``(method, path, headers)`` in arrival order. ``answer_next(n, status,
    code)`` answers the next ``n`` requests itself with an S3 error. After ``stall()``, object
    downloads send half their body and wait for ``release()``.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._failures: list[tuple[int, str]] = []
        self._stalling = False
        self.stalled = threading.Event()  # set while a download waits for release()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def answer_next(self, count: int, status: int, code: str) -> None:
        with self._lock:
            self._failures.extend([(status, code)] * count)

    def stall(self) -> None:
        self._stalling = True

    def release(self) -> None:
        self._stalling = False
        self._released.set()

    def object_gets(self, key: str) -> int:
        """How many times the object ``key`` was downloaded (GET requests for it)."""
        return sum(
            1 for method, path, _ in self.requests
            if method == "GET" and urlsplit(path).path.endswith("/" + key)
        )

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._forward()

            def do_GET(self) -> None:
                self._forward()

            def do_PUT(self) -> None:
                self._forward()

            def do_POST(self) -> None:
                self._forward()

            def do_DELETE(self) -> None:
                self._forward()

            def _forward(self) -> None:
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, dict(self.headers)))
                    failure = proxy._failures.pop(0) if proxy._failures else None
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if failure is not None:
                    return self._fail(*failure)
                upstream = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=30
                )
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in ("connection", "transfer-encoding", "date",
                                               "server", "content-length"):
                            self.send_header(key, value)
                    length = response.getheader("Content-Length", str(len(data)))
                    self.send_header("Content-Length", length)
                    self.end_headers()
                    self._send_body(data)
                finally:
                    upstream.close()

            def _send_body(self, data: bytes) -> None:
                if self.command != "GET" or not data:
                    self.wfile.write(data)
                    return
                is_object = "list-type" not in self.path and self.path.count("/") > 1
                if not (proxy._stalling and is_object):
                    self.wfile.write(data)
                    return
                half = len(data) // 2
                self.wfile.write(data[:half])
                self.wfile.flush()
                proxy.stalled.set()
                proxy._released.wait(30)
                with contextlib.suppress(OSError):  # the client was killed while it waited
                    self.wfile.write(data[half:])

            def _fail(self, status: int, code: str) -> None:
                xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                       f"<Message>injected by the test proxy</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)

        return Handler


@pytest.fixture
def s3_proxy(s3, s3_server, monkeypatch):
    """An :class:`S3Proxy` in front of the S3 server; boto3 clients created now go through it."""
    proxy = S3Proxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.close()
