"""``inferq up`` with no broker configured: the embedded Redis, the stack file, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import psutil
import pytest
import requests
from conftest import copy_example, inferq_command

from inferq.processes import pid_alive, spawn, stop, wait_until
from inferq.stack import free_port


class UpProcess:
    """``inferq up`` in the background, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], *, command: list[str] | None = None,
                 cwd: str | None = None) -> None:
        self.process = spawn(command or inferq_command("up", *args), env=env, cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        def seen():
            if text in self.output():
                return True
            if self.process.poll() is not None:
                raise AssertionError(f"inferq up exited:\n{self.output()}")
            return False

        wait_until(seen, timeout, what=f"{text!r} in inferq up's output")

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        return code


@pytest.fixture
def up_env(tmp_path, monkeypatch):
    monkeypatch.delenv("INFERQ_BROKER_URL", raising=False)
    monkeypatch.setenv("INFERQ_HOME", str(tmp_path / "home"))
    return {**os.environ}


@pytest.fixture
def run_up(up_env):
    started: list[UpProcess] = []

    def start(*args: str, command: list[str] | None = None, cwd: str | None = None) -> UpProcess:
        up = UpProcess(list(args), up_env, command=command, cwd=cwd)
        started.append(up)
        return up

    yield start
    for up in started:
        stop(up.process, sig=signal.SIGINT, timeout=30)


def _post(url: str, sample) -> object:
    """The prediction, or None while the API is not ready (503) or the gateway not up."""
    try:
        response = requests.post(url, json=sample, timeout=30)
    except requests.ConnectionError:
        return None
    if response.status_code in (503, 504, 404):
        return None
    assert response.status_code == 200, response.text
    return response.json()


def _child_pids(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == pid:
            found.add(int(entry))
    return found


def test_up_runs_the_embedded_broker_deploys_and_stops_cleanly(run_up, up_env, tmp_path):
    project = copy_example("iris", tmp_path)
    port = free_port()
    up = run_up(str(project), "--port", str(port))
    up.wait_for("inferq is up")
    assert f"http://127.0.0.1:{port}/iris/classifier" in up.output()
    assert "curl " in up.output()
    sample = json.loads((project / "sample.json").read_text())
    url = f"http://127.0.0.1:{port}/iris/classifier"
    answer = wait_until(lambda: _post(url, sample), 90, what="the example answers over HTTP")
    assert answer == "setosa"
    children = _child_pids(up.process.pid)
    assert children, "inferq up started no child process"
    # Redis, the gateway, the scaler and the replicas it started: all must go with Ctrl-C.
    descendants = {p.pid for p in psutil.Process(up.process.pid).children(recursive=True)}
    assert len(descendants) > len(children)

    listed = subprocess.run(inferq_command("get"), env=up_env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert listed.returncode == 0, listed.stderr
    assert "classifier" in listed.stdout

    second = subprocess.run(inferq_command("up"), env=up_env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert second.returncode == 1
    assert "already running" in second.stderr

    assert up.interrupt() == 0
    assert "inferq stopped" in up.output()
    for pid in children | descendants:
        wait_until(lambda pid=pid: not pid_alive(pid), 10, what=f"process {pid} gone")
    after = subprocess.run(inferq_command("get"), env=up_env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert after.returncode == 1 and "inferq up" in after.stderr


def test_a_restarted_stack_keeps_its_deployments(run_up, up_env, tmp_path):
    project = copy_example("iris", tmp_path)
    first = run_up(str(project), "--port", str(free_port()))
    first.wait_for("inferq is up")
    assert first.interrupt() == 0

    second = run_up("--port", str(free_port()))  # no project: what was deployed persists
    second.wait_for("inferq is up")
    listed = subprocess.run(inferq_command("get"), env=up_env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert "classifier" in listed.stdout, listed.stdout + listed.stderr
    assert second.interrupt() == 0


def test_sigkilled_up_leaves_no_redis_behind(run_up, tmp_path):
    up = run_up("--port", str(free_port()))
    up.wait_for("inferq is up")
    children = _child_pids(up.process.pid)
    up.process.kill()
    up.process.wait(timeout=10)
    for pid in children:
        wait_until(lambda pid=pid: not pid_alive(pid), 10, what=f"child {pid} gone")
