"""The stream consumers a host runs, each a ``python -m inferq.streams.consumer`` child.

Every scaler looks at each tick for deployed APIs with a ``stream`` whose consumer runs
nowhere, and takes its lease (:meth:`~.records.Streams.claim`): a stream is consumed by one
process at a time, on any host. A consumer that exits (its API deleted or changed, killed, the
broker away) gives its lease back and is started again at the next tick if its API still
wants one; a host that vanishes leaves a lease that lapses, and another host's scaler starts
the consumer there, which claims what the dead one had pending.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass

from inferq.processes import spawn, stop
from inferq.registry import DeployedApi, Registry
from inferq.streams.records import Streams

log = logging.getLogger("inferq.scaler")  # it runs in the scaler


@dataclass
class _Consuming:
    process: subprocess.Popen
    token: str


class StreamRunner:
    """Starts and reaps this host's stream consumers."""

    def __init__(self, registry: Registry, broker_url: str) -> None:
        self.streams = Streams(registry)
        self.broker_url = broker_url
        self.consuming: dict[str, _Consuming] = {}

    def tick(self, deployed: dict[str, DeployedApi]) -> None:
        for name, consuming in list(self.consuming.items()):
            code = consuming.process.poll()
            if code is None:
                continue
            del self.consuming[name]
            self.streams.release(name, consuming.token)
            if code != 0:
                log.warning('api "%s": its stream consumer (pid %d) exited with %d; it starts '
                            "again", name, consuming.process.pid, code)
        for name, api in sorted(deployed.items()):
            stream = api.api.stream
            if stream is None or name in self.consuming:
                continue
            token = uuid.uuid4().hex
            if self.streams.claim(name, token):
                log.info('api "%s": consuming its stream %s from here', name, stream.source)
                self.consuming[name] = _Consuming(self._start(name, token), token)

    def pids(self) -> dict[str, int]:
        """The running consumers' process ids by API."""
        return {api: c.process.pid for api, c in self.consuming.items()}

    def shutdown(self) -> None:
        """Stop the consumers (each answers what it has in flight first); another host takes
        their streams over."""
        for consuming in self.consuming.values():
            consuming.process.terminate()
        for api, consuming in self.consuming.items():
            stop(consuming.process, timeout=15)
            self.streams.release(api, consuming.token)
        self.consuming.clear()

    def _start(self, api: str, token: str) -> subprocess.Popen:
        env = {**os.environ, "INFERQ_BROKER_URL": self.broker_url, "PYTHONUNBUFFERED": "1"}
        return spawn([sys.executable, "-P", "-m", "inferq.streams.consumer", api, token],
                     env=env)
