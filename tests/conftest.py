"""Fixtures: a private Redis on a free loopback port, isolated INFERQ_HOME, real replicas.

Every process a fixture starts is stopped in its teardown, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from inferq.processes import spawn, wait_until
from inferq.registry import Registry
from inferq.stack import EmbeddedRedis

pytest_plugins = ["s3server", "services"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "configs" / "examples"


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


def write_project(folder: Path, cortex_yaml: str, files: dict[str, str] | None = None) -> Path:
    """A project folder with ``cortex.yaml`` and the given files (dedented)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cortex.yaml").write_text(textwrap.dedent(cortex_yaml))
    for name, text in (files or {}).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return folder


def copy_example(name: str, into: Path) -> Path:
    target = into / name
    shutil.copytree(EXAMPLES / name, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def inferq_command(*args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "inferq", *args]


class Replicas:
    """Starts real ``inferq worker`` processes and stops them all at teardown."""

    def __init__(self, redis_url: str, registry: Registry, logs: Path) -> None:
        self.redis_url = redis_url
        self.registry = registry
        self.logs = logs
        self.processes: list[subprocess.Popen] = []

    def start(self, api: str, *, wait_live: bool = True, env: dict | None = None,
              timeout: float = 60) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{api}-{len(self.processes)}.log"
        with open(log_path, "wb") as log:  # the replica writes to its own copy of the file
            process = spawn(
                inferq_command("worker", api),
                env={**os.environ, "INFERQ_BROKER_URL": self.redis_url, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process.log_path = log_path
        self.processes.append(process)
        if wait_live:
            self.wait_live(api, process, timeout=timeout)
        return process

    def wait_live(self, api: str, process: subprocess.Popen, timeout: float = 60) -> dict:
        def live():
            if process.poll() is not None:
                raise AssertionError(
                    f"replica exited with {process.returncode}:\n{self.log(process)}"
                )
            for record in self.registry.replicas(api):
                if record["id"].endswith(f"-{process.pid}") and record["status"] == "live":
                    return record
            return None

        return wait_until(live, timeout, what=f"replica of {api} live")

    @staticmethod
    def log(process: subprocess.Popen) -> str:
        return process.log_path.read_text(errors="replace")[-5000:]

    def stop_all(self) -> None:
        """SIGTERM every replica at once (a warm shutdown takes seconds), then wait for each;
        SIGKILL what is still running after 15 s."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


@pytest.fixture
def replicas(redis_url, registry, tmp_path):
    pool = Replicas(redis_url, registry, tmp_path / "replica-logs")
    yield pool
    pool.stop_all()
