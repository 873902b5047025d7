"""The Celery side of inferq, configured in one place.

Every API has its own queue; every replica consumes only its API's queue and runs the one
task ``inferq.predict`` (the message format: ``inferq.messages``). Plain Celery
clients get the prediction from the result backend (the same Redis, results expire after an
hour); inferq's own clients (gateway, ``inferq.Client``) get it pushed to their reply list.
"""

from __future__ import annotations

import os

from celery import Celery

RESULT_EXPIRES_SECONDS = 3600


def task_events() -> bool:
    """``INFERQ_TASK_EVENTS=1``: replicas send task events and worker heartbeats (for Flower
    and ``celery events``). Off by default: each task then costs a few more Redis writes."""
    return os.environ.get("INFERQ_TASK_EVENTS", "").strip().lower() in ("1", "true", "yes", "on")


def make_app(broker_url: str) -> Celery:
    """A Celery app on ``broker_url`` with inferq's settings.

    Why each setting:

    - JSON only, in and out: accepting pickle would let anyone who can write to the broker
      run code on the replicas.
    - ``acks_late`` + prefetch 1 + ``worker_disable_prefetch``: a replica holds only the task
      it runs, so queued work stays visible in the queue (to the scaler) and a new replica
      takes it at once (celery #1933, #6500).
    - ``solo`` pool, concurrency 1: one request at a time, in the process that loaded the
      predictor. When that process dies its supervisor puts back what it held
      (``inferq.workers.supervisor``): no visibility timeout to wait for.
    - Task events off unless :func:`task_events`: monitoring is opt-in, not a per-task cost.
    """
    app = Celery("inferq", broker=broker_url, backend=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_concurrency=1,
        worker_pool="solo",
        worker_hijack_root_logger=False,
        worker_send_task_events=task_events(),
        task_send_sent_event=task_events(),
        result_expires=RESULT_EXPIRES_SECONDS,
        result_extended=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
        task_create_missing_queues=True,
        enable_utc=True,
    )
    return app
