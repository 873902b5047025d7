"""The replica processes one scaler runs on its host.

Each replica is an ``inferq worker API_NAME`` child process that dies with the scaler
(``inferq.processes.spawn``), pinned to its GPUs with ``CUDA_VISIBLE_DEVICES``. Its output is
read line by line, echoed to the scaler's stderr with the replica's id, and appended to the
API's log stream in the registry (``inferq logs``), so logs are readable from any host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import redis

from inferq.processes import spawn
from inferq.registry import EXIT_INIT_FAILED, Registry, replica_id

LOG_FLUSH_SECONDS = 0.2


@dataclass
class ReplicaProcess:
    """One replica this scaler started."""

    api: str
    version: str
    host: str
    process: subprocess.Popen
    gpus: tuple[int, ...] = ()
    started_at: float = field(default_factory=time.monotonic)
    stopping: bool = False  # asked to stop (warm shutdown); it finishes its request first
    stopping_since: float = 0.0
    oom: bool = False  # killed for using more memory than its ``mem`` request

    @property
    def id(self) -> str:
        return replica_id(self.process.pid, self.host)

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> int | None:
        return self.process.poll()

    def init_failed(self) -> bool:
        return self.process.returncode == EXIT_INIT_FAILED

    def stop(self) -> None:
        """Warm shutdown: Celery finishes the request it holds, then exits."""
        if not self.stopping and self.process.poll() is None:
            self.stopping = True
            self.stopping_since = time.monotonic()
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the replica's whole process group (its Celery pool child too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def start_replica(
    api: str, version: str, broker_url: str, host: str, gpus: tuple[int, ...],
    logs: LogPump, loglevel: str = "INFO",
) -> ReplicaProcess:
    """Start one replica of ``api`` on this host, pinned to ``gpus`` (none: no GPU visible)."""
    env = {
        **os.environ,
        "INFERQ_BROKER_URL": broker_url,
        "INFERQ_HOST_NAME": host,
        # An empty CUDA_VISIBLE_DEVICES hides every GPU: a CPU replica cannot take one.
        "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # CUDA's indices in NVML's order
        "PYTHONUNBUFFERED": "1",
    }
    process = spawn(
        [sys.executable, "-P", "-m", "inferq", "worker", api, "--loglevel", loglevel],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    replica = ReplicaProcess(api, version, host, process, gpus)
    logs.follow(replica)
    return replica


class LogPump:
    """Reads replicas' output, echoes it and ships it to the registry in small batches."""

    def __init__(self, registry: Registry, echo=sys.stderr) -> None:
        self.registry = registry
        self.echo = echo
        self._pending: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_forever, daemon=True,
                                         name="inferq-logs")
        self._flusher.start()

    def follow(self, replica: ReplicaProcess) -> None:
        threading.Thread(
            target=self._read, args=(replica,), daemon=True, name=f"inferq-log-{replica.pid}"
        ).start()

    def close(self) -> None:
        self._stop.set()
        self._flusher.join(timeout=2)
        self.flush()

    def _read(self, replica: ReplicaProcess) -> None:
        prefix = f"[{replica.api} {replica.id}]"
        output = replica.process.stdout
        assert output is not None  # started with stdout=PIPE
        for raw in iter(output.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            if self.echo is not None:
                print(f"{prefix} {line}", file=self.echo, flush=True)
            with self._lock:
                self._pending.append((replica.api, replica.id, line))
        output.close()

    def _flush_forever(self) -> None:
        while not self._stop.wait(LOG_FLUSH_SECONDS):
            try:
                self.flush()
            except redis.RedisError:  # the broker may be away a moment: lines wait for it
                continue

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        by_api: dict[str, list[tuple[str, str]]] = {}
        for api, replica, line in pending:
            by_api.setdefault(api, []).append((replica, line))
        try:
            for api, lines in by_api.items():
                self.registry.telemetry.add_logs(api, lines)
        except redis.RedisError:
            with self._lock:
                self._pending[:0] = pending[-10_000:]
            raise
