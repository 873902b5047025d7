"""The API queues: admission of messages, replies to waiters, async requests' states, and
what replicas hold (in flight) and what happens to it when a replica dies (recovery).

A message is admitted by one Lua script that checks, in the same step as the push, that the
API list its sender knows is current (the change counter) and that the queue has room; a
synchronous request also waits for its reply in the same round trip (:meth:`Queues.call`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from inferq import keys, messages
from inferq.messages import DEATHS_HEADER, AsyncStatus, Outcome, Task
from inferq.registry.store import Store, blocking, decoded

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
_ENQUEUE = """
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
_ENQUEUE_ASYNC = _ADMIT + """
if refused ~= nil then return refused end
redis.call('HSET', KEYS[4], 'status', 'in_queue', 'queued_at', ARGV[5])
redis.call('EXPIRE', KEYS[4], ARGV[6])
return {1, depth + 1 + extra}
"""


# Background work (a job's or a stream's chunk) goes on a queue only while it holds fewer
# messages than half the API's replicas (at least one): live requests find little ahead of
# them. KEYS[1..4]: the change counter, the queue, its extra-samples counter, the API's replica
# records; ARGV[1..3]: changes, message, extra samples in it. Sets ``refused`` (-1: the API
# list changed; 0: busy) or queues the message.
BACKGROUND_ADMIT = """
local refused = nil
local room = math.max(1, math.ceil(redis.call('HLEN', KEYS[4]) / 2))
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then refused = -1
elseif redis.call('LLEN', KEYS[2]) >= room then refused = 0
else
  redis.call('LPUSH', KEYS[2], ARGV[2])
  local extra = tonumber(ARGV[3])
  if extra > 0 then redis.call('INCRBY', KEYS[3], extra) end
end
"""
_ENQUEUE_BACKGROUND = BACKGROUND_ADMIT + """
if refused ~= nil then return refused end
return 1
"""


class Admission(StrEnum):
    """What became of a message offered to a queue."""

    QUEUED = "queued"
    FULL = "full"  # the queue holds its limit of samples
    STALE = "stale"  # something was deployed or deleted since the sender read the APIs
    BUSY = "busy"  # background work waits: live traffic first (:data:`BACKGROUND_ADMIT`)


_ADMISSIONS = {1: Admission.QUEUED, 0: Admission.FULL, -1: Admission.STALE}
_BACKGROUND = {1: Admission.QUEUED, 0: Admission.BUSY, -1: Admission.STALE}


