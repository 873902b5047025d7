"""The task message on an API's queue: Celery's protocol 2, as kombu's Redis transport stores it.

inferq's clients (the gateway, ``inferq.Client``) build the message themselves and push it
with one ``LPUSH`` (through the registry's admission script), instead of Celery's
``send_task`` (about 4x the cost, PITFALLS.md); plain Celery callers' ``send_task`` produces
the same shape, so replicas serve both alike::

    send_task("inferq.predict", args=[sample], kwargs={"debug": False}, queue="inferq.<api>")

A message can carry several samples (``Client.map``, the gateway's dynamic batching)::

    send_task("inferq.predict", args=[samples], kwargs={"batch": True}, queue="inferq.<api>")

The replica predicts them together (``predict_batch`` when the predictor has it) and answers
each on its own: a plain Celery caller gets a list with one ``{"result": ...}`` or
``{"error": ..., "index": i}`` per sample; inferq's clients add ``"replies"``, one
``[reply list, request id, expires at]`` per sample, and each sample's answer goes to its own
waiter (a sample past its deadline is skipped). The header ``inferq_extra`` (samples beyond
one) keeps the queue's sample count that the scaler and admission read.

A batch job's chunk (``inferq.jobdriver``) is a batch message whose answers go to the job,
not to waiters: ``kwargs`` add ``"job"`` (the job's id), ``"chunk"`` (its number), ``"first"``
(the index of its first sample in the job's input) and, where some input lines were no JSON,
``"indexes"``. The replica stores the chunk's answer in the job's results hash
(:func:`job_answer`) with its acknowledgement, so it outlives the job's driver.

The body is the JSON text ``[args, kwargs, embed]`` (Celery base64-encodes it; kombu accepts
either).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kombu.utils.json import dumps as kombu_dumps

TASK_NAME = "inferq.predict"
EXTRA_HEADER = "inferq_extra"

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def queue_name(api_name: str) -> str:
    """The Celery queue of an API (API names are unique across deployments)."""
    return f"inferq.{api_name}"


def encode(task_id: str, sample: Any, *, queue: str, reply_to: str, expires_at: float,
           debug: bool = False) -> str:
    """The message for one sample, answered on the ``reply_to`` list, void after
    ``expires_at`` (a Unix time). Raises ValueError/TypeError for a sample JSON cannot carry."""
    return _envelope(task_id, [sample], {"debug": debug}, queue=queue, reply_to=reply_to,
                     expires_at=expires_at, extra=0)


def encode_async(task_id: str, sample: Any, *, queue: str, state: str,
                 expires_at: float) -> str:
    """The message for an async request: its replica records its progress and its answer in
    the ``state`` hash (``Registry.async_key``) instead of replying to a waiter."""
    return _envelope(task_id, [sample], {"debug": False, "async_state": state}, queue=queue,
                     reply_to="", expires_at=expires_at, extra=0)


def encode_batch(task_id: str, samples: list[Any], replies: list[tuple[str, str, float]], *,
                 queue: str, debug: bool = False) -> str:
    """The message for several samples, each answered on its own ``(reply list, request id,
    expires at)``; the message is void once every sample's deadline passed."""
    return _envelope(task_id, [samples], {"batch": True, "debug": debug,
                                          "replies": [list(r) for r in replies]},
                     queue=queue, reply_to=replies[0][0] if replies else "",
                     expires_at=max(r[2] for r in replies), extra=len(samples) - 1)


def encode_job_chunk(task_id: str, samples: list[str], *, queue: str, job: str, chunk: int,
                     first: int, expires_at: float, indexes: list[int] | None = None) -> str:
    """The message for chunk number ``chunk`` of batch job ``job`` (samples ``first``
    onwards, or at ``indexes`` where some lines of the input were no samples), answered into
    the job's results; void after ``expires_at``. ``samples`` are JSON texts, checked already
    (an input's lines): they are spliced into the body as they are, not decoded and encoded
    again."""
    kwargs = {"batch": True, "debug": False, "job": job, "chunk": chunk, "first": first}
    if indexes is not None:
        kwargs["indexes"] = indexes
    body = f'[[[{",".join(samples)}]],{compact(kwargs)},{compact(_EMBED)}]'
    return _envelope(task_id, [], {}, queue=queue, reply_to="", expires_at=expires_at,
                     extra=len(samples) - 1, body=body)


def job_answer(first: int, outcomes: list[dict[str, Any]],
               indexes: list[int] | None = None, took: float | None = None) -> str:
    """A job chunk's answer as stored in the job's results hash: ``{"lines": ..., "failed":
    [[index, error], ...], "took": seconds}``, where ``lines`` is the chunk's output text,
    ready to append: one JSON line per sample, ``{"index": i, "result": ...}`` or ``{"index":
    i, "error": ...}`` (a sample's outcome is ``{"result": ...}`` or ``{"error": ...}``; its
    index is ``first`` plus its position, or taken from ``indexes``), and ``took`` how long
    the replica predicted (the driver sizes the next chunks by it)."""
    lines = []
    failed = []
    for offset, outcome in enumerate(outcomes):
        index = first + offset if indexes is None else indexes[offset]
        if "error" in outcome:
            failed.append([index, outcome["error"]])
            line = {"index": index, "error": outcome["error"]}
        else:
            line = {"index": index, "result": outcome["result"]}
        lines.append(compact(line))
    return compact({"lines": "\n".join(lines) + "\n" if lines else "", "failed": failed,
                    "took": took})


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


def extra_samples(message: dict[str, Any]) -> int:
    """How many samples beyond one a queued message (its JSON envelope) counts for."""
    return int(message.get("headers", {}).get(EXTRA_HEADER) or 0)


@dataclass(frozen=True)
class Task:
    """A message as a replica reads it."""

    id: str
    samples: list[Any]
    batch: bool
    debug: bool
    reply_to: str | None
    expired: bool
    replies: list[tuple[str, str, float]] | None  # per sample, for inferq's batch senders
    extra: int  # samples beyond one that the queue's count holds for this message
    async_state: str | None  # an async request's state hash
    # a job chunk's (job id, chunk number, index of its first sample, indexes or None)
    job: tuple[str, int, int, list[int] | None] | None

    @classmethod
    def from_message(cls, message: Any) -> Task:
        """From a kombu message (``body`` JSON text, as decoded by the transport)."""
        args, kwargs, *_ = json.loads(message.body)
        headers = message.headers or {}
        batch = bool(kwargs.get("batch", False))
        samples = (args[0] if args else []) if batch else [args[0] if args else None]
        if not isinstance(samples, list):
            raise ValueError("a batch message's first argument must be a list of samples")
        replies = kwargs.get("replies")
        if replies is not None and len(replies) != len(samples):
            raise ValueError(f"{len(replies)} replies for {len(samples)} samples")
        return cls(
            id=headers.get("id", ""),
            samples=samples,
            batch=batch,
            debug=bool(kwargs.get("debug", False)),
            reply_to=message.properties.get("reply_to"),
            expired=_expired(headers.get("expires")),
            replies=[tuple(r) for r in replies] if replies is not None else None,
            extra=int(headers.get(EXTRA_HEADER) or 0),
            async_state=kwargs.get("async_state"),
            job=((str(kwargs["job"]), int(kwargs["chunk"]), int(kwargs.get("first", 0)),
                  kwargs.get("indexes")) if kwargs.get("job") else None),
        )


def _expired(expires: str | None) -> bool:
    if not expires:
        return False
    try:
        return datetime.fromisoformat(expires).timestamp() <= time.time()
    except ValueError:
        return False
