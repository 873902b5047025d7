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
``tracker:<api>``              hash: tracked predictions (``class:<label>`` counts and
                               ``other``, or ``count``, ``sum``, ``min``, ``max`` of
                               regression values)
``extra:<queue>``              samples queued beyond one per message (batch messages), so the
                               queue's sample count is LLEN + this
``sent:<id>``                  a synchronous request was queued (its sender may resend after a
                               broken connection: it is queued once); lives its timeout
``async:<api>:<id>``           hash: an async request's status (in_queue, in_progress,
                               completed, failed), result or error; expires with its retention
``taken:<api>:<replica>``      list: the message a replica took and has not answered yet
                               (it takes with BLMOVE into this list: see inferq.workers.transport)
``usage:<api>``                hash: replica id -> JSON cpu (millicores) and rss (bytes)
``failure:<api>``              hash: host -> JSON last replica failure there (kind, message)
``logs:<api>``                 stream: the API's replica log lines (replica, line)
``hosts``                      hash: host name -> JSON capacity, use, heartbeat (Redis time)
``leader``                     the host whose scaler decides replica counts and placements
``plan``                       JSON: per API, replicas per host, and what cannot be placed
``changes``                    counter bumped by every deploy and delete (cheap change check)
``lock:deploy``                lock serialising deploys and deletes
``jobs``                       sorted set: batch job ids by submission time
``jobs:active``                set: the jobs that want a driver (queued or running)
``job:<id>``                   hash: a batch job's spec, status, counts and checkpoint
                               (see inferq.jobs)
``job:<id>:chunks``            hash: chunk number -> when it was queued and its size (queued,
                               not yet written)
``job:<id>:results``           hash: chunk number -> its answer (written by the replica)
``job:<id>:done``              list: chunk numbers answered, to wake the job's driver
``job:<id>:driver``            the driver's lease (its token), renewed while it runs
=============================  ==============================================================
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any

import redis

from inferq.configs import Api, Deployment
from inferq.errors import BrokerUnavailable, DeployError
from inferq.workers.messages import extra_samples, job_answer

