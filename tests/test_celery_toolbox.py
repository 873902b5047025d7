"""Celery's own tools against an inferq broker: ``celery -A inferq.celery ...``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import write_project

from inferq import Client
from inferq.deploy import deploy
from inferq.processes import wait_until

PREDICTOR = """
import time

def predict(sample, metadata):
    time.sleep(sample.get("sleep", 0))
    return "done"
"""


@pytest.fixture
def deployed(registry, tmp_path):
    deploy(write_project(tmp_path / "p", """
        - kind: deployment
          name: shop
        - kind: api
          name: ranker
          predictor:
            path: predictor.py
        """, {"predictor.py": PREDICTOR}), registry)
    return "ranker"


def celery(*args: str, broker_url: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "inferq.celery", *args],
        env={**os.environ, "INFERQ_BROKER_URL": broker_url}, cwd=cwd,
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_celery_inspect_active_shows_the_replica_and_what_it_predicts(
        deployed, replicas, redis_url, tmp_path):
    replica = replicas.start(deployed)
    worker = f"ranker@{socket.gethostname()}-{replica.pid}"
    with Client(redis_url) as client:
        future = client.submit("ranker", {"sleep": 5}, timeout=30)
        done = None
        for _ in range(20):  # the request reaches the replica within a moment
            done = celery("inspect", "active", "--json", "--timeout", "3",
                          broker_url=redis_url, cwd=tmp_path)
            assert done.returncode == 0, done.stdout + done.stderr
            active = json.loads(done.stdout)
            if active.get(worker):
                break
        assert list(active) == [worker], done.stdout
        (task,) = active[worker]
        assert task["name"] == "inferq.predict"
        assert task["id"] == future.task_id
        assert task["delivery_info"]["routing_key"] == "inferq.ranker"
        assert future.result(timeout=30) == "done"


def test_task_events_are_off_by_default_and_on_with_inferq_task_events(
        deployed, replicas, redis_url, monkeypatch):
    from inferq.workers.app import make_app

    def events_of(replica_env: dict) -> list[str]:
        """The event types on the broker while a replica starts and answers 3 requests."""
        app = make_app(redis_url)
        seen: list[str] = []
        receivers = []

        def capture():
            with app.connection_for_read() as connection:
                receiver = app.events.Receiver(
                    connection, handlers={"*": lambda event: seen.append(event["type"])})
                receivers.append(receiver)
                receiver.capture(limit=None, timeout=None, wakeup=False)

        thread = threading.Thread(target=capture, daemon=True)
        thread.start()
        wait_until(lambda: receivers, 10, what="the event receiver")
        process = replicas.start(deployed, env=replica_env)
        with Client(redis_url) as client:
            for _ in range(3):
                client.predict(deployed, {}, timeout=30)
        if replica_env:
            wait_until(lambda: seen.count("task-succeeded") >= 3, 10, what="3 task events")
        else:
            time.sleep(1)  # what a replica would have sent has arrived by now
        process.terminate()
        process.wait(30)
        receivers[0].should_stop = True
        thread.join(15)
        assert not thread.is_alive()
        return seen

    assert not [e for e in events_of({}) if e.startswith("task-")]
    seen = events_of({"INFERQ_TASK_EVENTS": "1"})
    assert seen.count("task-succeeded") == 3, seen
    assert "worker-heartbeat" in seen or "worker-online" in seen, seen
