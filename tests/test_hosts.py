"""Several scalers, one system: placement across hosts, GPU hosts, a host that vanishes."""

from __future__ import annotations

import json
import subprocess
import threading
import time

from helpers import inferq_command, write_project

from inferq import Client, InferqError
from inferq.deploy import deploy
from inferq.processes import wait_until

PREDICTOR = """
import os, time

def predict(sample, metadata):
    time.sleep(sample.get("sleep", 0))
    return {"pid": os.getpid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "host": os.environ.get("INFERQ_HOST_NAME")}
"""


def two_apis(tmp_path):
    return write_project(
        tmp_path / "project",
        """
        - kind: deployment
          name: fleet
        - kind: api
          name: cpu-api
          predictor: {path: predictor.py}
          compute: {min_replicas: 3, max_replicas: 3}
        - kind: api
          name: gpu-api
          predictor: {path: predictor.py}
          compute: {gpu: 1, min_replicas: 3, max_replicas: 3}
        """,
        {"predictor.py": PREDICTOR},
    )


def live_by_host(registry, api: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in registry.replicas.of(api):
        if record.status == "live":
            counts[record.host] = counts.get(record.host, 0) + 1
    return counts


def test_two_hosts_share_the_work_and_a_vanished_host_is_replaced(
        registry, scalers, redis_url, tmp_path):
    deploy(two_apis(tmp_path), registry)
    # B first, so it holds the CPU replicas (placement keeps replicas where they run)...
    scalers.start("host-b", gpus=2)
    wait_until(lambda: live_by_host(registry, "cpu-api") == {"host-b": 3}, 90,
               what="3 live CPU replicas on host-b")
    # ...and A joining takes nothing over: the CPU API has exactly 3 replicas in all.
    scalers.start("host-a", gpus=0)
    wait_until(lambda: "host-a" in registry.hosts.all(), 30, what="host-a registered")
    # The GPU API runs only on B, one GPU each; the third waits with the reason.
    wait_until(lambda: live_by_host(registry, "gpu-api") == {"host-b": 2}, 60,
               what="2 GPU replicas on host-b")
    gpu_replicas = [r for r in registry.replicas.of("gpu-api") if r.status == "live"]
    assert sorted(tuple(r.gpus) for r in gpu_replicas) == [(0,), (1,)]
    status = wait_until(
        lambda: "host-a:" in ((s := registry.replicas.status("gpu-api")).reason or "") and s, 10,
        what="gpu-api's reason names both hosts",
    )
    assert status.status == "compute unavailable"
    assert "1 replica(s) cannot be placed" in status.reason
    assert "host-a: needs gpu 1, host has 0" in status.reason
    time.sleep(1.5)  # several scaler rounds: still exactly 3, no host started an extra one
    assert sum(live_by_host(registry, "cpu-api").values()) == 3
    assert len(registry.replicas.of("cpu-api")) == 3

    listed = subprocess.run(inferq_command("get", "--hosts"), capture_output=True, text=True,
                            timeout=60, check=True).stdout
    assert "host-a" in listed and "host-b" in listed and "(leader)" in listed
    hosts = {h["host"]: h for h in json.loads(subprocess.run(
        inferq_command("get", "--hosts", "--output", "json"), capture_output=True, text=True,
        timeout=60, check=True).stdout)}
    assert hosts["host-b"]["capacity"]["gpus"] == [0, 1]
    assert hosts["host-a"]["capacity"]["gpus"] == []
    assert hosts["host-b"]["replicas"] == {"cpu-api": 3, "gpu-api": 2}
    table = subprocess.run(inferq_command("get"), capture_output=True, text=True, timeout=60,
                           check=True).stdout
    assert "host-b (3)" in table and "host-b (2)" in table  # which hosts run each API

    with Client(redis_url) as client:
        seen_gpus = {client.predict("gpu-api", {}, timeout=30)["gpus"] for _ in range(12)}
        assert seen_gpus <= {"0", "1"} and seen_gpus

        answers: list = []
        errors: list = []
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                try:
                    answers.append(client.predict("cpu-api", {"sleep": 0.05}, timeout=40))
                except InferqError as exc:  # the assertion below shows what failed
                    errors.append(exc)

        senders = [threading.Thread(target=loop) for _ in range(3)]
        for sender in senders:
            sender.start()
        try:
            wait_until(lambda: len(answers) >= 10, 30, what="requests flowing")
            killed_at = time.monotonic()
            scalers.kill("host-b")
            wait_until(lambda: live_by_host(registry, "cpu-api") == {"host-a": 3}, 30,
                       what="CPU replicas moved to host-a")
            moved_in = time.monotonic() - killed_at
            count = len(answers)
            wait_until(lambda: len(answers) >= count + 10, 30, what="requests after the move")
        finally:
            stop.set()
            for sender in senders:
                sender.join()
    assert not errors, errors[:3]
    assert moved_in < 15, f"the CPU replicas moved in {moved_in:.1f}s"
    # With host-b gone, nothing can run the GPU API: it says so.
    assert set(registry.hosts.all()) == {"host-a"}
    status = wait_until(
        lambda: (s := registry.replicas.status("gpu-api")).reason.endswith("host has 0") and s, 20,
        what="gpu-api waits for a GPU host after host-b left",
    )
    assert status.status == "compute unavailable"
    assert status.reason == "3 replica(s) cannot be placed: needs gpu 1, host has 0"


def test_a_new_host_lets_waiting_replicas_start(registry, scalers, tmp_path):
    deploy(two_apis(tmp_path), registry)
    scalers.start("host-a", gpus=0)
    wait_until(lambda: registry.replicas.status("gpu-api")
               and registry.replicas.status("gpu-api").status == "compute unavailable", 30,
               what="gpu-api waits for a GPU host")
    scalers.start("host-b", gpus=3)
    wait_until(lambda: live_by_host(registry, "gpu-api") == {"host-b": 3}, 90,
               what="3 GPU replicas on the new host")
    wait_until(lambda: registry.replicas.status("gpu-api").status == "live", 10,
               what="gpu-api live")