PREFIX = "inferq:"
REPLY_TTL_SECONDS = 300  # a reply nobody collects is gone after this
JOB_WAKE_TTL_SECONDS = 24 * 3600  # a job's wake-up list (its answers are kept regardless)
RETIRED_BUNDLE_TTL_SECONDS = 24 * 3600  # replicas of an old version may still fetch it
LOG_LINES_KEPT = 10_000  # per API
DEATHS_HEADER = "inferq_deaths"  # in a message: how many replicas died holding it
LOG_LINE_CHARS = 10_000  # longer lines are cut: 10,000 kept lines must not hold gigabytes
ERROR_CHARS = 10_000  # a replica's error (a traceback) as kept: its start and its end
# A classification tracker keeps this many classes per API (any more is counted as "other")
# and labels this long: a predictor answering free text must not fill Redis or `inferq get`.
TRACKER_CLASSES_KEPT = 100
TRACKER_LABEL_CHARS = 64


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
        self._local = threading.local()  # each thread's reusable pipelines
        # Lua scripts, registered once (each call then sends only the script's hash).
        self._lead = self.redis.register_script(_LEAD_SCRIPT)
        self._resign = self.redis.register_script(_RESIGN_SCRIPT)
        self._enqueue = self.redis.register_script(_ENQUEUE_SCRIPT)
        self._enqueue_async = self.redis.register_script(_ENQUEUE_ASYNC_SCRIPT)

    # -- connection ---------------------------------------------------------------------------

    def _pipeline(self, *, transaction: bool) -> redis.client.Pipeline:
        """A pipeline of this thread's own, reused: a new one copies redis-py's ~200 response
        callbacks, which costs as much CPU as the round trip it makes (the request path)."""
        pipes = self._local.__dict__.setdefault("pipes", {})
        pipe = pipes.get(transaction)
        if pipe is None:
            pipe = pipes[transaction] = self.redis.pipeline(transaction=transaction)
        elif pipe.command_stack:  # left over by a build that failed: never send it
            pipe.reset()
        return pipe

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
            pipe = self._pipeline(transaction=True)
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
            pipe = self._pipeline(transaction=True)
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

    def enqueue(self, queue: str, message: str, *, changes: int, limit: int,
                extra: int = 0) -> tuple[str, int]:
        """Push ``message`` (of ``1 + extra`` samples) on ``queue`` if the deployed APIs are
        still as of ``changes`` and the queue has room for it under ``limit`` samples (an empty
        queue takes any one message), in one round trip.

        Returns ("queued", samples queued), ("full", samples queued) or ("stale", current
        changes) — then the caller re-reads the APIs (something was deployed or deleted) and
        decides again.
        """
        code, value = self._enqueue(keys=[_key("changes"), queue, self.extra_key(queue)],
                                    args=[changes, limit, message, extra])
        return _OUTCOMES[int(code)], int(value)

    @staticmethod
    def extra_key(queue: str) -> str:
        """The counter of samples queued on ``queue`` beyond one per message."""
        return _key("extra", queue)

    def queued_samples(self, queue: str) -> int:
        """Samples waiting on ``queue`` and held by its replicas (batch messages count each
        sample; see :meth:`in_flight_samples` for the held ones)."""
        pipe = self._pipeline(transaction=False)
        pipe.llen(queue)
        pipe.get(self.extra_key(queue))
        length, extra = pipe.execute()
        return int(length) + max(0, int(extra or 0))

    def call(self, queue: str, message: str, request_id: str, reply_to: str, wait: float, *,
             changes: int, limit: int, ttl: float) -> tuple[str, int, dict[str, Any] | None]:
        """:meth:`enqueue`, then wait up to ``wait`` seconds for the reply on ``reply_to`` (a
        list of this request's own), in ONE round trip: Redis runs the script and then the
        BLPOP on the same connection. A refused request pushes its own outcome to the list,
        so the BLPOP returns at once. Returns (outcome, value, the reply or None).

        Idempotent for ``ttl`` seconds: the script remembers ``request_id``, so a caller whose
        connection broke mid-call (was it queued?) can send it again and it is queued once.
        """
        pipe = self._pipeline(transaction=False)
        # EVAL, not EVALSHA: a pipeline cannot recover from NOSCRIPT after a broker restart
        # without a second round trip; Redis caches the compiled script by its hash anyway.
        pipe.eval(_ENQUEUE_SCRIPT, 5, _key("changes"), queue, self.extra_key(queue), reply_to,
                  _key("sent", request_id), changes, limit, message, 0, max(1, int(ttl)))
        pipe.blpop([reply_to], timeout=_blocking(wait))
        (code, value), popped = pipe.execute()
        outcome = _OUTCOMES[int(code)]
        reply = json.loads(popped[1]) if popped is not None and outcome == "queued" else None
        return outcome, int(value), reply

    def enqueue_async(self, queue: str, message: str, state: str, retention: float, *,
                      changes: int, limit: int) -> tuple[str, int]:
        """:meth:`enqueue` for an async request, recording its state ``in_queue`` under
        ``state`` (:meth:`async_key`) for ``retention`` seconds in the same step."""
        code, value = self._enqueue_async(
            keys=[_key("changes"), queue, self.extra_key(queue), state],
            args=[changes, limit, message, 0, _json_now(), max(1, int(retention))])
        return _OUTCOMES[int(code)], int(value)

    @staticmethod
    def async_key(api: str, request_id: str) -> str:
        """The hash of an async request's state."""
        return _key("async", api, request_id)

    def async_state(self, api: str, request_id: str) -> dict[str, Any] | None:
        """{"id", "status"} and "result" or "error"; None for an unknown or expired id."""
        raw = self.redis.hgetall(self.async_key(api, request_id))
        if not raw:
            return None
        data = {k.decode(): v.decode() for k, v in raw.items()}
        state = {"id": request_id, "status": data["status"]}
        if "result" in data:
            state["result"] = json.loads(data["result"])
        if "error" in data:
            state["error"] = data["error"]
        return state

    def wait_reply(self, reply_to: str, wait: float) -> dict[str, Any] | None:
        """The reply on ``reply_to`` (a list of one request's own), waiting up to ``wait`` s."""
        popped = self.redis.blpop([reply_to], timeout=_blocking(wait))
        return json.loads(popped[1]) if popped is not None else None

    def withdraw(self, queue: str, message: str) -> bool:
        """Remove a message no replica has taken yet; False when it was taken already."""
        removed = bool(self.redis.lrem(queue, 1, message))
        extra = extra_samples(json.loads(message)) if removed else 0
        if extra:
            self.redis.decrby(self.extra_key(queue), extra)
        return removed

    def queue_length(self, queue: str) -> int:
        return int(self.redis.llen(queue))

    # -- request statistics -------------------------------------------------------------------

    def add_request_stats(self, stats: dict[str, dict[str, float]]) -> None:
        """Add per-API counters (``2xx``, ``4xx``, ``5xx``, ``count``, ``latency_sum``)."""
        pipe = self._pipeline(transaction=True)
        for api, values in stats.items():
            for field, value in values.items():
                pipe.hincrbyfloat(_key("stats", api), field, value)
        pipe.execute()

    def request_stats(self, api: str) -> dict[str, float]:
        raw = self.redis.hgetall(_key("stats", api))
        return {k.decode(): float(v) for k, v in raw.items()}

    def track_class(self, api: str, label: str) -> None:
        """Count one prediction of ``label`` (see :meth:`track_commands`)."""
        for command in self.track_commands(api, {label: 1}, []):
            self.redis.execute_command(*command)

    def track_commands(self, api: str, classes: dict[str, int],
                       values: list[float]) -> list[tuple]:
        """The commands that count ``classes`` (label -> predictions) or add regression
        ``values`` to the API's tracker, for the replica to send with its acknowledgement
        (EVAL, not EVALSHA: a MULTI cannot recover from NOSCRIPT after a broker restart).

        A label is cut to :data:`TRACKER_LABEL_CHARS`; one past the first
        :data:`TRACKER_CLASSES_KEPT` classes counts as ``other`` (one script per label, so
        replicas tracking at once never keep more classes than the limit)."""
        key = _key("tracker", api)
        commands: list[tuple] = []
        for label, count in classes.items():
            commands.append(("EVAL", _TRACK_CLASS_SCRIPT, 1, key, cut_label(label),
                             TRACKER_CLASSES_KEPT, count))
        if values:
            commands.append(("EVAL", _TRACK_VALUES_SCRIPT, 1, key, len(values),
                             repr(float(sum(values))), repr(min(values)), repr(max(values))))
        return commands

    def tracker_stats(self, api: str) -> dict[str, Any]:
        """{"classes": {label: count}, "other": count} (``other`` only when some were counted
        there), most frequent first; or {"count", "min", "max", "mean"}; {} when empty."""
        raw = {k.decode(errors="replace"): v.decode()
               for k, v in self.redis.hgetall(_key("tracker", api)).items()}
        classes: dict[str, int] = {}
        for field, count in raw.items():
            if field.startswith("class:"):
                # Cut here too: counts stored before labels were cut must not show whole.
                label = cut_label(field[len("class:"):])
                classes[label] = classes.get(label, 0) + int(count)
        if classes or "other" in raw:
            return _class_stats(classes, int(raw.get("other", 0)))
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
        if fields.get("error"):  # read by every scaler several times a second
            fields["error"] = _cut_error(fields["error"])
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

    @staticmethod
    def taken_key(api: str, replica: str) -> str:
        """The list a replica takes its message into (kept until it answers)."""
        return _key("taken", api, replica)

    def in_flight(self, api: str, replicas: Iterable[str] | None = None) -> dict[str, list[str]]:
        """Replica id -> ids of the tasks it holds now (taken, not answered), for ``replicas``
        (default: every replica with a record)."""
        return {replica: [m.get("headers", {}).get("id", "?") for m in held]
                for replica, held in self._held(api, replicas).items()}

    def in_flight_samples(self, api: str, replicas: Iterable[str]) -> tuple[int, int]:
        """(samples the ``replicas`` hold now, how many of them are beyond one per message)."""
        held = [m for messages in self._held(api, replicas).values() for m in messages]
        extra = sum(extra_samples(m) for m in held)
        return len(held) + extra, extra

    def _held(self, api: str, replicas: Iterable[str] | None) -> dict[str, list[dict]]:
        replicas = [r["id"] for r in self.replicas(api)] if replicas is None else list(replicas)
        pipe = self._pipeline(transaction=False)
        for replica in replicas:
            pipe.lrange(self.taken_key(api, replica), 0, -1)
        return {replica: [json.loads(m) for m in messages]
                for replica, messages in zip(replicas, pipe.execute()) if messages}

    def set_usage(self, api: str, usage: dict[str, dict[str, float]]) -> None:
        """Record CPU and memory use of replicas (replica id -> {"cpu", "rss"})."""
        if usage:
            self.redis.hset(_key("usage", api), mapping={r: json.dumps(u) for r, u in usage.items()})

    def usage(self, api: str) -> dict[str, dict[str, float]]:
        raw = self.redis.hgetall(_key("usage", api))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def forget_replica(self, api: str, replica: str) -> None:
        """Remove the record and usage of a replica that is gone (after :meth:`recover`)."""
        pipe = self._pipeline(transaction=True)
        for kind in ("replicas", "usage"):
            pipe.hdel(_key(kind, api), replica)
        pipe.execute()

    def set_failure(self, api: str, host: str, kind: str, message: str) -> None:
        """Record that a replica of ``api`` on ``host`` failed (``kind``: "error", "oom" or
        "requirements", see ``scaler.status``)."""
        record = {"kind": kind, "message": _cut_error(message), "at": self.now(), "host": host}
        self.redis.hset(_key("failure", api), host, json.dumps(record))

    def clear_failure(self, api: str, host: str) -> None:
        self.redis.hdel(_key("failure", api), host)

    def failures(self, api: str) -> list[dict[str, Any]]:
        raw = self.redis.hgetall(_key("failure", api))
        return sorted((json.loads(v) for v in raw.values()), key=lambda f: f["at"])

    def forget_api(self, api: str) -> None:
        """Drop the runtime state of a deleted API (its stats and logs stay readable a while)."""
        pipe = self._pipeline(transaction=True)
        for kind in ("replicas", "usage", "failure", "status"):
            pipe.delete(_key(kind, api))
        pipe.execute()

    def recover(self, api: str, replica: str, queue: str) -> tuple[int, int]:
        """Put back what a dead replica held: at the head of ``queue`` (served next), or, for a
        message whose replica died before, answered with an error (no third try).

        Call it only once the replica's process is gone. Safe to repeat. Returns (requeued,
        failed).
        """
        requeued = failed = 0
        for payload in self._take_all(self.taken_key(api, replica)):
            headers = payload.setdefault("headers", {})
            headers[DEATHS_HEADER] = headers.get(DEATHS_HEADER, 0) + 1
            if headers[DEATHS_HEADER] >= 2:
                self._answer_error(payload, (
                    "the replica died while predicting, and again when the request was retried; "
                    "the request was not retried a third time"))
                failed += 1
            else:
                headers["redelivered"] = True
                # kombu and inferq's replicas take from the right end: RPUSH serves it next.
                self.redis.rpush(queue, json.dumps(payload))
                requeued += 1
        return requeued, failed

    def fail_held(self, api: str, replica: str, error: str) -> int:
        """Answer what a dead replica held with ``error`` instead of retrying it (its death
        would kill the next replica too, e.g. out of memory). Returns how many."""
        payloads = self._take_all(self.taken_key(api, replica))
        for payload in payloads:
            self._answer_error(payload, error)
        return len(payloads)

    def _take_all(self, key: str) -> list[dict[str, Any]]:
        pipe = self._pipeline(transaction=True)  # MULTI: read and empty in one step
        pipe.lrange(key, 0, -1)
        pipe.delete(key)
        raw, _ = pipe.execute()
        return [json.loads(m) for m in raw]

    def _answer_error(self, payload: dict[str, Any], error: str) -> None:
        """Answer every sample of a message that will not run with ``error``, and drop it."""
        queue = payload.get("properties", {}).get("delivery_info", {}).get("routing_key")
        extra = extra_samples(payload)
        if extra and queue:
            self.redis.decrby(self.extra_key(queue), extra)
        job = _job_chunk(payload)
        if job is not None:
            job_id, chunk, first, size, indexes = job
            answer = job_answer(first, [{"error": error}] * size, indexes)
            pipe = self._pipeline(transaction=True)
            for command in self.job_answer_commands(job_id, chunk, answer):
                pipe.execute_command(*command)
            pipe.execute()
            return
        for reply_to, task_id in _reply_lists(payload):
            if self.is_reply_key(reply_to):
                self.push_reply(reply_to, {"id": task_id, "error": error, "at": time.time()})
            elif reply_to.startswith(_key("async", "")):
                self.redis.hset(reply_to, mapping={"status": "failed", "error": error})

    # -- batch jobs ---------------------------------------------------------------------------

    @staticmethod
    def changes_key() -> str:
        return _key("changes")

    @staticmethod
    def replicas_key(api: str) -> str:
        return _key("replicas", api)

    @staticmethod
    def stats_key(api: str) -> str:
        return _key("stats", api)

    @staticmethod
    def job_key(job_id: str, part: str = "") -> str:
        """A batch job's hash, or its ``chunks``, ``results``, ``done`` or ``driver`` key."""
        return _key("job", job_id, part) if part else _key("job", job_id)

    @staticmethod
    def jobs_key(part: str = "") -> str:
        """The set of all jobs, or (``active``) of those that want a driver."""
        return _key("jobs", part) if part else _key("jobs")

    @classmethod
    def job_answer_commands(cls, job_id: str, chunk: int, answer: str) -> list[tuple]:
        """The commands that store a job chunk's answer and wake the job's driver (a replica
        sends them with its acknowledgement)."""
        done = cls.job_key(job_id, "done")
        return [("HSET", cls.job_key(job_id, "results"), chunk, answer),
                ("RPUSH", done, chunk), ("EXPIRE", done, JOB_WAKE_TTL_SECONDS)]

    # -- logs ---------------------------------------------------------------------------------

    def add_logs(self, api: str, lines: list[tuple[str, str]]) -> None:
        """Append (replica, line) pairs to the API's log stream (the newest 10000 are kept,
        each cut to :data:`LOG_LINE_CHARS`)."""
        pipe = self._pipeline(transaction=False)
        for replica, line in lines:
            entry = {"replica": replica, "line": cut_text(line, LOG_LINE_CHARS)}
            pipe.xadd(_key("logs", api), entry, maxlen=LOG_LINES_KEPT, approximate=True)
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
        pipe = self._pipeline(transaction=True)
        pipe.rpush(reply_to, json.dumps(reply))
        pipe.expire(reply_to, REPLY_TTL_SECONDS)
        pipe.execute()

    def pop_replies(self, reply_to: str, timeout: float) -> list[dict[str, Any]]:
        """Wait up to ``timeout`` seconds for replies; return every reply available."""
        return [json.loads(r) for r in self.pop_all(reply_to, timeout)]

    def pop_all(self, key: str, timeout: float) -> list[bytes]:
        """Wait up to ``timeout`` seconds for the list ``key`` to hold something; take and
        return all it holds."""
        first = self.redis.blpop([key], timeout=_blocking(timeout))
        if first is None:
            return []
        pipe = self._pipeline(transaction=True)
        pipe.lrange(key, 0, -1)
        pipe.delete(key)
        try:
            rest, _ = pipe.execute()
        except redis.RedisError:
            return [first[1]]  # the popped one must not be lost; the rest wait for the next call
        return [first[1], *rest]


