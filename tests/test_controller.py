"""``inferq controller``: the scaler's work where Kubernetes runs the replicas.

Replicas here are started by hand (``inferq worker API``, as a replica Deployment's pod runs
it) and killed as Kubernetes kills pods; the controller never starts one. It puts back what a
killed replica held once its liveness signal lapses, rolls replicas onto a redeployed
version one at a time, judges statuses, and serves the number KEDA scales on.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests
from helpers import Controller, copy_example, write_project

from inferq import keys
from inferq.client import Client
from inferq.deploy import deploy
from inferq.processes import pid_alive, wait_until
from inferq.registry import ReplicaRecord, ReplicaStatus
from inferq.scaler.controller import next_reload
from inferq.scaler.decide import Load

# A replica is judged dead once its signal lapsed and the controller watched that long.
LAPSE_SECONDS = 2 * keys.ALIVE_TTL_SECONDS + 15

GATED = """
- kind: deployment
  name: gated

- kind: api
  name: gated
  predictor:
    path: predictor.py
    metadata:
      gate: {gate}
  compute:
    min_replicas: 0
    max_replicas: 2
"""
GATED_PREDICTOR = """
import os
import time


def predict(sample, metadata):
    # Answers once the test opens the gate: the request stays in flight until then.
    while not os.path.exists(metadata["gate"]):
        time.sleep(0.01)
    return sample
