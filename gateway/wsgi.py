"""The gateway as uWSGI loads it in each of its worker processes (``--module
inferq.gateway.wsgi:application``; :mod:`inferq.gateway.server` starts uWSGI).

Everything comes from the environment :func:`~inferq.gateway.server.serve` always sets: the
broker, the body limit, the threads (each may hold a registry connection), the log level, and
the file descriptor of the gateway's own stderr (uWSGI's chatter goes to a file of its own). The
:class:`~inferq.client.Client` is built here, after uWSGI forked this worker, so its reply
listener thread lives in the process that serves (a thread started before the fork would be
gone, while ``Thread.is_alive()`` still said True).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

from inferq.client import Client
from inferq.gateway.app import create_app
from inferq.gateway.connection import ChunkedBody
from inferq.gateway.fast import FastPredict
from inferq.gateway.server import LOG_FORMAT

log = logging.getLogger("inferq.gateway")


def _setup_logging() -> None:
    fd = int(os.environ["INFERQ_GATEWAY_LOG_FD"])
    stream = os.fdopen(fd, "w", buffering=1, closefd=False)
    sys.stderr = stream  # a traceback Python prints goes where the gateway's log goes
    logging.basicConfig(level=os.environ["INFERQ_LOGLEVEL"], stream=stream, format=LOG_FORMAT,
                        force=True)


def _build():
    _setup_logging()
    max_body = int(os.environ["INFERQ_GATEWAY_MAX_BODY"])
    threads = int(os.environ["INFERQ_GATEWAY_THREADS"])
    try:
        client = Client(os.environ["INFERQ_BROKER_URL"], max_connections=threads + 16)
        flask_app = create_app(client, max_body=max_body)
    except Exception:
        log.exception("the gateway could not start")
        raise

    def close() -> None:
        flask_app.extensions["inferq.gateway"].close()
        client.close()

    atexit.register(close)
    return ChunkedBody(FastPredict(flask_app), max_body)


application = _build()
