"""The number KEDA scales each API on, over HTTP (``inferq controller --port``).

KEDA's ``metrics-api`` trigger reads ``GET /scaling/<api>`` and scales the API's Deployment
to ``value`` replicas (its ``targetValue`` is 1: one request at a time per replica):

    {"api": "classifier", "deployed": true, "value": 3, "queued": 2, "in_flight": 1, "live": 1}

``value`` is queued + in-flight samples, the measure the scaler itself acts on
(``Scaler._load``). The queue's length alone would read 0 while every request runs, since a
replica moves the message it predicts out of the queue (keda #7770, #1663), and KEDA would
scale busy replicas away. An API that is not deployed (yet, or any more) reads 0. When the
broker does not answer, the endpoint answers 503 and KEDA leaves the replicas as they are.

``GET /scaling`` lists every deployed API; ``GET /healthz`` is 200 while the controller's
loop turns (a broker outage does not stop it: it waits for the broker).
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import redis

from inferq.errors import BrokerUnavailable, InferqError
from inferq.registry import DeployedApi, Registry, ReplicaRecord
from inferq.scaler.decide import Load

log = logging.getLogger("inferq.controller")

STALL_SECONDS = 30.0  # a loop that has not turned for this long is unhealthy


class ScalingEndpoint:
    """The HTTP server, on a thread of its own, until :meth:`close`.

    Parameters
    ----------
    registry:
        Where the queues and replicas are.
    load:
        The scaler's measure of an API's load, from its replica records.
    ticked_at:
        When the controller's loop last turned (``time.monotonic()``).
    """

    def __init__(self, registry: Registry, load: Callable[[DeployedApi, list[ReplicaRecord]], Load],
                 ticked_at: Callable[[], float], *, host: str = "127.0.0.1",
                 port: int = 8080) -> None:
        self.registry = registry
        self.load = load
        self.ticked_at = ticked_at
        handler = type("Handler", (_Handler,), {"endpoint": self})
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise InferqError(f"cannot listen on {host}:{port}: another program listens "
                                  "there; choose another port with --port") from None
            raise
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="endpoint",
                                        daemon=True)

    def start(self) -> ScalingEndpoint:
        self._thread.start()
        log.info("scaling endpoint on http://%s:%d/scaling/<api>",
                 self.server.server_address[0], self.port)
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def scaling(self, api: str) -> dict[str, Any]:
        """What KEDA reads for ``api``."""
        deployed = self.registry.deployments.api(api)
        if deployed is None:
            return {"api": api, "deployed": False, "value": 0, "queued": 0, "in_flight": 0,
                    "live": 0}
        load = self.load(deployed, self.registry.replicas.of(api))
        return {"api": api, "deployed": True, "value": load.queued + load.in_flight,
                "queued": load.queued, "in_flight": load.in_flight, "live": load.live}

    def all(self) -> dict[str, Any]:
        return {"apis": [self.scaling(a.name) for a in self.registry.deployments.apis()]}

    def healthy(self) -> bool:
        return time.monotonic() - self.ticked_at() < STALL_SECONDS


class _Handler(BaseHTTPRequestHandler):
    endpoint: ScalingEndpoint
    server_version = "inferq-controller"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/healthz":
            ok = self.endpoint.healthy()
            self._answer(200 if ok else 503, {"status": "ok" if ok else "stalled"})
            return
        try:
            if path == "/scaling":
                self._answer(200, self.endpoint.all())
            elif path.startswith("/scaling/") and path.count("/") == 2:
                self._answer(200, self.endpoint.scaling(unquote(path[len("/scaling/"):])))
            else:
                self._answer(404, {"error": f"no such path: {path or '/'} (GET /scaling/<api>, "
                                   "/scaling or /healthz)"})
        except (redis.RedisError, BrokerUnavailable) as exc:
            self._answer(503, {"error": f"the broker does not answer: {exc}"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)