"""


def record(replica: str, version: str = "v2", status=ReplicaStatus.LIVE) -> ReplicaRecord:
    return ReplicaRecord(replica, status=status, version=version)


def test_replicas_reload_a_new_version_one_at_a_time_while_all_are_live():
    old = [record("a", "v1"), record("b", "v1")]
    assert next_reload("v2", old, failed=False) == "a"
    assert next_reload("v2", [record("a"), record("b", "v1")], failed=False) == "b"
    assert next_reload("v2", [record("a"), record("b")], failed=False) is None
    # one is still starting (or reloading): wait for it, capacity drops by one at most
    starting = [record("a", status=ReplicaStatus.CREATING), record("b", "v1")]
    assert next_reload("v2", starting, failed=False) is None
    # a replica failed on the new version: the old ones serve on
    assert next_reload("v2", old, failed=True) is None
    assert next_reload("v2", [], failed=False) is None


@pytest.fixture
def controllers(redis_url, tmp_path):
    started: list[Controller] = []

    def start(name: str = "controller-a") -> Controller:
        controller = Controller(redis_url, tmp_path / f"{name}.log", name)
        started.append(controller)
        controller.wait_answering()
        return controller

    yield start
    for controller in started:
        controller.stop()


def test_the_endpoint_reads_zero_for_an_api_not_deployed_and_404_elsewhere(controllers):
    controller = controllers()
    assert controller.scaling("nothing") == {"api": "nothing", "deployed": False, "value": 0,
                                             "queued": 0, "in_flight": 0, "live": 0}
    assert requests.get(controller.url + "/scaling", timeout=10).json() == {"apis": []}
    missing = requests.get(controller.url + "/metrics", timeout=10)
    assert missing.status_code == 404 and missing.headers["Content-Type"] == "application/json"


def test_a_killed_replicas_request_is_put_back_once_its_signal_lapses(
        registry, replicas, controllers, tmp_path):
    gate = tmp_path / "gate"
    project = write_project(tmp_path / "gated", GATED.format(gate=gate),
                            {"predictor.py": GATED_PREDICTOR})
    deploy(project, registry)
    controller = controllers()
    first = replicas.start("gated")
    with Client(registry.url) as client:
        request_id = client.enqueue("gated", {"n": 1})
        wait_until(lambda: controller.scaling("gated")["in_flight"] == 1, 30,
                   what="the request in flight")
        # the pod is killed: its supervisor and serving process at once, nothing can recover
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        wait_until(lambda: controller.scaling("gated")["queued"] == 1, LAPSE_SECONDS,
                   what="the request put back")
        assert not registry.replicas.of("gated")  # its record is forgotten
        assert "stopped renewing its liveness signal" in controller.log()
        replicas.start("gated")  # Kubernetes starts a pod again
        gate.touch()
        wait_until(lambda: client.status("gated", request_id)["status"] == "completed", 60,
                   what="the request answered by the new replica")
        assert client.status("gated", request_id)["result"] == {"n": 1}


def test_a_redeploy_rolls_the_replicas_onto_the_new_version_one_at_a_time(
        registry, replicas, controllers, tmp_path):
    project = copy_example("iris", tmp_path)
    deploy(project, registry)
    processes = [replicas.start("classifier") for _ in range(2)]
    controller = controllers()
    ids = sorted(r.id for r in registry.replicas.of("classifier"))
    sample = {"sepal_length": 5.2, "sepal_width": 3.6, "petal_length": 1.4, "petal_width": 0.3}
    answers: list[object] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def traffic() -> None:
        with Client(registry.url) as client:
            while not done.is_set():
                try:
                    answers.append(client.predict("classifier", sample))
                except Exception as exc:  # any failure during the roll is the test's failure
                    failures.append(exc)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        with open(project / "predictor.py", "a") as predictor:
            predictor.write("\n# a change: a new version\n")
        deploy(project, registry)
        version = registry.deployments.api("classifier").version
        most_down = 0

        def rolled() -> bool:
            nonlocal most_down
            records = registry.replicas.of("classifier")
            most_down = max(most_down, sum(r.status != ReplicaStatus.LIVE for r in records))
            return len(records) == 2 and all(
                r.version == version and r.status == ReplicaStatus.LIVE for r in records)

        wait_until(rolled, 60, interval=0.02, what="both replicas on the new version")
    finally:
        done.set()
        sender.join(timeout=60)
    assert not failures, failures[:3]
    assert answers and all(a == "setosa" for a in answers)
    assert most_down <= 1, "more than one replica reloaded at once"
    # the same replicas (supervisors) serve it: each restarted its serving process warm
    assert sorted(r.id for r in registry.replicas.of("classifier")) == ids
    assert all(p.poll() is None and pid_alive(p.pid) for p in processes)
    assert controller.log().count("reloads the deployed version") == 2


def test_a_replica_that_cannot_start_makes_its_api_an_error(registry, replicas, controllers,
                                                            tmp_path):
    project = write_project(tmp_path / "broken", """
        - kind: deployment
          name: broken

        - kind: api
          name: broken
          predictor:
            path: predictor.py
        """, {"predictor.py": """
        def init(model_path, metadata):
            raise RuntimeError("the weights are missing")


        def predict(sample, metadata):
            return sample
        """})
    deploy(project, registry)
    controllers()
    process = replicas.start("broken", wait_live=False)
    assert process.wait(timeout=60) == 3  # Kubernetes restarts it (CrashLoopBackOff)

    def judged():
        state = registry.replicas.status("broken")
        return state if state is not None and state.status == "error" else None

    state = wait_until(judged, 30, what="the API judged an error")
    assert "the weights are missing" in state.reason
    assert not registry.replicas.of("broken")  # the failure is kept, the record gone
    with Client(registry.url) as client:
        started = time.monotonic()
        with pytest.raises(Exception, match="the weights are missing"):
            client.predict("broken", {"x": 1})  # refused at once, not after the timeout
        assert time.monotonic() - started < 5


def test_a_replica_renews_its_signal_while_it_runs_and_removes_it_when_it_stops(
        registry, replicas, tmp_path):
    deploy(copy_example("iris", tmp_path), registry)
    process = replicas.start("classifier")
    (replica,) = registry.replicas.of("classifier")
    assert registry.liveness.alive("classifier", [replica.id]) == {replica.id}
    ttl = registry.redis.pttl(keys.alive("classifier", replica.id))
    assert 0 < ttl <= keys.ALIVE_TTL_SECONDS * 1000
    # Kubernetes stops the pod: SIGTERM, a warm shutdown
    wait_until(lambda: " ready." in replicas.log(process), 30, what="Celery's loop")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert registry.liveness.alive("classifier", [replica.id]) == set()
    assert registry.replicas.of("classifier") == []


def test_a_controller_judges_a_signal_lapsed_only_after_watching_as_long_as_one_lives(
        registry, tmp_path, monkeypatch):
    """A new leader (or one back from a broker outage) gives every live replica the time to
    renew its signal before it judges any: a missing key alone is no death."""
    from inferq.scaler.controller import Controller
    from inferq.scaler.decide import Autoscaler

    monkeypatch.setattr(keys, "ALIVE_TTL_SECONDS", 0.5)
    deploy(copy_example("iris", tmp_path), registry)
    registry.replicas.update("classifier", "pod-1", status=ReplicaStatus.LIVE)
    registry.redis.rpush(keys.taken("classifier", "pod-1"), '{"headers": {"id": "held"}}')
    controller = Controller(registry, "controller-a", Autoscaler(), lambda api, records: Load())
    controller.tick()
    assert [r.id for r in registry.replicas.of("classifier")] == ["pod-1"]  # not judged yet
    started = time.monotonic()

    def recovered() -> bool:
        controller.tick()
        return not registry.replicas.of("classifier")

    wait_until(recovered, 10, interval=0.05, what="the lapsed replica recovered")
    assert time.monotonic() - started >= 0.5
    assert registry.queues.length(keys.queue("classifier")) == 1  # what it held, put back
    assert registry.replicas.status("classifier").status == "pending"


def test_the_controller_consumes_a_stream_and_keda_sees_its_backlog(registry, replicas,
                                                                     controllers, tmp_path):
    folder = copy_example("iris", tmp_path)
    with open(folder / "cortex.yaml", "a") as file:
        file.write("  stream:\n    source: iris:samples\n")
    deploy(folder, registry)
    controller = controllers()
    sample = (folder / "sample.json").read_text()
    ids = [registry.redis.xadd("iris:samples", {"data": sample}).decode() for _ in range(5)]
    # At zero replicas (KEDA has not started one yet) the backlog is what KEDA reads.
    wait_until(lambda: controller.scaling("classifier")["value"] == 5, 30,
               what="the stream's backlog in the number KEDA scales on")
    replicas.start("classifier")  # KEDA starts a pod
    wait_until(lambda: registry.redis.xlen("iris:samples:predictions") == 5, 60,
               what="the stream answered")
    answers = [fields for _, fields in registry.redis.xrange("iris:samples:predictions")]
    assert [a[b"source_id"].decode() for a in answers] == ids
    assert {a[b"result"] for a in answers} == {b'"setosa"'}
    wait_until(lambda: controller.scaling("classifier")["value"] == 0, 30,
               what="nothing left to scale on")
