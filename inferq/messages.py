"""The wire format: the task message on an API's queue, and where each of its answers goes.

Every side speaks it: the clients and the gateway encode messages, the replicas decode and
answer them, the registry decodes what a dead replica held to put it back or answer it, and a
job's driver encodes chunks and reads their answers. Nothing here talks to Redis: a message is
text, an answer a list of Redis commands that its sender runs (a replica with its
acknowledgement, in one round trip).

A message is Celery's protocol 2 as kombu's Redis transport stores it, so a plain Celery
caller's ``send_task`` produces the same shape and replicas serve both alike::

    send_task("inferq.predict", args=[sample], kwargs={"debug": False}, queue="inferq.<api>")
    send_task("inferq.predict", args=[samples], kwargs={"batch": True}, queue="inferq.<api>")

inferq's own clients build it themselves and push it with one ``LPUSH`` (through the queue
admission script), about a quarter of ``send_task``'s cost. The body is the JSON text
``[args, kwargs, embed]``; the keyword arguments say where the answer goes:

=====================================  =======================================================
kwargs                                 the answer of each sample goes to
=====================================  =======================================================
(none; ``reply_to`` an inferq list)    that list: ``{"id", "result" | "error", ...}``
(none; any other ``reply_to``)         Celery's result backend (a plain Celery caller)
``replies``: ``[[list, id, expires]]``  each sample's own waiter (``Client.map``, the gateway's
                                       batching); a sample past its deadline is skipped
``async_state``: a hash                that hash (an async request's state)
``job``, ``chunk``, ``first``          the job's results hash, as a :class:`ChunkAnswer`
=====================================  =======================================================

The header ``inferq_extra`` counts a batch's samples beyond one, so the queue's sample count
that admission and the scaler read is ``LLEN`` plus the sum of these (``keys.extra``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from kombu.utils.json import dumps as kombu_dumps

from inferq import keys

TASK_NAME = "inferq.predict"
EXTRA_HEADER = "inferq_extra"
DEATHS_HEADER = "inferq_deaths"  # how many replicas died holding the message

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

Command = tuple[Any, ...]  # a Redis command: name, then arguments


class AsyncStatus(StrEnum):
    """Where an async request stands (its state hash's ``status``)."""

    IN_QUEUE = "in_queue"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    """One sample's answer: its prediction (``result``) or ``error``."""

    result: Any = None
    error: str | None = None

    def as_dict(self, index: int | None = None) -> dict[str, Any]:
        """``{"result": ...}``, or ``{"error": ...}`` (with the sample's ``index`` if given)."""
        if self.error is None:
            return {"result": self.result}
        return {"error": self.error} if index is None else {"error": self.error, "index": index}


# -- encoding -----------------------------------------------------------------------------------


def encode(task_id: str, sample: Any, *, queue: str, reply_to: str, expires_at: float,
           debug: bool = False) -> str:
    """The message for one sample, answered on the ``reply_to`` list, void after
    ``expires_at`` (a Unix time). Raises ValueError/TypeError for a sample JSON cannot carry."""
    return _envelope(task_id, [sample], {"debug": debug}, queue=queue, reply_to=reply_to,
                     expires_at=expires_at, extra=0)


def encode_async(task_id: str, sample: Any, *, queue: str, state: str,
                 expires_at: float) -> str:
    """The message for an async request: its replica records its progress and its answer in
    the ``state`` hash (``keys.async_state``) instead of replying to a waiter."""
    return _envelope(task_id, [sample], {"debug": False, "async_state": state}, queue=queue,
                     reply_to="", expires_at=expires_at, extra=0)


def encode_batch(task_id: str, samples: list[Any], replies: list[tuple[str, str, float]], *,
                 queue: str, debug: bool = False, texts: bool = False) -> str:
    """The message for several samples, each answered on its own ``(reply list, request id,
    expires at)``; the message is void once every sample's deadline passed. With ``texts``,
    ``samples`` are JSON texts, checked already (:func:`inferq.samples.check_text`): they are
    spliced into the body as they are, not decoded and encoded again."""
    kwargs = {"batch": True, "debug": debug, "replies": [list(r) for r in replies]}
    body = f'[[[{",".join(samples)}]],{compact(kwargs)},{compact(_EMBED)}]' if texts else None
    return _envelope(task_id, [samples], kwargs, queue=queue,
                     reply_to=replies[0][0] if replies else "",
                     expires_at=max(r[2] for r in replies), extra=len(samples) - 1, body=body)


def encode_job_chunk(task_id: str, samples: list[str], *, queue: str, job: str, chunk: int,
                     first: int, expires_at: float, indexes: list[int] | None = None) -> str:
    """The message for chunk number ``chunk`` of batch job ``job`` (samples ``first``
    onwards, or at ``indexes`` where some lines of the input were no samples), answered into
    the job's results; void after ``expires_at``. ``samples`` are JSON texts, checked already
    (an input's lines): they are spliced into the body as they are, not decoded and encoded
    again."""
    kwargs: dict[str, Any] = {"batch": True, "debug": False, "job": job, "chunk": chunk,
                              "first": first}
    if indexes is not None:
        kwargs["indexes"] = indexes
    body = f'[[[{",".join(samples)}]],{compact(kwargs)},{compact(_EMBED)}]'
    return _envelope(task_id, [], {}, queue=queue, reply_to="", expires_at=expires_at,
                     extra=len(samples) - 1, body=body)


def _envelope(task_id: str, args: list, kwargs: dict, *, queue: str, reply_to: str,
              expires_at: float, extra: int, body: str | None = None) -> str:
    if body is None:
        # kombu's encoder, as send_task's: dates, decimals and UUIDs travel as they would there.
        body = kombu_dumps([args, kwargs, _EMBED], separators=(",", ":"), allow_nan=False)
    expires = datetime.fromtimestamp(expires_at, UTC).isoformat()
    return json.dumps({
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": TASK_NAME, "id": task_id, "root_id": task_id,
            "parent_id": None, "group": None, "eta": None, "expires": expires,
            "retries": 0, "timelimit": [None, None], "ignore_result": True,
            "argsrepr": "", "kwargsrepr": "", "origin": "inferq", EXTRA_HEADER: extra,
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": reply_to,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "delivery_tag": task_id,
        },
    }, separators=(",", ":"))


