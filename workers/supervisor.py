"""``inferq worker API_NAME``: one replica, a small supervisor over its serving process.

The serving process (``inferq.workers.worker``) is a Celery worker with the ``solo`` pool: a
request crosses one process. This parent takes no part in requests; it exists to notice at
once (``waitpid``) that the serving process died, whatever killed it (SIGKILL, the OOM
killer, a crash), and to put back what it held: at the head of the queue for another
replica, or, when the request had already killed a replica before, answered with a clear
error (see :meth:`inferq.registry.Queues.recover`). It forwards SIGTERM and SIGINT (a warm
shutdown: the current request finishes) and exits with the serving process's code. The
replica's id is this process's: ``<host>-<pid>``, as the scaler sees it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

import redis

from inferq import keys
from inferq.errors import UnknownAPI
from inferq.processes import die_with_parent, spawn
from inferq.registry import EXIT_INIT_FAILED, Registry, replica_id

log = logging.getLogger("inferq.worker")

def supervise(api: str, broker_url: str, *, loglevel: str = "INFO") -> int:
    """Run one replica of ``api`` until it stops; return its exit code."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(message)s")
    registry = Registry(broker_url, max_connections=2)
    registry.ping()
    if registry.deployments.api(api) is None:
        raise UnknownAPI(f'no API named "{api}" is deployed (see `inferq get`)')
    replica = replica_id()
    child = spawn(
        [sys.executable, "-P", "-m", "inferq", "worker", api, "--serve", replica,
         "--loglevel", loglevel],
        env={**os.environ, "INFERQ_BROKER_URL": broker_url},
        own_group=False,  # the scaler's SIGKILL of this group, or a terminal's Ctrl-C, reach it
    )

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)  # Celery's warm shutdown

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the serving process itself
    code = _wait(child)
    if code != 0 and code != EXIT_INIT_FAILED:
        _recover(registry, api, replica, code)
    if code != EXIT_INIT_FAILED:  # a failed start keeps its record: it holds the traceback
        _forget(registry, api, replica)
    return code if code >= 0 else 128 - code


def _wait(child: subprocess.Popen) -> int:
    while True:
        try:
            return child.wait()
        except InterruptedError:  # a forwarded signal; keep waiting for the warm shutdown
            continue


def _recover(registry: Registry, api: str, replica: str, code: int) -> None:
    """The serving process died: put back what it held (it cannot answer any more)."""
    try:
        requeued, failed = registry.queues.recover(api, replica, keys.queue(api))
    except redis.RedisError as exc:  # the scaler recovers it when the broker is back
        log.error('api "%s": replica %s died (%s) and the broker is unreachable (%s)',
                  api, replica, _describe(code), exc)
        return
    log.error('api "%s": replica %s died (%s); %d request(s) put back, %d answered with an error',
              api, replica, _describe(code), requeued, failed)


def _forget(registry: Registry, api: str, replica: str) -> None:
    with contextlib.suppress(redis.RedisError):  # the scaler forgets it
        registry.replicas.remove(api, replica)


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def serve_child(api: str, broker_url: str, replica: str, *, loglevel: str) -> int:
    """The serving process's entry point (``inferq worker API --serve REPLICA``)."""
    die_with_parent()  # a SIGKILLed supervisor must not leave its serving process behind
    from inferq.workers.worker import serve

    return serve(api, broker_url, replica, loglevel=loglevel)
