"""A replica's liveness signal, renewed by its supervisor while the replica runs.

Where Kubernetes runs the replicas, the controller is not their parent: it learns that a
replica died (SIGKILL, a lost node) when this signal lapses, and puts back what the replica
held (``inferq.registry.liveness``). The renewal also brings the controller's request to
reload the deployed version after a redeploy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import redis

from inferq.registry import Registry

log = logging.getLogger("inferq.worker")

RENEW_SECONDS = 2.0  # well inside the signal's time to live (keys.ALIVE_TTL_SECONDS)


class Heartbeat:
    """Renews ``replica``'s signal every :data:`RENEW_SECONDS` on a thread of its own;
    calls ``on_reload`` (on that thread) when the controller asks for a reload."""

    def __init__(self, registry: Registry, api: str, replica: str,
                 on_reload: Callable[[], None]) -> None:
        self.registry = registry
        self.api = api
        self.replica = replica
        self.on_reload = on_reload
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)
        self._failing = False

    def start(self) -> None:
        """Renew once now (before the serving process writes the replica's record, so no
        record is ever seen without its signal), then keep renewing."""
        self._renew()
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and remove the signal: the replica ended on purpose."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):  # else it lapses by itself
            self.registry.liveness.end(self.api, self.replica)

    def _run(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            self._renew()

    def _renew(self) -> None:
        try:
            wanted = self.registry.liveness.renew(self.api, self.replica)
        except redis.RedisError as exc:
            if not self._failing:  # once per outage, not every two seconds
                log.warning('api "%s": replica %s cannot renew its liveness signal (%s)',
                            self.api, self.replica, exc)
            self._failing = True
            return
        self._failing = False
        if wanted:
            self.on_reload()
