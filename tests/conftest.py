"""Fixtures: a private Redis on a free loopback port, isolated INFERQ_HOME, real replicas,
``inferq up`` in the background.

Every process a fixture starts is stopped in its teardown, also when the test fails. A test
that uses one of them is marked ``processes`` (``pytest -m "not processes"`` runs the others,
in seconds).
"""

from __future__ import annotations

import os
import signal

import pytest
import redis
from helpers import Replicas, UpProcess

from inferq.processes import stop
from inferq.registry import Registry
from inferq.stack import EmbeddedRedis

pytest_plugins = ["s3server", "services"]

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One private redis-server for the session (no persistence), stopped by PID at the end."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server, tmp_path, monkeypatch):
    """A clean database on the private Redis, and an INFERQ_HOME of this test's own."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    monkeypatch.setenv("INFERQ_BROKER_URL", redis_server.url)
    monkeypatch.setenv("INFERQ_HOME", str(tmp_path / "inferq-home"))
    return redis_server.url


@pytest.fixture
def registry(redis_url):
    registry = Registry(redis_url)
    yield registry
    registry.close()


@pytest.fixture
def replicas(redis_url, registry, tmp_path):
    pool = Replicas(redis_url, registry, tmp_path / "replica-logs")
    yield pool
    pool.stop_all()


@pytest.fixture
def up_env(tmp_path, monkeypatch):
    """The environment of an ``inferq up`` with its embedded Redis in a home of its own."""
    monkeypatch.delenv("INFERQ_BROKER_URL", raising=False)
    monkeypatch.setenv("INFERQ_HOME", str(tmp_path / "home"))
    return {**os.environ}


@pytest.fixture
def run_up(up_env):
    """Start ``inferq up`` (args as on the command line); every one is stopped at teardown."""
    started: list[UpProcess] = []

    def start(*args: str, command: list[str] | None = None, cwd: str | None = None) -> UpProcess:
        up = UpProcess(list(args), up_env, command=command, cwd=cwd)
        started.append(up)
        return up

    yield start
    for up in started:
        stop(up.process, sig=signal.SIGINT, timeout=30)


PROCESS_FIXTURES = {"redis_server", "redis_url", "registry", "replicas", "scalers", "gateway",
                    "start_gateway", "run_up", "s3_server", "s3"}


def pytest_collection_modifyitems(items):
    """Mark each test that starts real processes (Redis, replicas, gateways, scalers, S3)."""
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.processes)
