"""``inferq worker API_NAME``: one replica, a small supervisor over its serving process.

The serving process (``inferq.workers.worker``) is a Celery worker with the ``solo`` pool: a
request crosses one process. This parent takes no part in requests; it exists to notice at
once (``waitpid``) that the serving process died, whatever killed it (SIGKILL, the OOM
killer, a crash), and to put back what it held: at the head of the queue for another
replica, or, when the request had already killed a replica before, answered with a clear
error (see :meth:`inferq.registry.Queues.recover`). It forwards SIGTERM and SIGINT (a warm
shutdown: the current request finishes) and exits with the serving process's code. The
replica's id is this process's: ``<host>-<pid>``, as the scaler sees it.

It also renews the replica's liveness signal (``inferq.workers.liveness``), by which a
controller that is not its parent (Kubernetes) knows it runs; when that controller asks it to
reload after a redeploy, it stops its serving process warm and starts a new one, which loads
the deployed version under the same replica id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import redis

from inferq import keys
from inferq.errors import UnknownAPI
from inferq.processes import die_with_parent, spawn
from inferq.registry import EXIT_INIT_FAILED, Registry, ReplicaStatus, replica_id
from inferq.workers.liveness import Heartbeat

log = logging.getLogger("inferq.worker")


class _Serving:
    """The current serving process, and whether it stops for good or for a reload."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.stopping = False  # SIGTERM: the replica stops
        self.reloading = False  # the controller asked for the deployed version
        self._lock = threading.Lock()

    def stop(self, _signum: int = 0, _frame: object = None) -> None:
        self.stopping = True
        self._terminate()

    def reload(self) -> None:
        with self._lock:
            if self.stopping or self.reloading:
                return
            self.reloading = True
        self._terminate()

    def take_reload(self) -> bool:
        """Whether the process that just exited stopped for a reload (and not for good)."""
        with self._lock:
            wanted, self.reloading = self.reloading and not self.stopping, False
            return wanted

    def _terminate(self) -> None:
        child = self.child
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)  # Celery's warm shutdown


def supervise(api: str, broker_url: str, *, loglevel: str = "INFO",
              wait_for_deploy: bool = False) -> int:
    """Run one replica of ``api`` until it stops; return its exit code. With
    ``wait_for_deploy``, an API not deployed yet is waited for (a Kubernetes Deployment of
    replicas may be applied before ``inferq deploy``)."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(message)s")
    registry = Registry(broker_url, max_connections=3)
    registry.ping()
    if registry.deployments.api(api) is None:
        if not wait_for_deploy:
            raise UnknownAPI(f'no API named "{api}" is deployed (see `inferq get`)')
        _await_deploy(registry, api)
    replica = replica_id()
    serving = _Serving()

    def reload() -> None:  # on the heartbeat's thread
        log.info('api "%s": replica %s loads the deployed version', api, replica)
        with contextlib.suppress(redis.RedisError):  # no longer counted live meanwhile
            registry.replicas.update(api, replica, status=ReplicaStatus.STOPPING)
        serving.reload()

    signal.signal(signal.SIGTERM, serving.stop)
    # Ctrl-C reaches the serving process itself. A handler, not SIG_IGN: an ignored signal
    # would stay ignored in every serving process started after it.
    signal.signal(signal.SIGINT, _ignore)
    heartbeat = Heartbeat(registry, api, replica, on_reload=reload)
    heartbeat.start()
    try:
        while True:
            serving.child = spawn(
                [sys.executable, "-P", "-m", "inferq", "worker", api, "--serve", replica,
                 "--loglevel", loglevel],
                env={**os.environ, "INFERQ_BROKER_URL": broker_url},
                own_group=False,  # the scaler's SIGKILL of this group, or a terminal's Ctrl-C
            )
            if serving.stopping:  # SIGTERM came while it was being started
                serving.stop()
            code = _wait(serving.child)
            if not serving.take_reload():
                break
            if code != 0:  # stopped before Celery's loop took over SIGTERM: it held nothing
                _recover(registry, api, replica, code)
        if code != 0 and code != EXIT_INIT_FAILED:
            _recover(registry, api, replica, code)
        if code != EXIT_INIT_FAILED:  # a failed start keeps its record: it holds the traceback
            _forget(registry, api, replica)
    finally:
        heartbeat.stop()  # last: a record is never left without its signal before its end
    return code if code >= 0 else 128 - code


def _ignore(_signum: int, _frame: object) -> None:
    pass


def _wait(child: subprocess.Popen) -> int:
    while True:
        try:
            return child.wait()
        except InterruptedError:  # a forwarded signal; keep waiting for the warm shutdown
            continue


def _await_deploy(registry: Registry, api: str) -> None:
    """Wait until ``api`` is deployed (checked every second; SIGTERM ends the wait)."""
    log.info('api "%s" is not deployed yet: waiting for `inferq deploy`', api)
    while registry.deployments.api(api) is None:
        time.sleep(1.0)


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
