"""The registry: inferq's state in Redis, one class per concept over one shared connection.

==============================  ==========================================================
``registry.deployments``        what is deployed: deployments, APIs and their versions,
                                bundles (:mod:`~inferq.registry.deployments`)
``registry.queues``             admission to the API queues, replies, async states, what
                                replicas hold and its recovery (:mod:`~inferq.registry.queues`)
``registry.replicas``           replica records, API statuses, usage, failures
                                (:mod:`~inferq.registry.replicas`)
``registry.telemetry``          request statistics, the tracker, replica logs
                                (:mod:`~inferq.registry.telemetry`)
``registry.hosts``              heartbeats and capacity, the leader, the plan
                                (:mod:`~inferq.registry.hosts`)
``registry.liveness``           replicas' liveness signals and reload requests, for a
                                controller that does not start them
                                (:mod:`~inferq.registry.liveness`)
==============================  ==========================================================

Batch jobs keep their records in :mod:`inferq.jobs`, over the same connection. Every key is
spelled in :mod:`inferq.keys`, with its type and lifetime.
"""

from __future__ import annotations

from typing import Any

from inferq.registry.deployments import (
    ApiChange,
    DeployedApi,
    DeploymentRecord,
    Deployments,
    DeployResult,
    api_version,
)
from inferq.registry.hosts import Capacity, HostRecord, Hosts, Plan
from inferq.registry.liveness import Liveness
from inferq.registry.queues import Admission, AsyncState, Queues
from inferq.registry.replicas import (
    EXIT_INIT_FAILED,
    ApiState,
    ApiStatus,
    Failure,
    FailureKind,
    ReplicaRecord,
    Replicas,
    ReplicaStatus,
    Serving,
    Usage,
    replica_id,
)
from inferq.registry.store import Store
from inferq.registry.telemetry import LogLine, RequestStats, Telemetry, TrackerStats

__all__ = [
    "EXIT_INIT_FAILED",
    "Admission",
    "ApiChange",
    "ApiState",
    "ApiStatus",
    "AsyncState",
    "Capacity",
    "DeployResult",
    "DeployedApi",
    "DeploymentRecord",
    "Deployments",
    "Failure",
    "FailureKind",
    "HostRecord",
    "Hosts",
    "Liveness",
    "LogLine",
    "Plan",
    "Queues",
    "Registry",
    "ReplicaRecord",
    "ReplicaStatus",
    "Replicas",
    "RequestStats",
    "Serving",
    "Store",
    "Telemetry",
    "TrackerStats",
    "Usage",
    "api_version",
    "replica_id",
]


class Registry:
    """inferq's state in a Redis (usually the broker's): one connection pool, shared by one
    object per concept.

    Parameters
    ----------
    url:
        A Redis URL (``redis://:password@host:port/db``).
    socket_timeout:
        Seconds a command may take (None: no limit).
    max_connections:
        Connections open at most (one per thread talking to Redis at once).
    """

    def __init__(self, url: str, *, socket_timeout: float | None = 10.0,
                 max_connections: int = 256) -> None:
        self.store = Store(url, socket_timeout=socket_timeout, max_connections=max_connections)
        self.deployments = Deployments(self.store)
        self.queues = Queues(self.store)
        self.replicas = Replicas(self.store)
        self.telemetry = Telemetry(self.store)
        self.hosts = Hosts(self.store)
        self.liveness = Liveness(self.store)

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def redis(self) -> Any:
        """The connection (typed Any: see :class:`~inferq.registry.store.Store`)."""
        return self.store.redis

    @property
    def safe_url(self) -> str:
        """The broker URL without its password, for logs and messages."""
        return self.store.safe_url

    def ping(self) -> None:
        """Raise :class:`~inferq.errors.BrokerUnavailable` unless Redis answers."""
        self.store.ping()

    def close(self) -> None:
        self.store.close()
