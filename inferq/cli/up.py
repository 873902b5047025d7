"""``inferq up``: the whole stack in the foreground on this machine.

It refuses at once a port that another stack or program listens on; then it starts the
broker (an embedded Redis unless ``INFERQ_BROKER_URL`` is set), the gateway and the scaler as
child processes, deploys the project if one is given, waits until the gateway answers, and
prints the endpoints (of every deployed API when no project is given). A child that dies is
restarted; the embedded Redis on the same port with the same append-only file, so queued
requests and deployments survive it and the gateway and replicas reconnect (the gateway
answers 503 meanwhile). Ctrl-C or SIGTERM stops the children in reverse order and leaves no
process behind (children also die with it if it is SIGKILLed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis

from inferq import stack
from inferq.configs import Deployment
from inferq.deploy import deploy
from inferq.errors import BrokerUnavailable, InferqError
from inferq.processes import spawn, stop
from inferq.registry import Registry

READY_SECONDS = 60.0  # the gateway answers within this, or the stack stops
RESTART_BACKOFF_MAX = 30.0
BROKER_RESTARTS_IN_A_ROW = 5  # then the embedded Redis is given up on: the stack stops


@dataclass
class Service:
    """A child process ``inferq up`` keeps running."""

    name: str
    args: list[str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        self.process = spawn(self.args, env={**os.environ, **self.env})

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, timeout=15)
            self.process = None


class Up:
    """Run the stack until a signal; see the module doc."""

    def __init__(self, project_dir: str | None, *, port: int = 8888, host: str = "127.0.0.1",
                 out=sys.stdout) -> None:
        self.project_dir = project_dir
        self.port = port
        self.host = host
        self.out = out
        self.redis: stack.EmbeddedRedis | None = None
        self.services: list[Service] = []
        self._stop = threading.Event()
        self._broker_failures = 0

    def run(self) -> int:
        lock = stack.StackLock()
        lock.acquire()  # another stack of this INFERQ_HOME: refused, nothing started
        claim = None
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._check_port()  # taken by another stack or program: refused, nothing started
            url = self._start_broker()
            claim = stack.PortClaim(self.port, os.getpid(), str(stack.home()), url)
            claim.write()
            gateway = f"http://{self.host}:{self.port}"
            stack.StackInfo(pid=os.getpid(), broker_url=url, gateway_url=gateway).write()
            self._start_services(url)
            deployed = self._deploy(self.project_dir, url) if self.project_dir else None
            self._wait_ready(gateway, Registry(url))
            self._show_endpoints(url, gateway, deployed)
            self._say(f"inferq is up (broker {Registry(url).safe_url}); press Ctrl-C to stop")
            if self.redis is not None:
                self._say("  other shells find it with: export INFERQ_BROKER_URL=$(inferq "
                          "broker-url)")
            self._supervise()
            return 0
        finally:
            self._shutdown()
            if claim is not None:
                claim.release()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            lock.release()

    def _check_port(self) -> None:
        """Refuse at once, in one line, a port that another stack or program listens on."""
        if not stack.port_taken(self.host, self.port):
            return
        free = stack.free_port_from(self.host, self.port + 1)
        holder = stack.PortClaim.read(self.port)
        if holder is not None:
            raise InferqError(
                f"port {self.port} is taken by the inferq stack of INFERQ_HOME={holder.home} "
                f"(pid {holder.pid}): use it (export INFERQ_HOME={holder.home}), stop it "
                f"(Ctrl-C in its terminal), or start this one on a free port: "
                f"inferq up --port {free}")
        raise InferqError(f"port {self.port} on {self.host} is taken by another program: start "
                          f"on a free port, e.g. inferq up --port {free}")

    def _wait_ready(self, gateway: str, registry: Registry) -> None:
        """Until the gateway answers and the scaler beats: "inferq is up" means a request
        sent now is served. A gateway that exits before it ever answered stops the stack (its
        error is above)."""
        service = next(s for s in self.services if s.name == "gateway")
        deadline = time.monotonic() + READY_SECONDS
        while not self._stop.is_set():
            if service.process is None or service.process.poll() is not None:
                raise InferqError("the gateway could not start (its error is above); stopping")
            with (contextlib.suppress(OSError, urllib.error.URLError, redis.RedisError),
                  urllib.request.urlopen(gateway + "/healthz", timeout=1) as answer):
                if answer.status == 200 and registry.hosts.all():
                    return
            if time.monotonic() > deadline:
                raise InferqError(f"the gateway does not answer at {gateway} after "
                                  f"{READY_SECONDS:.0f}s; stopping")
            self._stop.wait(0.05)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop.set()

    def _start_broker(self) -> str:
        url = os.environ.get("INFERQ_BROKER_URL")
        if url:
            Registry(url).ping()
            return url
        self.redis = stack.EmbeddedRedis(stack.home() / "redis")
        url = self.redis.start()
        self._say(f"started the embedded Redis at {url} (data in {self.redis.data_dir})")
        return url

    def _start_services(self, url: str) -> None:
        env = {"INFERQ_BROKER_URL": url}
        for name, args in self._service_commands():
            service = Service(name, [sys.executable, "-P", "-m", "inferq", *args], env=env)
            service.start()
            self.services.append(service)

    def _service_commands(self) -> list[tuple[str, list[str]]]:
        """The child processes beside the broker (the gateway and the scaler)."""
        return [
            ("gateway", ["gateway", "--host", self.host, "--port", str(self.port)]),
            ("scaler", ["scaler"]),
        ]

    def _deploy(self, project_dir: str, url: str) -> Deployment:
        registry = Registry(url)
        try:
            deployment, result = deploy(project_dir, registry)
        finally:
            registry.close()
        for api in deployment.apis:
            self._say(f'api "{api.name}": {result.changes[api.name]}')
        return deployment

    def _show_endpoints(self, url: str, gateway: str, deployment: Deployment | None) -> None:
        """Each API's endpoint and a curl line: of the project deployed now, or, without one,
        of every API the stack had deployed before (its broker keeps them)."""
        if deployment is not None:
            apis = list(deployment.apis)
            folder: Path | None = deployment.project_dir
        else:
            registry = Registry(url)
            try:
                apis = [d.api for d in registry.deployments.apis()]
            finally:
                registry.close()
            folder = None
            if not apis:
                self._say("no API is deployed yet: inferq deploy PROJECT_DIR")
        for api in apis:
            sample = Path(folder, "sample.json") if folder is not None else None
            data = f"@{sample}" if sample is not None and sample.is_file() else "'{}'"
            self._say(f'api "{api.name}": {gateway}{api.endpoint}')
            self._say(f"  curl {gateway}{api.endpoint} -X POST "
                      f"-H 'Content-Type: application/json' -d {data}")

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            self._restart_broker_if_dead()
            for service in self.services:
                self._restart_if_dead(service)

    def _restart_broker_if_dead(self) -> None:
        """The embedded Redis died: start it again on its port, from its append-only file."""
        if self.redis is None:
            return
        process = self.redis.process
        if process is not None and process.poll() is None:
            self._broker_failures = 0
            return
        code = process.returncode if process is not None else "none (it did not start)"
        self._say(f"the embedded Redis exited with code {code}; restarting it on port "
                  f"{self.redis.port} from {self.redis.data_dir}")
        try:
            self.redis.start()
        except BrokerUnavailable as exc:
            self._broker_failures += 1
            if self._broker_failures >= BROKER_RESTARTS_IN_A_ROW:
                raise InferqError(f"the embedded Redis does not start again ({exc}); "
                                  "stopping") from None
            self._say(f"the embedded Redis did not start ({exc}); trying again")
            return
        self._say("the embedded Redis is back")

    def _restart_if_dead(self, service: Service) -> None:
        if service.process is None or service.process.poll() is None:
            return
        now = time.monotonic()
        if service.next_start == 0.0:
            code = service.process.returncode
            delay = min(2.0**service.restarts, RESTART_BACKOFF_MAX)
            self._say(f"{service.name} exited with code {code}; restarting in {delay:.0f}s")
            service.next_start = now + delay
        elif now >= service.next_start:
            service.restarts += 1
            service.next_start = 0.0
            service.start()

    def _shutdown(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        stack.StackInfo.clear()
        self._say("inferq stopped")

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

