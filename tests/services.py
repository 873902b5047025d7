"""Fixtures that run inferq's services for real: ``inferq scaler`` and ``inferq gateway``.

Hosts are declared (``--cpu``, ``--mem``, ``--gpus``) so GPU placement is tested without
GPUs. Every process is stopped at teardown, also when the test fails; a scaler's replicas
die with it (parent-death signal), which the teardown checks.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import requests
from conftest import inferq_command

from inferq.processes import pid_alive, spawn, stop, wait_until
from inferq.registry import Registry
from inferq.stack import free_port


class Scalers:
    """Starts scalers (one per declared host) and stops them all at teardown."""

    def __init__(self, redis_url: str, registry: Registry, logs: Path) -> None:
        self.redis_url = redis_url
        self.registry = registry
        self.logs = logs
        self.processes: dict[str, subprocess.Popen] = {}
        self.descendants: set[int] = set()

    def start(self, host: str = "host-a", *, cpu: str | None = None, mem: str | None = None,
              gpus: int | None = 0) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        args = inferq_command("scaler", "--host-name", host)
        for flag, value in (("--cpu", cpu), ("--mem", mem), ("--gpus", gpus)):
            if value is not None:
                args += [flag, str(value)]
        log_path = self.logs / f"scaler-{host}.log"
        with open(log_path, "ab") as log:
            process = spawn(args, env={**os.environ, "INFERQ_BROKER_URL": self.redis_url},
                            stdout=log, stderr=subprocess.STDOUT)
        process.log_path = log_path
        self.processes[host] = process
        return process

    def log(self, host: str = "host-a") -> str:
        return self.processes[host].log_path.read_text(errors="replace")

    def kill(self, host: str) -> None:
        """SIGKILL a scaler, as a host that vanishes."""
        process = self.processes.pop(host)
        self._remember_children(process)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self, host: str) -> int:
        process = self.processes.pop(host)
        self._remember_children(process)
        return stop(process, timeout=60)

    def stop_all(self) -> None:
        for host in list(self.processes):
            self.stop(host)
        # Every replica died with its scaler: nothing of ours is left running.
        wait_until(lambda: not any(pid_alive(p) for p in self.descendants), 20,
                   what="replicas gone with their scaler")

    def _remember_children(self, process: subprocess.Popen) -> None:
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        self.descendants.update(child.pid for child in children)


@pytest.fixture
def scalers(redis_url, registry, tmp_path):
    pool = Scalers(redis_url, registry, tmp_path / "scaler-logs")
    yield pool
    pool.stop_all()


class Gateway:
    """``inferq gateway`` on a free loopback port; its output goes to a log file."""

    def __init__(self, broker_url: str, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        with open(log, "wb") as output:
            self.process = spawn(
                inferq_command("gateway", "--port", str(self.port), *args),
                env={**os.environ, "INFERQ_BROKER_URL": broker_url},
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def wait_answering(self, timeout: float = 30) -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the gateway exited:\n{self.log()}")
            try:
                return requests.get(self.url + "/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(answers, timeout, what="the gateway answering /healthz")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def rss(self) -> int:
        """Resident memory of the gateway process, in bytes."""
        with open(f"/proc/{self.process.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def post(self, endpoint: str, sample, timeout: float = 30) -> requests.Response:
        return requests.post(self.url + endpoint, json=sample, timeout=timeout)

    def stop(self) -> None:
        stop(self.process, timeout=15)


@pytest.fixture
def start_gateway(redis_url, tmp_path):
    """Start gateways (on the test's Redis unless told otherwise); all stopped at teardown."""
    started: list[Gateway] = []

    def start(*args: str, broker_url: str = redis_url) -> Gateway:
        gateway = Gateway(broker_url, tmp_path / f"gateway-{len(started)}.log", *args)
        started.append(gateway)
        gateway.wait_answering()
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(start_gateway):
    """One gateway on the test's Redis."""
    return start_gateway()