_LEAD_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# ARGV: how many values, their sum, their min, their max.
_TRACK_VALUES_SCRIPT = """
redis.call('HINCRBY', KEYS[1], 'count', ARGV[1])
redis.call('HINCRBYFLOAT', KEYS[1], 'sum', ARGV[2])
local low = redis.call('HGET', KEYS[1], 'min')
if low == false or tonumber(ARGV[3]) < tonumber(low) then redis.call('HSET', KEYS[1], 'min', ARGV[3]) end
local high = redis.call('HGET', KEYS[1], 'max')
if high == false or tonumber(ARGV[4]) > tonumber(high) then redis.call('HSET', KEYS[1], 'max', ARGV[4]) end
return 1
"""

# ARGV: the label, the classes kept at most, how many predictions of it.
_TRACK_CLASS_SCRIPT = """
local field = 'class:' .. ARGV[1]
local kept = redis.call('HLEN', KEYS[1]) - redis.call('HEXISTS', KEYS[1], 'other')
if kept < tonumber(ARGV[2]) or redis.call('HEXISTS', KEYS[1], field) == 1 then
  return redis.call('HINCRBY', KEYS[1], field, ARGV[3])
end
return redis.call('HINCRBY', KEYS[1], 'other', ARGV[3])
"""

_RESIGN_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: the change counter, the queue, its extra-samples counter; ARGV: changes, limit
# (samples), message, extra samples in it. Sets ``refused`` ({-1, changes}: the API list
# changed; {0, depth}: the queue is full) or queues the message.
_ADMIT = """
local changes = redis.call('GET', KEYS[1]) or '0'
local refused = nil
local length = redis.call('LLEN', KEYS[2])
local depth = length + math.max(0, tonumber(redis.call('GET', KEYS[3]) or '0'))
local extra = tonumber(ARGV[4])
if changes ~= ARGV[1] then refused = {-1, tonumber(changes)}
elseif length > 0 and depth + 1 + extra > tonumber(ARGV[2]) then refused = {0, depth}
else
  redis.call('LPUSH', KEYS[2], ARGV[3])
  if extra > 0 then redis.call('INCRBY', KEYS[3], extra) end
end
"""
# KEYS[4], KEYS[5] (optional): the request's reply list and its "sent" marker (ARGV[5]: how
# long the marker lives). A request already sent is not queued again; a refused request with
# a reply list gets a marker there, so a BLPOP behind it returns at once.
_ENQUEUE_SCRIPT = """
if KEYS[5] and redis.call('EXISTS', KEYS[5]) == 1 then return {1, 0} end
""" + _ADMIT + """
if refused == nil then
  if KEYS[5] then redis.call('SET', KEYS[5], '1', 'EX', ARGV[5]) end
  return {1, depth + 1 + extra}
end
if KEYS[4] then redis.call('RPUSH', KEYS[4], 'refused'); redis.call('EXPIRE', KEYS[4], 60) end
return refused
"""
# KEYS[4]: the async request's state; ARGV[5]: now (JSON), ARGV[6]: its retention (seconds).
_ENQUEUE_ASYNC_SCRIPT = _ADMIT + """
if refused ~= nil then return refused end
redis.call('HSET', KEYS[4], 'status', 'in_queue', 'queued_at', ARGV[5])
redis.call('EXPIRE', KEYS[4], ARGV[6])
return {1, depth + 1 + extra}
"""
_OUTCOMES = {1: "queued", 0: "full", -1: "stale"}


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


