"""The fast path: a prediction POST answered below Flask's dispatch.

Most requests a gateway serves are the same: ``POST <endpoint>`` with a JSON body, no query
string, an endpoint the client's API list knows. Flask's request context, routing and
response object cost about as much CPU as the rest of such a request; :class:`FastPredict`
answers it from the WSGI environ with the same :meth:`Gateway.predict
<inferq.gateway.app.Gateway.predict>` the Flask route calls, so both give the same status,
body and headers. Everything else (a query string, a body over the limit or without a length,
an unknown endpoint, an API with ``server_side_batching``, any other method or path) goes to
Flask unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask
from werkzeug.http import HTTP_STATUS_CODES

from inferq.gateway.app import Gateway, Reply, internal_error
from inferq.gateway.connection import still_wanted

log = logging.getLogger("inferq.gateway")

# The status lines Flask (Werkzeug) writes, so that both paths answer byte for byte alike.
_REASONS = {code: f"{code} {phrase.upper()}" for code, phrase in HTTP_STATUS_CODES.items()}


class FastPredict:
    """WSGI middleware in front of the gateway's Flask app (see the module doc)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.gateway: Gateway = app.extensions["inferq.gateway"]

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        gateway = self.gateway
        length = environ.get("CONTENT_LENGTH") or ""
        if (environ["REQUEST_METHOD"] != "POST" or environ.get("QUERY_STRING")
                or not length.isdigit() or int(length) > gateway.max_body):
            return self.app(environ, start_response)
        endpoint = environ.get("PATH_INFO") or "/"
        deployed = gateway.routes.cached(endpoint)
        if deployed is None or gateway.batchers.get(deployed) is not None:
            return self.app(environ, start_response)
        started = time.perf_counter()
        name = deployed.name
        try:
            body = environ["wsgi.input"].read(int(length))
            answer, name = gateway.predict(deployed, endpoint, body, debug=False,
                                           wants_async=False,
                                           still_wanted=still_wanted(environ))
        except Exception as exc:  # a bug: JSON like every answer, as Flask's handler does
            log.exception("unexpected error serving POST %s", endpoint)
            answer = internal_error(exc, name)
        gateway.metrics.observe(name, answer.status, time.perf_counter() - started)
        return _respond(answer, start_response)


def _respond(answer: Reply, start_response: Callable[..., Any]) -> list[bytes]:
    data = answer.body.encode()
    start_response(_REASONS.get(answer.status, f"{answer.status} UNKNOWN"),
                   [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                    *answer.headers])
    return [data]
