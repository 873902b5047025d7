"""The registry: what is deployed, where its bundle is, and how its replicas are doing.

Every Redis key inferq uses is spelled in this module and nowhere else. The gateway, the
scaler, the replicas and the CLI all read deployed APIs and statuses through :class:`Registry`.

Keys (all under ``inferq:``):

=============================  ==============================================================
``deployments``                set of deployment names
``deployment:<name>``          JSON: name, version, bundle hash, API names, updated_at
``apis``                       hash: API name -> JSON record (spec, version, bundle, ...)
``bundle:<sha256>``            the project bundle (gzipped tar), addressed by content hash
``replicas:<api>``             hash: replica id -> JSON record (status, host, pid, ...)
``status:<api>``               JSON: the API's status as the scaler last judged it
``reply:<client id>``          list: replies for one client (gateway or Python client)
``stats:<api>``                hash: request counts by status class, latency sum
``changes``                    counter bumped by every deploy and delete (cheap change check)
``lock:deploy``                lock serialising deploys and deletes
=============================  ==============================================================
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from configs import Api, Deployment
from inferq.errors import BrokerUnavailable, DeployError

PREFIX = "inferq:"
REPLY_TTL_SECONDS = 300  # a reply nobody collects is gone after this
RETIRED_BUNDLE_TTL_SECONDS = 24 * 3600  # replicas of an old version may still fetch it


@dataclass(frozen=True)
class DeployedApi:
    """An API as deployed: its spec, its version and the bundle its replicas run."""

    api: Api
    version: str
    bundle: str
    updated_at: float

    @property
    def name(self) -> str:
        return self.api.name

    def to_json(self) -> str:
        return json.dumps(
            {
                "spec": self.api.to_dict(),
                "version": self.version,
                "bundle": self.bundle,
                "updated_at": self.updated_at,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> DeployedApi:
        data = json.loads(raw)
        return cls(
            api=Api.from_dict(data["spec"]),
            version=data["version"],
            bundle=data["bundle"],
            updated_at=data["updated_at"],
        )


@dataclass(frozen=True)
class DeployResult:
    """What a deploy changed: per API, "created", "updated" or "unchanged"; removed APIs."""

    deployment: str
    changes: dict[str, str]
    removed: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.removed) or any(c != "unchanged" for c in self.changes.values())


def api_version(api: Api, bundle: str) -> str:
    """A version that changes whenever the API's spec or any file of its project changes."""
    payload = json.dumps({"spec": api.to_dict(), "bundle": bundle}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


class Registry:
    """Typed access to inferq's state in Redis.

    Parameters
    ----------
    url:
        A Redis URL (``redis://host:port/db``), usually the broker's.
    """

    def __init__(self, url: str, *, socket_timeout: float | None = 10.0) -> None:
        self.url = url
        self.redis = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=5, health_check_interval=30
        )

    # -- connection ---------------------------------------------------------------------------

    def ping(self) -> None:
        """Raise :class:`BrokerUnavailable` unless Redis answers."""
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"the broker at {_safe_url(self.url)} does not answer: {exc}")

    def close(self) -> None:
        self.redis.close()

    # -- bundles ------------------------------------------------------------------------------

    def put_bundle(self, digest: str, data: bytes) -> None:
        """Store a bundle under its content hash (a no-op when it is already there)."""
        key = _key("bundle", digest)
        self.redis.set(key, data, nx=True)
        self.redis.persist(key)

    def get_bundle(self, digest: str) -> bytes | None:
        return self.redis.get(_key("bundle", digest))

    # -- deployments --------------------------------------------------------------------------

    def deploy(self, deployment: Deployment, bundle: str) -> DeployResult:
        """Record ``deployment`` (whose bundle is already stored) and say what changed.

        An unchanged API keeps its version and ``updated_at``. API names and endpoints are
        unique across deployments: taking one that another deployment owns is refused, and
        nothing is written.
        """
        with self.redis.lock(_key("lock", "deploy"), timeout=30, blocking_timeout=30):
            current = {a.name: a for a in self.apis()}
            _check_ownership(deployment, current.values())
            now = time.time()
            changes: dict[str, str] = {}
            records: dict[str, str] = {}
            for api in deployment.apis:
                version = api_version(api, bundle)
                old = current.get(api.name)
                if old is not None and old.version == version:
                    changes[api.name] = "unchanged"
                    continue
                changes[api.name] = "created" if old is None else "updated"
                records[api.name] = DeployedApi(api, version, bundle, now).to_json()
            previous = self.deployment(deployment.name)
            removed = tuple(
                sorted(set(previous["apis"]) - set(changes)) if previous else ()
            )
            if not records and not removed:
                return DeployResult(deployment.name, changes, removed)
            pipe = self.redis.pipeline()
            if records:
                pipe.hset(_key("apis"), mapping=records)
            if removed:
                pipe.hdel(_key("apis"), *removed)
            pipe.sadd(_key("deployments"), deployment.name)
            pipe.set(
                _key("deployment", deployment.name),
                json.dumps(
                    {
                        "name": deployment.name,
                        "bundle": bundle,
                        "apis": [a.name for a in deployment.apis],
                        "updated_at": now,
                    }
                ),
            )
            pipe.incr(_key("changes"))
            pipe.execute()
            if previous and previous["bundle"] != bundle:
                self._retire_bundle(previous["bundle"])
            return DeployResult(deployment.name, changes, removed)

    def delete(self, name: str) -> list[str]:
        """Remove a deployment and its APIs; return the removed API names."""
        with self.redis.lock(_key("lock", "deploy"), timeout=30, blocking_timeout=30):
            previous = self.deployment(name)
            if previous is None:
                raise DeployError(f'no deployment named "{name}" is deployed')
            pipe = self.redis.pipeline()
            if previous["apis"]:
                pipe.hdel(_key("apis"), *previous["apis"])
            pipe.srem(_key("deployments"), name)
            pipe.delete(_key("deployment", name))
            pipe.incr(_key("changes"))
            pipe.execute()
            self._retire_bundle(previous["bundle"])
            return list(previous["apis"])

    def deployment(self, name: str) -> dict[str, Any] | None:
        raw = self.redis.get(_key("deployment", name))
        return json.loads(raw) if raw else None

    def deployments(self) -> list[str]:
        return sorted(n.decode() for n in self.redis.smembers(_key("deployments")))

    def apis(self) -> list[DeployedApi]:
        """Every deployed API, by name."""
        raw = self.redis.hgetall(_key("apis"))
        return sorted((DeployedApi.from_json(v) for v in raw.values()), key=lambda a: a.name)

    def api(self, name: str) -> DeployedApi | None:
        raw = self.redis.hget(_key("apis"), name)
        return DeployedApi.from_json(raw) if raw else None

    def changes(self) -> int:
        """A number that grows with every deploy and delete (for cheap change detection)."""
        return int(self.redis.get(_key("changes")) or 0)

    def changes_and_queue_length(self, queue: str | None) -> tuple[int, int]:
        """:meth:`changes` and the number of messages waiting in Celery queue ``queue``
        (kombu's Redis transport keeps a queue as a list named after it), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(_key("changes"))
        if queue is not None:
            pipe.llen(queue)
        results = pipe.execute()
        return int(results[0] or 0), int(results[1]) if queue is not None else 0

    def queue_length(self, queue: str) -> int:
        return int(self.redis.llen(queue))

    # -- request statistics -------------------------------------------------------------------

    def add_request_stats(self, stats: dict[str, dict[str, float]]) -> None:
        """Add per-API counters (``2xx``, ``4xx``, ``5xx``, ``count``, ``latency_sum``)."""
        pipe = self.redis.pipeline()
        for api, values in stats.items():
            for field, value in values.items():
                pipe.hincrbyfloat(_key("stats", api), field, value)
        pipe.execute()

    def request_stats(self, api: str) -> dict[str, float]:
        raw = self.redis.hgetall(_key("stats", api))
        return {k.decode(): float(v) for k, v in raw.items()}

    def _retire_bundle(self, digest: str) -> None:
        # Keep a replaced bundle a while: replicas of the old version may still start from it.
        in_use = {a.bundle for a in self.apis()}
        if digest not in in_use:
            self.redis.expire(_key("bundle", digest), RETIRED_BUNDLE_TTL_SECONDS)

    # -- replicas and statuses ----------------------------------------------------------------

    def set_replica(self, api: str, replica: str, **fields: Any) -> None:
        """Create or update one replica's record (``status``, ``host``, ``pid``, ``error``...)."""
        key = _key("replicas", api)
        raw = self.redis.hget(key, replica)
        record = json.loads(raw) if raw else {"id": replica}
        record.update(fields, updated_at=time.time())
        self.redis.hset(key, replica, json.dumps(record))

    def remove_replica(self, api: str, replica: str) -> None:
        self.redis.hdel(_key("replicas", api), replica)

    def replicas(self, api: str) -> list[dict[str, Any]]:
        raw = self.redis.hgetall(_key("replicas", api))
        return sorted((json.loads(v) for v in raw.values()), key=lambda r: r["id"])

    def set_status(self, api: str, status: str, **fields: Any) -> None:
        """Record the API's status (one of Cortex's) as the scaler judged it."""
        record = {"status": status, **fields, "updated_at": time.time()}
        self.redis.set(_key("status", api), json.dumps(record))

    def status(self, api: str) -> dict[str, Any] | None:
        raw = self.redis.get(_key("status", api))
        return json.loads(raw) if raw else None

    # -- replies ------------------------------------------------------------------------------

    @staticmethod
    def reply_key(client_id: str) -> str:
        """The list a client collects its replies from (a Celery ``reply_to``)."""
        return _key("reply", client_id)

    def push_reply(self, reply_to: str, reply: dict[str, Any]) -> None:
        """Hand a reply to the client waiting on ``reply_to``."""
        if not reply_to.startswith(_key("reply", "")):
            raise ValueError(f"not an inferq reply list: {reply_to!r}")
        pipe = self.redis.pipeline()
        pipe.rpush(reply_to, json.dumps(reply))
        pipe.expire(reply_to, REPLY_TTL_SECONDS)
        pipe.execute()

    def pop_replies(self, reply_to: str, timeout: float) -> list[dict[str, Any]]:
        """Wait up to ``timeout`` seconds for replies; return every reply available."""
        first = self.redis.blpop([reply_to], timeout=timeout)
        if first is None:
            return []
        replies = [json.loads(first[1])]
        pipe = self.redis.pipeline()
        pipe.lrange(reply_to, 0, -1)
        pipe.delete(reply_to)
        rest, _ = pipe.execute()
        replies.extend(json.loads(r) for r in rest)
        return replies


def _check_ownership(deployment: Deployment, current: Any) -> None:
    problems = []
    for deployed in current:
        if deployed.api.deployment == deployment.name:
            continue
        for api in deployment.apis:
            if api.name == deployed.name:
                problems.append(
                    f'api "{api.name}": the name is taken by deployment '
                    f'"{deployed.api.deployment}" (API names are unique across deployments)'
                )
            elif api.endpoint == deployed.api.endpoint:
                problems.append(
                    f'api "{api.name}": endpoint {api.endpoint} is taken by api '
                    f'"{deployed.name}" of deployment "{deployed.api.deployment}"'
                )
    if problems:
        raise DeployError("\n".join(problems))


def _key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
