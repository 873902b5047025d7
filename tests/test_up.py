"""``inferq up`` with no broker configured: the embedded Redis, the stack file, Ctrl-C."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil
import requests
from helpers import copy_example, inferq_command, write_project

from inferq.processes import pid_alive, wait_until
from inferq.stack import free_port


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


HELD_PREDICTOR = """
import os, time

def predict(sample, metadata):
    deadline = time.monotonic() + 60
    while "hold" in sample and not os.path.exists(sample["hold"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"id": sample["id"], "pid": os.getpid()}
"""


def test_a_killed_embedded_redis_is_restarted_and_no_request_is_lost(run_up, up_env, tmp_path):
    """SIGKILL the embedded Redis while a replica holds one request and another waits in the
    queue: inferq up restarts it on its port from its append-only file, the gateway answers
    503 meanwhile, and both requests are answered once it is back."""
    from concurrent.futures import ThreadPoolExecutor

    project = write_project(tmp_path / "held", """\
        - kind: deployment
          name: held
        - kind: api
          name: held
          predictor: {path: predictor.py}
          compute: {min_replicas: 1, max_replicas: 1}
        """, {"predictor.py": HELD_PREDICTOR})
    port = free_port()
    up = run_up(str(project), "--port", str(port))
    up.wait_for("inferq is up")
    url = f"http://127.0.0.1:{port}/held/held"
    wait_until(lambda: _post(url, {"id": "warm"}), 90, what="the API answers")
    (redis_server,) = [p for p in psutil.Process(up.process.pid).children()
                       if "redis-server" in p.name()]
    release = tmp_path / "release"
    with ThreadPoolExecutor(max_workers=2) as pool:
        held = pool.submit(requests.post, url, json={"id": "held", "hold": str(release)},
                           timeout=60)
        broker = stack_registry(up_env)
        wait_until(lambda: broker.queues.in_flight("held"), 30,
                   what="the replica holding a request")
        queued = pool.submit(requests.post, url, json={"id": "queued"}, timeout=60)
        wait_until(lambda: broker.queues.length("inferq.held") == 1, 30, what="one queued")
        redis_server.kill()
        up.wait_for("the embedded Redis is back", timeout=30)
        health = f"http://127.0.0.1:{port}/healthz"
        wait_until(lambda: requests.get(health, timeout=5).status_code == 200, 10,
                   what="the gateway reaching the restarted broker")
        release.touch()
        assert held.result(timeout=60).json()["id"] == "held"
        assert queued.result(timeout=60).json()["id"] == "queued"
    assert _post(url, {"id": "after"})["id"] == "after"


def stack_registry(env: dict[str, str]):
    """The registry of the running ``inferq up`` (its broker URL is in the stack file)."""
    from inferq.registry import Registry

    info = json.loads((Path(env["INFERQ_HOME"]) / "stack.json").read_text())
    return Registry(info["broker_url"])
