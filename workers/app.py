"""The Celery side of inferq, configured in one place.

Every API has its own queue, :func:`queue_name`; every replica consumes only its API's queue
and runs the one task :data:`TASK_NAME` with the message format::

    send_task("inferq.predict", args=[sample], kwargs={"debug": False}, queue="inferq.<api>")

``sample`` is the parsed JSON payload; the task's result is the prediction (JSON). Plain
Celery clients get it from the result backend (the same Redis, results expire after an
hour). inferq's own clients (gateway, ``inferq.Client``) pass ``reply_to=<reply list>`` and
``ignore_result=True`` and get the reply pushed to them instead (see ``inferq.replies``).
"""

from __future__ import annotations

import os

from celery import Celery

TASK_NAME = "inferq.predict"
RESULT_EXPIRES_SECONDS = 3600


def task_events() -> bool:
    """``INFERQ_TASK_EVENTS=1``: replicas send task events and worker heartbeats (for Flower
    and ``celery events``). Off by default: each task then costs a few more Redis writes."""
    return os.environ.get("INFERQ_TASK_EVENTS", "").strip().lower() in ("1", "true", "yes", "on")


def queue_name(api_name: str) -> str:
    """The Celery queue of an API (API names are unique across deployments)."""
    return f"inferq.{api_name}"


def make_app(broker_url: str) -> Celery:
    """A Celery app on ``broker_url`` with inferq's settings.

    Why each setting:

    - JSON only, in and out: accepting pickle would let anyone who can write to the broker
      run code on the replicas.
    - ``acks_late`` + prefetch 1 + ``worker_disable_prefetch``: a replica holds only the task
      it runs, so queued work stays visible in the queue (to the scaler) and a new replica
      takes it at once (celery #1933, #6500).
    - Task events off unless :func:`task_events`: monitoring is opt-in, not a per-task cost.
    - ``retry_on_worker_lost`` with ``max_retries=1`` (set on the task): when the pool child
      running a prediction dies (SIGKILL, OOM), the worker's main process re-sends the task at
      once instead of waiting for Redis's visibility timeout; if the retry kills its replica
      too, the task fails for good (no retry storm) and the caller gets an error.
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
        task_reject_on_worker_lost=True,
        task_retry_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_concurrency=1,
        worker_pool="prefork",
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
