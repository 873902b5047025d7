"""Replicas and statuses: each replica's record, each API's status as the leading scaler
judged it, the replicas' resource use, and the failures that explain an ``error`` status."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from inferq import keys, stack
from inferq.registry.store import Store, known_fields

ERROR_CHARS = 10_000  # a replica's error (a traceback) as kept: its start and its end
EXIT_INIT_FAILED = 3  # a replica's exit code when its predictor cannot start (its record says why)


def replica_id(pid: int | None = None, host: str | None = None) -> str:
    """A replica's id: its host and the PID of its supervisor (``inferq worker``)."""
    return f"{host or stack.host_name()}-{pid or os.getpid()}"


class ReplicaStatus(StrEnum):
    PENDING = "pending"  # started by a scaler, not yet bootstrapping
    CREATING = "creating"  # installing requirements, fetching the model, in init()
    LIVE = "live"
    ERROR = "error"  # its predictor could not start (the record holds why)
    STOPPING = "stopping"  # warm shutdown: finishing its request


class ApiStatus(StrEnum):
    """An API's status, as Cortex names them (see ``inferq.scaler.status`` for when)."""

    LIVE = "live"
    PENDING = "pending"
    CREATING = "creating"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"
    ERROR_OOM = "error (out of memory)"
    ERROR_REQUIREMENTS = "error (requirements)"
    COMPUTE_UNAVAILABLE = "compute unavailable"


class FailureKind(StrEnum):
    """Why a replica failed, and the API status it leads to."""

    ERROR = "error"
    OOM = "oom"
    REQUIREMENTS = "requirements"

    @property
    def status(self) -> ApiStatus:
        return {FailureKind.ERROR: ApiStatus.ERROR, FailureKind.OOM: ApiStatus.ERROR_OOM,
                FailureKind.REQUIREMENTS: ApiStatus.ERROR_REQUIREMENTS}[self]


@dataclass(frozen=True)
class ReplicaRecord:
    """One replica as the registry knows it."""

    id: str
    status: ReplicaStatus = ReplicaStatus.PENDING
    host: str = ""
    pid: int | None = None  # the serving process (the one that predicts)
    replica_pid: int | None = None  # its supervisor: the replica itself
    version: str = ""  # of the API it serves
    gpus: tuple[int, ...] = ()
    error: str | None = None  # why it could not start (a traceback)
    failure: FailureKind | None = None
    detail: str | None = None  # what it is doing while creating ("installing requirements")
    live_at: float | None = None
    updated_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ReplicaRecord:
        data = known_fields(cls, json.loads(raw))
        data["status"] = ReplicaStatus(data.get("status", ReplicaStatus.PENDING))
        data["gpus"] = tuple(data.get("gpus") or ())
        if data.get("failure"):
            data["failure"] = FailureKind(data["failure"])
        return cls(**data)


@dataclass(frozen=True)
class ApiState:
    """An API's status as the leading scaler judged it."""

    status: ApiStatus
    reason: str | None = None
    requested: int = 0  # replicas wanted
    hosts: dict[str, int] = field(default_factory=dict)  # replicas placed per host
    updated_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ApiState:
        data = known_fields(cls, json.loads(raw))
        return cls(**{**data, "status": ApiStatus(data["status"])})


@dataclass(frozen=True)
class Failure:
    """The last replica failure of an API on one host."""

    kind: FailureKind
    message: str
    at: float  # Redis's clock
    host: str
    version: str = ""  # of the API the replica ran ("": recorded before versions were)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Failure:
        data = known_fields(cls, json.loads(raw))
        return cls(**{**data, "kind": FailureKind(data["kind"])})


@dataclass(frozen=True)
class Usage:
    """What a replica's process tree used when last sampled."""

    cpu: float | None = None  # millicores
    rss: int | None = None  # bytes
    gpu: float | None = None  # percent utilisation of its GPUs (NVML)


_BROKEN = (ApiStatus.ERROR, ApiStatus.ERROR_OOM, ApiStatus.ERROR_REQUIREMENTS)


@dataclass(frozen=True)
class Serving:
    """Whether an API can serve a request now (:meth:`Replicas.serving`)."""

    live: int  # replicas live now, of any version
    replicas: int  # replicas of any status (starting ones too)
    leader: bool  # a scaler leads: replicas start when they are wanted
    state: ApiState | None  # as the leader last judged it
    failures: list[Failure]  # oldest first

    def unavailable(self, version: str) -> tuple[ApiStatus | None, str] | None:
        """(status, reason) when no replica is live and none is coming for the API's
        ``version``: its status is an error of that version or ``compute unavailable``, or no
        scaler runs and no replica is there at all. None while it serves, starts, or scales
        from zero (a request waits for it then)."""
        if self.live:
            return None
        if not self.leader:
            if self.replicas:
                return None  # started by hand, and starting
            return None, ("no replica runs and no scaler runs to start one (start one with "
                          "`inferq scaler`, or run `inferq up`)")
        state = self.state
        if state is None:
            return None
        if state.status == ApiStatus.COMPUTE_UNAVAILABLE:
            return state.status, state.reason or ""
        if state.status in _BROKEN:
            latest = self.failures[-1] if self.failures else None
            if latest is None or latest.version in ("", version):  # not a new version's start
                return state.status, state.reason or ""
        return None


