"""What the gateway learns of a request's connection from uWSGI, which serves it
(:mod:`inferq.gateway.server`): whether its client is still there, and a chunked body.

Outside uWSGI (Flask's test client) there is no connection to look at: nothing is detected,
and the body is Werkzeug's.
"""

from __future__ import annotations

import io
import select
import socket
from collections.abc import Callable
from types import ModuleType
from typing import Any

_GONE = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)
CHUNKED_READ_SECONDS = 30  # a chunked body's next chunk comes within this


def _uwsgi(environ: dict[str, Any]) -> ModuleType | None:
    """uWSGI's API when uWSGI serves this request. Looked up per request, not at import:
    ``inferq gateway`` imports this module before it becomes uWSGI, when there is none yet."""
    if "uwsgi.version" not in environ:
        return None
    try:
        import uwsgi
    except ImportError:
        return None
    return uwsgi


def still_wanted(environ: dict[str, Any]) -> Callable[[], bool] | None:
    """A check that is False once the client closed the request's connection (None when
    the server tells nothing); cheap enough to call twice a second while a request waits."""
    uwsgi = _uwsgi(environ)
    if uwsgi is None:
        return None
    fd = uwsgi.connection_fd()  # valid while this request is served

    def wanted() -> bool:
        poller = select.poll()
        poller.register(fd, select.POLLIN | _GONE)
        events = poller.poll(0)
        if not events:
            return True
        if events[0][1] & _GONE:
            return False
        # Readable: more bytes (a pipelined request: still there), or the end of the stream.
        peek = socket.socket(fileno=fd)
        try:
            return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            peek.detach()  # the socket is uWSGI's: never close it here

    return wanted


class ChunkedBody:
    """WSGI middleware: a request body sent with ``Transfer-Encoding: chunked`` read whole
    (up to one chunk past ``max_body``, so that the app answers 413), since uWSGI leaves it
    undecoded; the app then sees a body with a ``Content-Length``."""

    def __init__(self, app: Callable, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Any:
        uwsgi = _uwsgi(environ)
        if uwsgi is not None and environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            parts: list[bytes] = []
            size = 0
            try:
                while size <= self.max_body:
                    chunk = uwsgi.chunked_read(CHUNKED_READ_SECONDS)
                    if not chunk:
                        break
                    parts.append(chunk)
                    size += len(chunk)
            except OSError as exc:
                body = b'{"error":"the chunked request body could not be read: %s"}\n' % (
                    str(exc).encode("ascii", "replace").replace(b'"', b"'"))
                start_response("400 Bad Request", [("Content-Type", "application/json"),
                                                   ("Content-Length", str(len(body)))])
                return [body]
            data = b"".join(parts)
            environ["wsgi.input"] = io.BytesIO(data)
            environ["CONTENT_LENGTH"] = str(len(data))
            del environ["HTTP_TRANSFER_ENCODING"]  # else Werkzeug ignores the length
        return self.app(environ, start_response)