@dataclass(frozen=True)
class AsyncState:
    """An async request as ``GET <endpoint>/<id>`` shows it."""

    id: str
    status: AsyncStatus
    result: Any = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"id", "status"}`` and ``"result"`` (completed) or ``"error"`` (failed)."""
        state: dict[str, Any] = {"id": self.id, "status": self.status.value}
        if self.status == AsyncStatus.COMPLETED:
            state["result"] = self.result
        if self.error is not None:
            state["error"] = self.error
        return state


class Queues:
    """The API queues and the answers that come back through Redis."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis = store.redis
        self._enqueue = self.redis.register_script(_ENQUEUE)
        self._enqueue_async = self.redis.register_script(_ENQUEUE_ASYNC)
        self._enqueue_background = self.redis.register_script(_ENQUEUE_BACKGROUND)

    # -- admission ----------------------------------------------------------------------------

    def enqueue(self, queue: str, message: str, *, changes: int, limit: int,
                extra: int = 0) -> tuple[Admission, int]:
        """Push ``message`` (of ``1 + extra`` samples) on ``queue`` if the deployed APIs are
        still as of ``changes`` and the queue has room for it under ``limit`` samples (an empty
        queue takes any one message), in one round trip.

        Returns (QUEUED, samples queued), (FULL, samples queued) or (STALE, current changes)
        — then the caller re-reads the APIs and decides again.
        """
        code, value = self._enqueue(keys=[keys.changes(), queue, keys.extra(queue)],
                                    args=[changes, limit, message, extra])
        return _ADMISSIONS[int(code)], int(value)

    def call(self, queue: str, message: str, request_id: str, reply_to: str, wait: float, *,
             changes: int, limit: int, ttl: float
             ) -> tuple[Admission, int, dict[str, Any] | None]:
        """:meth:`enqueue`, then wait up to ``wait`` seconds for the reply on ``reply_to`` (a
        list of this request's own), in ONE round trip: Redis runs the script and then the
        BLPOP on the same connection. A refused request pushes its own outcome to the list,
        so the BLPOP returns at once. Returns (admission, value, the reply or None).

        Idempotent for ``ttl`` seconds: the script remembers ``request_id``, so a caller whose
        connection broke mid-call (was it queued?) can send it again and it is queued once.
        """
        pipe = self.store.pipeline(transaction=False)
        # EVAL, not EVALSHA: a pipeline cannot recover from NOSCRIPT after a broker restart
        # without a second round trip; Redis caches the compiled script by its hash anyway.
        pipe.eval(_ENQUEUE, 5, keys.changes(), queue, keys.extra(queue), reply_to,
                  keys.sent(request_id), changes, limit, message, 0, max(1, int(ttl)))
        pipe.blpop([reply_to], timeout=blocking(wait))
        (code, value), popped = pipe.execute()
        admission = _ADMISSIONS[int(code)]
        reply = (json.loads(popped[1]) if popped is not None and admission == Admission.QUEUED
                 else None)
        return admission, int(value), reply

    def enqueue_async(self, queue: str, message: str, state: str, retention: float, *,
                      changes: int, limit: int) -> tuple[Admission, int]:
        """:meth:`enqueue` for an async request, recording its state ``in_queue`` under
        ``state`` (``keys.async_state``) for ``retention`` seconds in the same step."""
        code, value = self._enqueue_async(
            keys=[keys.changes(), queue, keys.extra(queue), state],
            args=[changes, limit, message, 0, json.dumps(time.time()), max(1, int(retention))])
        return _ADMISSIONS[int(code)], int(value)

    def enqueue_background(self, api: str, message: str, *, changes: int,
                           extra: int = 0) -> Admission:
        """Queue background work's ``message`` (of ``1 + extra`` samples) on ``api``'s queue
        unless live traffic comes first (BUSY) or the APIs changed since ``changes`` (STALE)."""
        queue = keys.queue(api)
        code = self._enqueue_background(
            keys=[keys.changes(), queue, keys.extra(queue), keys.replicas(api)],
            args=[changes, message, extra])
        return _BACKGROUND[int(code)]

    def queued_samples(self, queue: str) -> int:
        """Samples waiting on ``queue`` and held by its replicas (batch messages count each
        sample; see :meth:`in_flight_samples` for the held ones)."""
        pipe = self.store.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.get(keys.extra(queue))
        length, extra = pipe.execute()
        return int(length) + max(0, int(extra or 0))

    def length(self, queue: str) -> int:
        """Messages waiting on ``queue``."""
        return int(self.redis.llen(queue))

    def withdraw(self, queue: str, message: str) -> bool:
        """Remove a message no replica has taken yet; False when it was taken already."""
        removed = bool(self.redis.lrem(queue, 1, message))
        extra = messages.extra_samples(json.loads(message)) if removed else 0
        if extra:
            self.redis.decrby(keys.extra(queue), extra)
        return removed

    # -- replies and async states -------------------------------------------------------------

    def pop_replies(self, reply_to: str, timeout: float) -> list[dict[str, Any]]:
        """Wait up to ``timeout`` seconds for replies; return every reply available."""
        return [json.loads(r) for r in self.store.pop_all(reply_to, timeout)]

    def wait_reply(self, reply_to: str, wait: float) -> dict[str, Any] | None:
        """The reply on ``reply_to`` (a list of one request's own), waiting up to ``wait`` s."""
        popped = self.redis.blpop([reply_to], timeout=blocking(wait))
        return json.loads(popped[1]) if popped is not None else None

    def async_state(self, api: str, request_id: str) -> AsyncState | None:
        """An async request's state; None for an unknown or expired id."""
        raw = self.redis.hgetall(keys.async_state(api, request_id))
        if not raw:
            return None
        data = decoded(raw)
        return AsyncState(request_id, AsyncStatus(data["status"]),
                          result=json.loads(data["result"]) if "result" in data else None,
                          error=data.get("error"))

    # -- what replicas hold -------------------------------------------------------------------

    def in_flight(self, api: str, replicas: Iterable[str] | None = None) -> dict[str, list[str]]:
        """Replica id -> ids of the tasks it holds now (taken, not answered), for ``replicas``
        (default: every replica of the API that holds something)."""
        return {replica: [m.get("headers", {}).get("id", "?") for m in held]
                for replica, held in self._held(api, replicas).items()}

    def in_flight_samples(self, api: str, replicas: Iterable[str]) -> tuple[int, int]:
        """(samples the ``replicas`` hold now, how many of them are beyond one per message)."""
        held = [m for envelopes in self._held(api, replicas).values() for m in envelopes]
        extra = sum(messages.extra_samples(m) for m in held)
        return len(held) + extra, extra

    def _held(self, api: str, replicas: Iterable[str] | None) -> dict[str, list[dict]]:
        if replicas is None:
            prefix = keys.taken(api, "")
            ids = sorted(k.decode()[len(prefix):]
                         for k in self.redis.scan_iter(match=prefix + "*", count=1000))
        else:
            ids = list(replicas)
        pipe = self.store.pipeline(transaction=False)
        for replica in ids:
            pipe.lrange(keys.taken(api, replica), 0, -1)
        return {replica: [json.loads(m) for m in envelopes]
                for replica, envelopes in zip(ids, pipe.execute(), strict=True) if envelopes}

    def recover(self, api: str, replica: str, queue: str) -> tuple[int, int]:
        """Put back what a dead replica held: at the head of ``queue`` (served next), or, for a
        message whose replica died before, answered with an error (no third try).

        Call it only once the replica's process is gone. Safe to repeat. Returns (requeued,
        failed).
        """
        requeued = failed = 0
        for raw in self.store.take_all(keys.taken(api, replica)):
            envelope = json.loads(raw)
            headers = envelope.setdefault("headers", {})
            headers[DEATHS_HEADER] = headers.get(DEATHS_HEADER, 0) + 1
            if headers[DEATHS_HEADER] >= 2:
                self._answer_error(envelope, (
                    "the replica died while predicting, and again when the request was retried; "
                    "the request was not retried a third time"))
                failed += 1
            else:
                headers["redelivered"] = True
                # kombu and inferq's replicas take from the right end: RPUSH serves it next.
                self.redis.rpush(queue, json.dumps(envelope))
                requeued += 1
        return requeued, failed

    def fail_held(self, api: str, replica: str, error: str) -> int:
        """Answer what a dead replica held with ``error`` instead of retrying it (its death
        would kill the next replica too, e.g. out of memory). Returns how many."""
        envelopes = [json.loads(raw) for raw in self.store.take_all(keys.taken(api, replica))]
        for envelope in envelopes:
            self._answer_error(envelope, error)
        return len(envelopes)

    def _answer_error(self, envelope: dict[str, Any], error: str) -> None:
        """Answer every sample of a message that will not run with ``error``, and drop it."""
        try:
            task = Task.from_envelope(envelope)
        except (KeyError, TypeError, ValueError, IndexError):
            return  # not a task of ours: nobody waits for it
        answer = messages.answer(task, [Outcome(error=error)] * len(task.samples))
        pipe = self.store.pipeline(transaction=True)
        for command in [*messages.dequeued(task), *answer.commands]:
            pipe.execute_command(*command)
        pipe.execute()