def compact(value: Any) -> str:
    """``value`` as JSON without spaces (answers and job output lines)."""
    return json.dumps(value, separators=(",", ":"))


def extra_samples(envelope: dict[str, Any]) -> int:
    """How many samples beyond one a queued message (its JSON envelope) counts for."""
    return int(envelope.get("headers", {}).get(EXTRA_HEADER) or 0)


# -- decoding -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobChunk:
    """Which part of a batch job a message carries."""

    job: str
    chunk: int
    first: int  # the index of its first sample in the job's input
    indexes: list[int] | None  # each sample's index, where some input lines were no samples


@dataclass(frozen=True)
class Task:
    """A message as its replica (or whoever answers for it) reads it."""

    id: str
    samples: list[Any]
    batch: bool
    debug: bool
    queue: str | None  # the queue it was sent to
    reply_to: str | None
    expires_at: float | None  # a Unix time
    replies: list[tuple[str, str, float]] | None  # per sample, for inferq's batch senders
    extra: int  # samples beyond one that the queue's count holds for this message
    async_state: str | None  # an async request's state hash
    job: JobChunk | None

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= time.time()

    @classmethod
    def from_message(cls, message: Any) -> Task:
        """From a kombu message (its ``body`` JSON text, as the transport decoded it)."""
        return cls.decode(message.body, message.headers or {}, message.properties or {})

    @classmethod
    def from_envelope(cls, envelope: dict[str, Any]) -> Task:
        """From a queued message's JSON envelope (as a taken list holds it)."""
        return cls.decode(envelope["body"], envelope.get("headers") or {},
                          envelope.get("properties") or {})

    @classmethod
    def decode(cls, body: str | bytes, headers: dict[str, Any],
               properties: dict[str, Any]) -> Task:
        """ValueError (or TypeError, IndexError) for a body that is no ``inferq.predict``
        task."""
        args, kwargs, *_ = json.loads(body)
        batch = bool(kwargs.get("batch", False))
        samples = (args[0] if args else []) if batch else [args[0] if args else None]
        if not isinstance(samples, list):
            raise ValueError("a batch message's first argument must be a list of samples")
        replies = kwargs.get("replies")
        if replies is not None and len(replies) != len(samples):
            raise ValueError(f"{len(replies)} replies for {len(samples)} samples")
        job = None
        if kwargs.get("job"):
            job = JobChunk(str(kwargs["job"]), int(kwargs["chunk"]), int(kwargs.get("first", 0)),
                           kwargs.get("indexes"))
        return cls(
            id=headers.get("id", ""),
            samples=samples,
            batch=batch,
            debug=bool(kwargs.get("debug", False)),
            queue=(properties.get("delivery_info") or {}).get("routing_key"),
            reply_to=properties.get("reply_to"),
            expires_at=_timestamp(headers.get("expires")),
            replies=[tuple(r) for r in replies] if replies is not None else None,
            extra=int(headers.get(EXTRA_HEADER) or 0),
            async_state=kwargs.get("async_state"),
            job=job,
        )


def _timestamp(expires: str | None) -> float | None:
    if not expires:
        return None
    try:
        return datetime.fromisoformat(expires).timestamp()
    except ValueError:
        return None


# -- answering ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """Where a message's answers go: Redis commands for inferq's own receivers, and, for a
    plain Celery caller, the value to store in Celery's result backend."""

    commands: list[Command]
    backend: Outcome | None = None


