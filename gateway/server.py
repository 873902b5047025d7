"""``inferq gateway``: the Flask app on waitress, a production WSGI server.

Each waiting request holds one of waitress's threads while its reply is pending (the reply
itself arrives through the client's single listener thread, see ``inferq.client``), so the
thread count bounds how many requests wait in the API queues at once; connections beyond it
wait in waitress's own queue and are served in order.
"""

from __future__ import annotations

import errno
import logging

from waitress import create_server

from inferq.client import Client
from inferq.errors import InferqError
from inferq.gateway.app import DEFAULT_MAX_BODY, create_app

log = logging.getLogger("inferq.gateway")


def serve(broker_url: str, *, host: str = "127.0.0.1", port: int = 8888, threads: int = 256,
          max_body: int = DEFAULT_MAX_BODY) -> None:
    """Serve the gateway until interrupted."""
    # Every waitress thread may hold a registry connection at once, plus the reply listener
    # and the metrics flusher.
    client = Client(broker_url, max_connections=threads + 16)
    app = create_app(client, max_body=max_body)
    try:
        server = create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            connection_limit=max(1000, threads * 4),
            backlog=2048,
            channel_request_lookahead=1,  # lets a waiting request notice its client went away
            # Flask answers 413 itself, with a JSON body; waitress only stops absurd uploads.
            max_request_body_size=max_body * 4 + (1 << 20),
            ident="inferq",
            clear_untrusted_proxy_headers=True,
        )
    except OSError as exc:
        app.extensions["inferq.batchers"].close()
        client.close()
        if exc.errno == errno.EADDRINUSE:
            raise InferqError(f"cannot listen on {host}:{port}: another program (a gateway, "
                              "an inferq up?) listens there; choose another port with "
                              "--port") from None
        raise
    log.info("gateway listening on http://%s:%s (broker %s)", host, port, client.registry.safe_url)
    try:
        server.run()
    finally:
        server.close()
        app.extensions["inferq.batchers"].close()
        client.close()
