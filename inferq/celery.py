"""The Celery app of an inferq broker, for Celery's own tools::

    celery -A inferq.celery inspect active     # what each replica is predicting now
    celery -A inferq.celery inspect stats
    celery -A inferq.celery events             # with INFERQ_TASK_EVENTS=1 on the replicas
    celery -A inferq.celery flower             # where Flower is installed

It is the replicas' own app (same settings: JSON only, the same result backend) on
``INFERQ_BROKER_URL``, or the running ``inferq up`` stack's broker. Each replica is a worker
named ``<api>@<host>-<pid>``.
"""

from __future__ import annotations

from inferq import stack
from inferq.workers.app import make_app

app = make_app(stack.broker_url())