def _blocking(seconds: float) -> float:
    """A BLPOP timeout that waits: Redis counts it in whole milliseconds, and one that rounds
    to 0 blocks forever (a request 0.1 ms from its deadline waited out the 10 s socket
    timeout)."""
    return max(round(seconds, 3), 0.01)


def _json_now() -> str:
    return json.dumps(time.time())


def _job_chunk(payload: dict[str, Any]) -> tuple[str, int, int, int, list | None] | None:
    """(job id, chunk, first index, samples, indexes) of a queued job chunk (its JSON
    envelope)."""
    try:
        args, kwargs, *_ = json.loads(payload["body"])
        if kwargs.get("job"):
            return (str(kwargs["job"]), int(kwargs["chunk"]), int(kwargs["first"]),
                    len(args[0]), kwargs.get("indexes"))
    except (KeyError, TypeError, ValueError, IndexError):
        pass
    return None


def _reply_lists(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """(where to answer, request id) of every sample of a queued message (its JSON
    envelope): reply lists, or an async request's state hash."""
    try:
        _args, kwargs, *_ = json.loads(payload["body"])
    except (KeyError, TypeError, ValueError):
        kwargs = {}
    if kwargs.get("replies"):
        return [(r[0], r[1]) for r in kwargs["replies"]]
    if kwargs.get("async_state"):
        return [(kwargs["async_state"], payload.get("headers", {}).get("id", ""))]
    reply_to = payload.get("properties", {}).get("reply_to")
    task_id = payload.get("headers", {}).get("id")
    return [(reply_to, task_id)] if reply_to and task_id else []


def cut_label(label: str) -> str:
    """``label``, cut to :data:`TRACKER_LABEL_CHARS` characters ending in "…" when longer."""
    if len(label) <= TRACKER_LABEL_CHARS:
        return label
    return label[:TRACKER_LABEL_CHARS - 1] + "…"


def cut_text(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def _cut_error(text: str) -> str:
    """``text``, or its start and end when over :data:`ERROR_CHARS` (a traceback's end says
    what was raised)."""
    if len(text) <= ERROR_CHARS:
        return text
    head, tail = ERROR_CHARS // 5, ERROR_CHARS - ERROR_CHARS // 5
    return f"{text[:head]}\n… ({len(text) - head - tail:,} characters left out) …\n{text[-tail:]}"


def _class_stats(classes: dict[str, int], other: int) -> dict[str, Any]:
    """Most frequent first, at most :data:`TRACKER_CLASSES_KEPT` (the rest joins "other")."""
    ranked = sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(ranked[:TRACKER_CLASSES_KEPT])
    other += sum(count for _, count in ranked[TRACKER_CLASSES_KEPT:])
    return {"classes": kept, "other": other} if other else {"classes": kept}


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