class Replicas:
    """Replica records, API statuses, usage and failures."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis = store.redis

    # -- replica records ----------------------------------------------------------------------

    def update(self, api: str, replica: str, **changes: Any) -> ReplicaRecord:
        """Create or update one replica's record with ``changes`` (fields of
        :class:`ReplicaRecord`); return the record as written."""
        key = keys.replicas(api)
        raw = self.redis.hget(key, replica)
        record = ReplicaRecord.from_json(raw) if raw else ReplicaRecord(replica)
        if changes.get("error"):  # read by every scaler several times a second
            changes["error"] = cut_error(changes["error"])
        if "gpus" in changes:
            changes["gpus"] = tuple(changes["gpus"])
        record = replace(record, **changes, updated_at=time.time())
        self.redis.hset(key, replica, record.to_json())
        return record

    def of(self, api: str) -> list[ReplicaRecord]:
        """The API's replicas, by id."""
        raw = self.redis.hgetall(keys.replicas(api))
        return sorted((ReplicaRecord.from_json(v) for v in raw.values()), key=lambda r: r.id)

    def remove(self, api: str, replica: str) -> None:
        self.redis.hdel(keys.replicas(api), replica)

    def apis_with_replicas(self) -> list[str]:
        """Names of the APIs that have replica records, deployed or not (a deleted API's
        replicas finish their requests before they go)."""
        prefix = keys.replicas_prefix()
        found = self.redis.scan_iter(match=prefix + "*", count=1000)
        return sorted({k.decode()[len(prefix):] for k in found})

    def forget(self, api: str, replica: str) -> None:
        """Remove the record and usage of a replica that is gone (after its recovery)."""
        pipe = self.store.pipeline(transaction=True)
        pipe.hdel(keys.replicas(api), replica)
        pipe.hdel(keys.usage(api), replica)
        pipe.execute()

    def forget_api(self, api: str) -> None:
        """Drop the runtime state of a deleted API (its stats and logs stay readable a while)."""
        pipe = self.store.pipeline(transaction=True)
        for key in (keys.replicas(api), keys.usage(api), keys.failure(api), keys.status(api)):
            pipe.delete(key)
        pipe.execute()

    # -- statuses -----------------------------------------------------------------------------

    def set_status(self, api: str, status: ApiStatus, *, reason: str | None = None,
                   requested: int = 0, hosts: dict[str, int] | None = None) -> None:
        """Record the API's status as the scaler judged it."""
        state = ApiState(status, reason, requested, dict(hosts or {}), time.time())
        self.redis.set(keys.status(api), state.to_json())

    def status(self, api: str) -> ApiState | None:
        raw = self.redis.get(keys.status(api))
        return ApiState.from_json(raw) if raw else None

    # -- usage and failures -------------------------------------------------------------------

    def set_usage(self, api: str, usage: dict[str, Usage]) -> None:
        """Record CPU and memory use of replicas (replica id -> :class:`Usage`)."""
        if usage:
            self.redis.hset(keys.usage(api),
                            mapping={r: json.dumps(asdict(u)) for r, u in usage.items()})

    def usage(self, api: str) -> dict[str, Usage]:
        raw = self.redis.hgetall(keys.usage(api))
        return {k.decode(): Usage(**known_fields(Usage, json.loads(v))) for k, v in raw.items()}

    def set_failure(self, api: str, host: str, kind: FailureKind, message: str, *,
                    version: str = "") -> None:
        """Record that a replica of ``api`` (of ``version``) on ``host`` failed."""
        record = {"kind": kind, "message": cut_error(message), "at": self.store.now(),
                  "host": host, "version": version}
        self.redis.hset(keys.failure(api), host, json.dumps(record))

    def clear_failure(self, api: str, host: str) -> None:
        self.redis.hdel(keys.failure(api), host)

    def failures(self, api: str) -> list[Failure]:
        """The API's failures, oldest first."""
        raw = self.redis.hgetall(keys.failure(api))
        return sorted((Failure.from_json(v) for v in raw.values()), key=lambda f: f.at)

    def serving(self, api: str) -> Serving:
        """What a sender needs to know before it waits for ``api``'s answer, in one round
        trip."""
        pipe = self.store.pipeline(transaction=False)
        pipe.exists(keys.leader())
        pipe.get(keys.status(api))
        pipe.hvals(keys.replicas(api))
        pipe.hvals(keys.failure(api))
        leader, state, raw, failures = pipe.execute()
        records = [ReplicaRecord.from_json(r) for r in raw]
        return Serving(
            live=sum(1 for r in records if r.status == ReplicaStatus.LIVE),
            replicas=len(records),
            leader=bool(leader),
            state=ApiState.from_json(state) if state else None,
            failures=sorted((Failure.from_json(f) for f in failures), key=lambda f: f.at),
        )


def cut_error(text: str) -> str:
    """``text``, or its start and end when over :data:`ERROR_CHARS` (a traceback's end says
    what was raised)."""
    if len(text) <= ERROR_CHARS:
        return text
    head, tail = ERROR_CHARS // 5, ERROR_CHARS - ERROR_CHARS // 5
    return f"{text[:head]}\n… ({len(text) - head - tail:,} characters left out) …\n{text[-tail:]}"
