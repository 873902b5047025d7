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
``tracker:<api>``              hash: tracked predictions (``class:<label>`` counts, or
                               ``count``, ``sum``, ``min``, ``max`` of regression values)
``inflight:<api>``             hash: replica id -> id of the task it is predicting now
``usage:<api>``                hash: replica id -> JSON cpu (millicores) and rss (bytes)
``failure:<api>``              hash: host -> JSON last replica failure there (kind, message)
``logs:<api>``                 stream: the API's replica log lines (replica, line)
``hosts``                      hash: host name -> JSON capacity, use, heartbeat (Redis time)
``leader``                     the host whose scaler decides replica counts and placements
``plan``                       JSON: per API, replicas per host, and what cannot be placed
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

from inferq.configs import Api, Deployment
from inferq.errors import BrokerUnavailable, DeployError

PREFIX = "inferq:"
REPLY_TTL_SECONDS = 300  # a reply nobody collects is gone after this
RETIRED_BUNDLE_TTL_SECONDS = 24 * 3600  # replicas of an old version may still fetch it
LOG_LINES_KEPT = 10_000  # per API
# kombu's Redis transport's own keys (its defaults), for :meth:`Registry.requeue`:
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"


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

    def __init__(self, url: str, *, socket_timeout: float | None = 10.0,
                 max_connections: int = 256) -> None:
        self.url = url
        # A blocking pool: a thread past ``max_connections`` waits for a free connection
        # instead of failing with redis-py's "Too many connections".
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=socket_timeout or 30,
            socket_timeout=socket_timeout, socket_connect_timeout=5, health_check_interval=30,
        )
        self.redis = redis.Redis(connection_pool=pool)
        # Lua scripts, registered once (each call then sends only the script's hash).
        self._lead = self.redis.register_script(_LEAD_SCRIPT)
        self._resign = self.redis.register_script(_RESIGN_SCRIPT)
        self._end_request = self.redis.register_script(_END_REQUEST_SCRIPT)
        self._track_value = self.redis.register_script(_TRACK_VALUE_SCRIPT)

    # -- connection ---------------------------------------------------------------------------

    def ping(self) -> None:
        """Raise :class:`BrokerUnavailable` unless Redis answers."""
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"the broker at {_safe_url(self.url)} does not answer: {exc}")

    @property
    def safe_url(self) -> str:
        """The broker URL without its password, for logs and messages."""
        return _safe_url(self.url)

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

    def track_class(self, api: str, label: str) -> None:
        self.redis.hincrby(_key("tracker", api), f"class:{label}", 1)

    def track_value(self, api: str, value: float) -> None:
        self._track_value(keys=[_key("tracker", api)], args=[repr(value)])

    def tracker_stats(self, api: str) -> dict[str, Any]:
        """{"classes": {label: count}} or {"count", "min", "max", "mean"}; {} when empty."""
        raw = {k.decode(): v.decode() for k, v in self.redis.hgetall(_key("tracker", api)).items()}
        classes = {k[len("class:"):]: int(v) for k, v in raw.items() if k.startswith("class:")}
        if classes:
            return {"classes": dict(sorted(classes.items(), key=lambda kv: (-kv[1], kv[0])))}
        if "count" in raw:
            count = int(raw["count"])
            return {"count": count, "min": float(raw["min"]), "max": float(raw["max"]),
                    "mean": float(raw["sum"]) / count}
        return {}

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

    def apis_with_replicas(self) -> list[str]:
        """Names of the APIs that have replica records, deployed or not (a deleted API's
        replicas finish their requests before they go)."""
        prefix = _key("replicas", "")
        keys = self.redis.scan_iter(match=prefix + "*", count=1000)
        return sorted({k.decode()[len(prefix):] for k in keys})

    def set_status(self, api: str, status: str, **fields: Any) -> None:
        """Record the API's status (one of Cortex's) as the scaler judged it."""
        record = {"status": status, **fields, "updated_at": time.time()}
        self.redis.set(_key("status", api), json.dumps(record))

    def status(self, api: str) -> dict[str, Any] | None:
        raw = self.redis.get(_key("status", api))
        return json.loads(raw) if raw else None

    def start_request(self, api: str, replica: str, task_id: str) -> None:
        self.redis.hset(_key("inflight", api), replica, task_id)

    def end_request(self, api: str, replica: str, task_id: str | None = None) -> None:
        """Clear the replica's in-flight marker; with ``task_id``, only if it names that task
        (a replica that already took its next request keeps that request's marker)."""
        if task_id is None:
            self.redis.hdel(_key("inflight", api), replica)
        else:
            self._end_request(keys=[_key("inflight", api)], args=[replica, task_id])

    def in_flight(self, api: str) -> dict[str, str]:
        """Replica id -> the task it is predicting now."""
        raw = self.redis.hgetall(_key("inflight", api))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def set_usage(self, api: str, usage: dict[str, dict[str, float]]) -> None:
        """Record CPU and memory use of replicas (replica id -> {"cpu", "rss"})."""
        if usage:
            self.redis.hset(_key("usage", api), mapping={r: json.dumps(u) for r, u in usage.items()})

    def usage(self, api: str) -> dict[str, dict[str, float]]:
        raw = self.redis.hgetall(_key("usage", api))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def forget_replica(self, api: str, replica: str) -> None:
        """Remove every trace of a replica that is gone (record, usage, in-flight marker)."""
        pipe = self.redis.pipeline()
        for kind in ("replicas", "usage", "inflight"):
            pipe.hdel(_key(kind, api), replica)
        pipe.execute()

    def set_failure(self, api: str, host: str, kind: str, message: str) -> None:
        """Record that a replica of ``api`` on ``host`` failed (``kind``: "error", "oom" or
        "requirements", see ``scaler.status``)."""
        record = {"kind": kind, "message": message, "at": self.now(), "host": host}
        self.redis.hset(_key("failure", api), host, json.dumps(record))

    def clear_failure(self, api: str, host: str) -> None:
        self.redis.hdel(_key("failure", api), host)

    def failures(self, api: str) -> list[dict[str, Any]]:
        raw = self.redis.hgetall(_key("failure", api))
        return sorted((json.loads(v) for v in raw.values()), key=lambda f: f["at"])

    def forget_api(self, api: str) -> None:
        """Drop the runtime state of a deleted API (its stats and logs stay readable a while)."""
        pipe = self.redis.pipeline()
        for kind in ("replicas", "usage", "inflight", "failure", "status"):
            pipe.delete(_key(kind, api))
        pipe.execute()

    def fail_tasks(self, task_ids: set[str], error: str) -> int:
        """Answer taken tasks with ``error`` and drop them (their replica was killed for a
        reason that would kill the next one too, e.g. out of memory). Returns how many."""
        failed = 0
        for tag, payload, _routing_key in self._unacked(task_ids):
            if not self.redis.hdel(KOMBU_UNACKED, tag):
                continue  # acknowledged or restored meanwhile
            self.redis.zrem(KOMBU_UNACKED_INDEX, tag)
            reply_to = payload.get("properties", {}).get("reply_to")
            task_id = payload["headers"]["id"]
            if reply_to and reply_to.startswith(_key("reply", "")):
                self.push_reply(reply_to, {"id": task_id, "error": error, "at": time.time()})
            failed += 1
        return failed

    def _unacked(self, task_ids: set[str]) -> list[tuple[bytes, dict[str, Any], str]]:
        if not task_ids:
            return []
        found = []
        for tag, raw in self.redis.hgetall(KOMBU_UNACKED).items():
            payload, _exchange, routing_key = json.loads(raw)
            if payload.get("headers", {}).get("id") in task_ids:
                found.append((tag, payload, routing_key))
        return found

    def requeue(self, task_ids: set[str]) -> int:
        """Put tasks that a lost replica had taken back at the head of their queue.

        kombu's Redis transport keeps a taken message in its ``unacked`` hash until it is
        acknowledged, and by default restores it only after the hour-long visibility timeout
        (celery #5935); a replica that vanished with its host will never acknowledge it.
        Returns how many tasks were requeued.
        """
        requeued = 0
        for tag, payload, routing_key in self._unacked(task_ids):
            payload["headers"]["redelivered"] = True
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(KOMBU_UNACKED)
                    if not pipe.hexists(KOMBU_UNACKED, tag):
                        continue  # acknowledged or restored meanwhile
                    pipe.multi()
                    pipe.zrem(KOMBU_UNACKED_INDEX, tag)
                    pipe.hdel(KOMBU_UNACKED, tag)
                    # kombu consumes from the right end (BRPOP): RPUSH serves it next.
                    pipe.rpush(routing_key, json.dumps(payload))
                    pipe.execute()
                    requeued += 1
                except redis.WatchError:
                    continue
        return requeued

    # -- logs ---------------------------------------------------------------------------------

    def add_logs(self, api: str, lines: list[tuple[str, str]]) -> None:
        """Append (replica, line) pairs to the API's log stream (the newest 10000 are kept)."""
        pipe = self.redis.pipeline(transaction=False)
        for replica, line in lines:
            pipe.xadd(_key("logs", api), {"replica": replica, "line": line},
                      maxlen=LOG_LINES_KEPT, approximate=True)
        pipe.execute()

    def read_logs(self, api: str, after: str = "0", block: float | None = None,
                  count: int = 1000) -> list[tuple[str, str, str]]:
        """Log entries after id ``after`` as (id, replica, line); wait up to ``block`` seconds."""
        block_ms = None if block is None else int(block * 1000)
        raw = self.redis.xread({_key("logs", api): after}, count=count, block=block_ms)
        entries = []
        for _, items in raw or []:
            for entry_id, fields in items:
                entries.append(
                    (entry_id.decode(), fields[b"replica"].decode(), fields[b"line"].decode())
                )
        return entries

    def last_logs(self, api: str, count: int) -> list[tuple[str, str, str]]:
        """The newest ``count`` log entries, oldest first, as (id, replica, line)."""
        if count <= 0:
            return []
        raw = self.redis.xrevrange(_key("logs", api), count=count)
        return [
            (i.decode(), f[b"replica"].decode(), f[b"line"].decode()) for i, f in reversed(raw)
        ]

    # -- hosts, leadership and the plan -------------------------------------------------------

    def now(self) -> float:
        """Redis's clock: one clock for every host's heartbeats and failures."""
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def heartbeat(self, host: str, info: dict[str, Any]) -> None:
        self.redis.hset(_key("hosts"), host, json.dumps({**info, "host": host, "heartbeat": self.now()}))

    def hosts(self) -> dict[str, dict[str, Any]]:
        raw = self.redis.hgetall(_key("hosts"))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def remove_host(self, host: str) -> None:
        self.redis.hdel(_key("hosts"), host)

    def lead(self, host: str, ttl: float) -> bool:
        """Take or keep the scalers' leadership for ``ttl`` seconds; True if ``host`` leads."""
        return bool(self._lead(keys=[_key("leader")], args=[host, int(ttl * 1000)]))

    def resign(self, host: str) -> None:
        self._resign(keys=[_key("leader")], args=[host])

    def leader(self) -> str | None:
        raw = self.redis.get(_key("leader"))
        return raw.decode() if raw else None

    def set_plan(self, plan: dict[str, Any]) -> None:
        self.redis.set(_key("plan"), json.dumps(plan, sort_keys=True))

    def plan(self) -> dict[str, Any]:
        raw = self.redis.get(_key("plan"))
        return json.loads(raw) if raw else {}

    # -- replies ------------------------------------------------------------------------------

    @staticmethod
    def reply_key(client_id: str) -> str:
        """The list a client collects its replies from (a Celery ``reply_to``)."""
        return _key("reply", client_id)

    @staticmethod
    def is_reply_key(name: str) -> bool:
        """Whether ``name`` is an inferq client's reply list (Celery sets a ``reply_to`` of its
        own on every message, which plain Celery callers never read)."""
        return name.startswith(_key("reply", ""))

    def push_reply(self, reply_to: str, reply: dict[str, Any]) -> None:
        """Hand a reply to the client waiting on ``reply_to``."""
        if not self.is_reply_key(reply_to):
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
        try:
            rest, _ = pipe.execute()
        except redis.RedisError:
            return replies  # the popped one must not be lost; the rest wait for the next call
        replies.extend(json.loads(r) for r in rest)
        return replies


_LEAD_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_TRACK_VALUE_SCRIPT = """
local value = tonumber(ARGV[1])
redis.call('HINCRBY', KEYS[1], 'count', 1)
redis.call('HINCRBYFLOAT', KEYS[1], 'sum', ARGV[1])
local low = redis.call('HGET', KEYS[1], 'min')
if low == false or value < tonumber(low) then redis.call('HSET', KEYS[1], 'min', ARGV[1]) end
local high = redis.call('HGET', KEYS[1], 'max')
if high == false or value > tonumber(high) then redis.call('HSET', KEYS[1], 'max', ARGV[1]) end
return 1
"""

_RESIGN_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_END_REQUEST_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


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
