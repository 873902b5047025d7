"""``inferq gateway``: the Flask app served by uWSGI (the ``pyuwsgi`` wheel), HTTP parsed in C.

Why uWSGI: a request's CPU in the gateway bounds what one gateway process serves, and on
waitress (pure Python) the server alone took about a third of it. uWSGI's HTTP/1.1 socket
parses in C, serves the app from a pool of threads per worker process, and, unlike granian's
WSGI interface, lets a waiting request find out that its client went away (so the request
is withdrawn, 499, as it was on waitress). The README ("The gateway's server") has the
choice's figures.

How it runs: this process binds the port itself (so a port in use is one clear line), then
becomes uWSGI's master (``pyuwsgi.run``), which forks ``processes`` workers; each imports
:mod:`inferq.gateway.wsgi`, which builds its own client and app. A waiting request holds one
of its worker's ``threads`` (an idle keep-alive connection too, up to 4 s). SIGTERM (and
SIGHUP) stop it gracefully: the requests in flight are answered, for up to
:data:`STOP_GRACE_SECONDS`. uWSGI's own messages go to a log file (:func:`server_log`); the
gateway's log lines go to this process's stderr, as before.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

from inferq import stack
from inferq.configs import redact_url
from inferq.errors import InferqError
from inferq.gateway.app import DEFAULT_MAX_BODY

log = logging.getLogger("inferq.gateway")

DEFAULT_THREADS = 256  # per process: requests that wait for a replica at once
DEFAULT_PROCESSES = 1
LOG_FORMAT = "%(asctime)s [gateway] %(levelname)s %(message)s"  # this process's and its workers'
STOP_GRACE_SECONDS = 90  # beyond the longest compute.timeout a request may wait (60 s default)
BACKLOG = 2048  # connections the kernel queues before a thread takes them
HEADER_BYTES = 32768  # the largest request line and headers together (uWSGI's default: 4 KiB)


def server_log(port: int) -> Path:
    """Where uWSGI's own messages go (starts, worker restarts, broken connections)."""
    return stack.home() / "logs" / f"gateway-{port}.uwsgi.log"


def uwsgi_args(fd: int, *, threads: int, processes: int, log_file: Path) -> list[str]:
    """uWSGI's command line: one place for every setting (README, "The gateway's server")."""
    graceful = "gracefully_kill_them_all"
    return [
        "--http11-socket", f"fd://{fd}",  # bound by serve(): HTTP/1.1 with keep-alive
        "--master", "--processes", str(processes), "--threads", str(threads),
        "--thunder-lock",  # workers take connections in turn
        "--lazy-apps", "--need-app",  # each worker builds the app; none: no gateway
        "--module", "inferq.gateway.wsgi:application",
        "--buffer-size", str(HEADER_BYTES),
        "--hook-master-start", f"unix_signal:15 {graceful}",  # SIGTERM: answer, then stop
        "--hook-master-start", f"unix_signal:1 {graceful}",  # SIGHUP too (not a re-exec)
        "--worker-reload-mercy", str(STOP_GRACE_SECONDS),
        "--no-orphans",  # workers die with the master
        "--disable-logging",  # no line per request
        "--logto", str(log_file),
    ]


def serve(broker_url: str, *, host: str = "127.0.0.1", port: int = 8888,
          threads: int = DEFAULT_THREADS, processes: int = DEFAULT_PROCESSES,
          max_body: int = DEFAULT_MAX_BODY) -> None:
    """Serve the gateway until SIGTERM, SIGHUP or SIGINT (this process becomes uWSGI's
    master and exits with it)."""
    import pyuwsgi

    listener = _listen(host, port)
    log_file = server_log(port)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    stderr = os.dup(2)  # the workers' log: this process's stderr, whatever uWSGI does to fd 2
    os.set_inheritable(stderr, True)
    os.environ.update({
        "INFERQ_BROKER_URL": broker_url,
        "INFERQ_GATEWAY_MAX_BODY": str(max_body),
        "INFERQ_GATEWAY_THREADS": str(threads),
        "INFERQ_GATEWAY_LOG_FD": str(stderr),
        "INFERQ_LOGLEVEL": logging.getLevelName(logging.getLogger().getEffectiveLevel()),
    })
    log.info("gateway listening on http://%s:%s (broker %s; %d process(es) of %d threads; "
             "uWSGI's log: %s)", host, port, redact_url(broker_url), processes, threads,
             log_file)
    # uWSGI writes its banner and messages to fds 1 and 2 before --logto takes over.
    with open(log_file, "ab") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    pyuwsgi.run(uwsgi_args(listener.fileno(), threads=threads, processes=processes,
                           log_file=log_file))  # exits the process


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise InferqError(f"cannot listen on {host}:{port}: another program (a gateway, "
                              "an inferq up?) listens there; choose another port with "
                              "--port") from None
        raise InferqError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    listener.listen(BACKLOG)
    listener.set_inheritable(True)
    return listener