def answer(task: Task, outcomes: Sequence[Outcome], *, replica: str | None = None,
           took: float | None = None, retention: float | None = None,
           now: float | None = None) -> Answer:
    """The answer of ``task``: ``outcomes`` holds one :class:`Outcome` per sample, in order
    (for a message that will not run, the same error for each).

    ``replica`` names who answered (in replies), ``took`` how long the prediction took (a job
    chunk's driver and a stream's consumer size their chunks by it), ``retention`` how long
    an async request's state is kept from now on (None: as long as it was already).
    """
    now = time.time() if now is None else now
    if task.async_state is not None:
        return Answer(_async(task.async_state, outcomes[0], retention, now))
    if task.job is not None:
        return Answer(chunk_answer_commands(task.job, ChunkAnswer.of(task.job, outcomes, took)))
    if task.replies is not None:
        return Answer(_each(task.replies, outcomes, replica, now, took))
    value = (Outcome(result=[o.as_dict(i) for i, o in enumerate(outcomes)]) if task.batch
             else outcomes[0])
    if task.reply_to and keys.is_reply(task.reply_to):
        body = {"id": task.id, **({"replica": replica} if replica else {}), "at": now,
                **value.as_dict()}
        return Answer(_push(task.reply_to, body))
    return Answer([], backend=value)


def dequeued(task: Task) -> list[Command]:
    """The commands that take a message's samples beyond one off its queue's sample count
    (with its acknowledgement, or when it is answered without running)."""
    if not task.extra or not task.queue:
        return []
    return [("DECRBY", keys.extra(task.queue), task.extra)]


def _async(state: str, outcome: Outcome, retention: float | None, now: float) -> list[Command]:
    if outcome.error is None:
        fields = ["status", AsyncStatus.COMPLETED.value, "result", compact(outcome.result)]
    else:
        fields = ["status", AsyncStatus.FAILED.value, "error", outcome.error]
    commands: list[Command] = [("HSET", state, *fields, "done_at", now)]
    if retention is not None:
        commands.append(("EXPIRE", state, max(1, int(retention))))
    return commands


def _each(replies: list[tuple[str, str, float]], outcomes: Sequence[Outcome],
          replica: str | None, now: float, took: float | None) -> list[Command]:
    """Each live sample's answer to its own waiter: one entry per waiter's list
    (``Client.map``: one for the whole batch), not per sample, with how long the batch took
    to predict."""
    by_list: dict[str, list[dict[str, Any]]] = {}
    for (reply_to, request_id, expires_at), outcome in zip(replies, outcomes, strict=True):
        if expires_at > now and keys.is_reply(reply_to):
            by_list.setdefault(reply_to, []).append({"id": request_id, **outcome.as_dict()})
    commands: list[Command] = []
    for reply_to, answers in by_list.items():
        body = answers[0] if len(answers) == 1 else {"answers": answers}
        if replica:
            body = {**body, "replica": replica}
        if took is not None:
            body = {**body, "took": round(took, 6)}
        commands += _push(reply_to, {**body, "at": now})
    return commands


def _push(reply_to: str, body: dict[str, Any]) -> list[Command]:
    return [("RPUSH", reply_to, compact(body)), ("EXPIRE", reply_to, keys.REPLY_TTL_SECONDS)]


@dataclass(frozen=True)
class ChunkAnswer:
    """A batch job chunk's answer, as a replica stores it in the job's results hash.

    ``lines`` is the chunk's output text, ready to append: one JSON line per sample,
    ``{"index": i, "result": ...}`` or ``{"index": i, "error": ...}``; ``failed`` the
    ``(index, error)`` of each failed sample; ``took`` how long the replica predicted (the
    driver sizes the next chunks by it).
    """

    lines: str
    failed: list[tuple[int, str]]
    took: float | None = None

    @classmethod
    def of(cls, chunk: JobChunk, outcomes: Sequence[Outcome],
           took: float | None = None) -> ChunkAnswer:
        lines = []
        failed = []
        for offset, outcome in enumerate(outcomes):
            index = chunk.first + offset if chunk.indexes is None else chunk.indexes[offset]
            if outcome.error is not None:
                failed.append((index, outcome.error))
                line = {"index": index, "error": outcome.error}
            else:
                line = {"index": index, "result": outcome.result}
            lines.append(compact(line))
        return cls("\n".join(lines) + "\n" if lines else "", failed, took)

    def to_json(self) -> str:
        return compact({"lines": self.lines, "failed": [list(f) for f in self.failed],
                        "took": self.took})

    @classmethod
    def from_json(cls, raw: str | bytes) -> ChunkAnswer:
        data = json.loads(raw)
        return cls(data["lines"], [(int(i), str(e)) for i, e in data["failed"]],
                   data.get("took"))


def chunk_answer_commands(chunk: JobChunk, answer: ChunkAnswer) -> list[Command]:
    """The commands that store a job chunk's answer and wake the job's driver."""
    done = keys.job_done(chunk.job)
    return [("HSET", keys.job_results(chunk.job), chunk.chunk, answer.to_json()),
            ("RPUSH", done, chunk.chunk), ("EXPIRE", done, keys.JOB_WAKE_TTL_SECONDS)]
