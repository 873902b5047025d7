"""The task message on an API's queue: Celery's protocol 2, as kombu's Redis transport stores it.

inferq's clients (the gateway, ``inferq.Client``) build the message themselves and push it
with one ``LPUSH`` (through the registry's admission script), instead of Celery's
``send_task`` (about 4x the cost, PITFALLS.md); plain Celery callers' ``send_task`` produces
the same shape, so replicas serve both alike::

    send_task("inferq.predict", args=[sample], kwargs={"debug": False}, queue="inferq.<api>")

The body is the JSON text ``[args, kwargs, embed]`` (Celery base64-encodes it; kombu accepts
either).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

TASK_NAME = "inferq.predict"

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def queue_name(api_name: str) -> str:
    """The Celery queue of an API (API names are unique across deployments)."""
    return f"inferq.{api_name}"


def encode(task_id: str, sample: Any, *, queue: str, reply_to: str, expires_at: float,
           debug: bool = False) -> str:
    """The message for one sample, answered on the ``reply_to`` list, void after
    ``expires_at`` (a Unix time). Raises ValueError/TypeError for a sample JSON cannot carry."""
    body = json.dumps([[sample], {"debug": debug}, _EMBED], separators=(",", ":"),
                      allow_nan=False)
    expires = datetime.fromtimestamp(expires_at, UTC).isoformat()
    return json.dumps({
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": TASK_NAME, "id": task_id, "root_id": task_id,
            "parent_id": None, "group": None, "eta": None, "expires": expires,
            "retries": 0, "timelimit": [None, None], "ignore_result": True,
            "argsrepr": "", "kwargsrepr": "", "origin": "inferq",
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


@dataclass(frozen=True)
class Task:
    """A message as a replica reads it."""

    id: str
    sample: Any
    debug: bool
    reply_to: str | None
    expired: bool

    @classmethod
    def from_message(cls, message: Any) -> Task:
        """From a kombu message (``body`` JSON text, as decoded by the transport)."""
        args, kwargs, *_ = json.loads(message.body)
        headers = message.headers or {}
        return cls(
            id=headers.get("id", ""),
            sample=args[0] if args else None,
            debug=bool(kwargs.get("debug", False)),
            reply_to=message.properties.get("reply_to"),
            expired=_expired(headers.get("expires")),
        )


def _expired(expires: str | None) -> bool:
    if not expires:
        return False
    try:
        return datetime.fromisoformat(expires).timestamp() <= time.time()
    except ValueError:
        return False
