"""The scaler with real replica processes: bounds, autoscaling, resources, recovery, rollouts."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from helpers import write_project

from inferq import Client, PredictionError
from inferq.cli.tables import snapshot
from inferq.deploy import deploy
from inferq.processes import wait_until

PREDICTOR = """
import os, time

def init(model_path, metadata):
    if metadata.get("fail"):
        raise RuntimeError("init failed on purpose")

def predict(sample, metadata):
    global hog
    if sample.get("hog"):
        hog = b"x" * (sample["hog"] * 2**20)  # touched pages: really resident
    while sample.get("gate") and not os.path.exists(sample["gate"]):  # held until the test says
        time.sleep(0.01)
    time.sleep(sample.get("sleep", metadata.get("sleep", 0)))
    return {"pid": os.getpid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "version": metadata.get("version", "v1")}
"""


def project(tmp_path, compute: str, metadata: str = "{}", name: str = "svc",
            api: str = "work"):
    return write_project(
        tmp_path / "project",
        f"""
        - kind: deployment
          name: {name}
        - kind: api
          name: {api}
          predictor:
            path: predictor.py
            metadata: {metadata}
          compute: {compute}
        """,
        {"predictor.py": PREDICTOR},
    )


def live(registry, api: str, version: str | None = None) -> list[dict]:
    return [
        r for r in registry.replicas.of(api)
        if r.status == "live" and (version is None or r.version == version)
    ]


def wait_live(registry, api: str, count: int, timeout: float = 60, exactly=True):
    def enough():
        found = live(registry, api)
        return found if (len(found) == count if exactly else len(found) >= count) else None

    return wait_until(enough, timeout, what=f"{count} live replica(s) of {api}")


def wait_status(registry, api: str, status: str, timeout: float = 60) -> dict:
    return wait_until(
        lambda: (s := registry.replicas.status(api)) and s.status == status and s,
        timeout, what=f'{api} is "{status}" (now {registry.replicas.status(api)})',
    )


@pytest.fixture
def client(redis_url):
    with Client(redis_url) as c:
        yield c


def test_init_replicas_start_then_the_api_settles_at_min_replicas(registry, scalers, tmp_path):
    deploy(project(tmp_path, "{min_replicas: 1, max_replicas: 3, init_replicas: 2, "
                             "downscale_stabilization_period: 10s}"), registry)
    scalers.start()
    wait_live(registry, "work", 2)
    wait_status(registry, "work", "live", timeout=5)
    wait_live(registry, "work", 1, timeout=30)
    assert registry.replicas.status("work").requested == 1


def test_a_backlog_scales_up_to_max_and_the_quiet_after_it_scales_down(
        registry, scalers, client, tmp_path):
    deploy(project(tmp_path, "{min_replicas: 1, max_replicas: 3, "
                             "downscale_stabilization_period: 3s}"), registry)
    scalers.start()
    wait_live(registry, "work", 1)
    futures = [client.submit("work", {"sleep": 0.3}, timeout=60) for _ in range(40)]
    wait_live(registry, "work", 3, timeout=30)
    answered_by = {f.result(timeout=60)["pid"] for f in futures}
    assert len(answered_by) == 3  # the new replicas took queued work
    assert len(registry.replicas.of("work")) <= 3  # never above max_replicas
    wait_live(registry, "work", 1, timeout=40)


def test_min_replicas_zero_scales_from_zero_when_a_request_waits(
        registry, scalers, client, tmp_path):
    deploy(project(tmp_path, "{min_replicas: 0, max_replicas: 1, "
                             "downscale_stabilization_period: 2s}"), registry)
    scalers.start()
    wait_status(registry, "work", "stopped")
    assert registry.replicas.of("work") == []
    assert client.predict("work", {}, timeout=60)["version"] == "v1"  # waited, did not fail
    wait_status(registry, "work", "stopped", timeout=30)


def test_a_gpu_api_on_a_host_without_gpus_is_compute_unavailable(registry, scalers, tmp_path):
    deploy(project(tmp_path, "{gpu: 1}"), registry)
    scalers.start(gpus=0)
    status = wait_status(registry, "work", "compute unavailable")
    assert "needs gpu 1, host has 0" in status.reason
    assert registry.replicas.of("work") == []


def test_gpu_replicas_each_get_their_own_gpu(registry, scalers, client, tmp_path):
    deploy(project(tmp_path, "{gpu: 1, min_replicas: 2, max_replicas: 3}"), registry)
    scalers.start(gpus=2)
    replicas = wait_live(registry, "work", 2)
    assert sorted(r.gpus for r in replicas) == [(0,), (1,)]
    seen = {}
    futures = [client.submit("work", {"sleep": 0.2}) for _ in range(8)]
    for future in futures:
        answer = future.result(timeout=60)
        seen[answer["pid"]] = answer["gpus"]
    assert sorted(seen.values()) == ["0", "1"]
    # A third replica would need a third GPU: it waits, and the status says why.
    deploy(project(tmp_path, "{gpu: 1, min_replicas: 3, max_replicas: 3}"), registry)
    status = wait_status(registry, "work", "compute unavailable")
    assert "needs gpu 1, host has 0 free (2 in total)" in status.reason


def test_a_replica_over_its_mem_request_is_stopped_and_the_api_recovers(
        registry, scalers, client, tmp_path):
    deploy(project(tmp_path, "{mem: 400Mi}"), registry)
    scalers.start()
    (first,) = wait_live(registry, "work", 1)
    future = client.submit("work", {"hog": 600, "sleep": 30}, timeout=60)
    status = wait_status(registry, "work", "error (out of memory)", timeout=30)
    assert "400Mi" in status.reason
    with pytest.raises(PredictionError, match="ran out of memory while predicting"):
        future.result(timeout=10)  # answered at once, not after the request's timeout
    wait_status(registry, "work", "live", timeout=60)
    (second,) = live(registry, "work")
    assert second.id != first.id


def test_an_init_failure_shows_error_with_the_traceback_and_backs_off(
        registry, scalers, tmp_path):
    deploy(project(tmp_path, "{min_replicas: 1}", metadata="{fail: true}"), registry)
    scalers.start()
    status = wait_status(registry, "work", "error")
    assert "RuntimeError: init failed on purpose" in status.reason
    assert "predictor.py" in status.reason
    # Restarts back off (1 s, 2 s, 4 s ...): no tight crash loop.
    wait_until(lambda: scalers.log().count("started replica") >= 3, 30, what="3 attempts")
    starts = scalers.log().count("started replica")
    assert starts <= 5, scalers.log()


def test_a_killed_replica_is_replaced(registry, scalers, client, tmp_path):
    deploy(project(tmp_path, "{min_replicas: 1}"), registry)
    scalers.start()
    (first,) = wait_live(registry, "work", 1)
    os.kill(first.replica_pid, signal.SIGKILL)
    wait_until(
        lambda: [r for r in live(registry, "work") if r.id != first.id], 30,
        what="a new replica live",
    )
    assert client.predict("work", {}, timeout=30)["version"] == "v1"


@pytest.mark.parametrize("process", ["replica_pid", "pid"])
def test_a_replica_killed_mid_request_has_its_request_answered_by_the_other(
        registry, scalers, client, tmp_path, process):
    """SIGKILL of a replica (its supervisor, or the serving process) while it predicts: the
    request is put back at once and answered by the other replica, within predict time + 5 s
    (kombu alone would leave it unacknowledged for its hour-long visibility timeout)."""
    deploy(project(tmp_path, "{min_replicas: 2, max_replicas: 2}"), registry)
    scalers.start()
    wait_live(registry, "work", 2)
    gate = tmp_path / "gate"
    future = client.submit("work", {"sleep": 1.0, "gate": str(gate)}, timeout=30)

    def holder():
        busy = registry.queues.in_flight("work")
        return next((r for r in registry.replicas.of("work")
                     if future.task_id in busy.get(r.id, [])), None)

    record = wait_until(holder, 10, what="a replica predicting the request")
    os.kill(getattr(record, process), signal.SIGKILL)  # held: it cannot have answered
    gate.touch()
    answer = future.result(timeout=1.0 + 5)
    assert answer["pid"] != record.pid  # the other replica answered
    assert registry.queues.in_flight("work", [record.id]) == {}
    wait_live(registry, "work", 2)  # and the killed one is replaced


def test_a_redeploy_rolls_over_without_a_failed_request(registry, scalers, gateway, tmp_path):
    folder = project(tmp_path, "{min_replicas: 2, max_replicas: 2}", metadata="{version: v1}")
    deploy(folder, registry)
    scalers.start()
    wait_live(registry, "work", 2)
    answers: list = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            response = gateway.post("/svc/work", {"sleep": 0.05})
            answers.append((response.status_code, response.json()))

    sender = threading.Thread(target=loop)
    sender.start()
    try:
        wait_until(lambda: len(answers) >= 5, 30, what="requests flowing")
        project(tmp_path, "{min_replicas: 2, max_replicas: 2}", metadata="{version: v2}")
        deploy(folder, registry)
        version = registry.deployments.api("work").version
        wait_until(lambda: len(live(registry, "work", version)) == 2
                   and len(registry.replicas.of("work")) == 2, 60, what="rolled over")
        count = len(answers)
        wait_until(lambda: len(answers) >= count + 5, 30, what="requests after the rollout")
    finally:
        stop.set()
        sender.join()
    failures = [a for a in answers if a[0] != 200]
    assert not failures, failures[:3]
    versions = [body["version"] for _, body in answers]
    assert versions[0] == "v1" and versions[-1] == "v2"


def test_delete_drains_the_replicas_and_forgets_the_api(registry, scalers, client, tmp_path):
    deploy(project(tmp_path, "{min_replicas: 2}"), registry)
    scalers.start()
    replicas = wait_live(registry, "work", 2)
    held = client.submit("work", {"sleep": 3})
    wait_until(lambda: registry.queues.in_flight("work"), 10, what="a request in flight")
    registry.deployments.delete("svc")
    rows = wait_until(lambda: [r for r in snapshot(registry) if r["status"] == "stopping"], 10,
                      what="the deleted API shows as stopping")
    assert rows[0]["api"] == "work"
    assert held.result(timeout=30)["version"] == "v1"  # the request it held was answered
    wait_until(lambda: not registry.replicas.of("work")
               and registry.replicas.status("work") is None, 30,
               what="replicas drained and the API forgotten")
    from inferq.processes import pid_alive
    wait_until(lambda: not any(pid_alive(r.replica_pid) for r in replicas), 30,
               what="replica processes gone")


def test_a_killed_scaler_leaves_no_replica_and_its_successor_adopts_nothing(
        registry, scalers, tmp_path):
    deploy(project(tmp_path, "{min_replicas: 2}"), registry)
    scalers.start()
    old = wait_live(registry, "work", 2)
    scalers.kill("host-a")
    from inferq.processes import pid_alive
    wait_until(lambda: not any(pid_alive(r.pid) or pid_alive(r.replica_pid) for r in old),
               20, what="replicas died")
    scalers.start()
    old_ids = {r.id for r in old}
    wait_until(lambda: len([r for r in live(registry, "work") if r.id not in old_ids]) == 2,
               60, what="2 new replicas live")
    assert not old_ids & {r.id for r in registry.replicas.of("work")}  # nothing adopted
