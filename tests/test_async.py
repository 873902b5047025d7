"""Async requests over real HTTP and real replicas: 202 at once, the state in Redis, any
gateway answers for any id, retention, and the Python client's enqueue/status."""

from __future__ import annotations

import pytest
import requests
from helpers import assert_json, post, write_project

from inferq import Client, UnknownRequest
from inferq.deploy import deploy
from inferq.processes import wait_until

# "gate": wait until the file exists; "fail": raise.
PREDICTOR = """
import os, time

def predict(sample, metadata):
    deadline = time.monotonic() + 60
    while "gate" in sample and not os.path.exists(sample["gate"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    if "fail" in sample:
        raise ValueError(sample["fail"])
    return {"echo": sample["id"]}
"""


def deploy_jobs(registry, tmp_path, compute: str = "{}"):
    deploy(write_project(tmp_path / "project", f"""
        - kind: deployment
          name: shop
        - kind: api
          name: later
          predictor: {{path: predictor.py}}
          compute: {compute}
        """, {"predictor.py": PREDICTOR}), registry)


def state(gateway, request_id: str, status: int = 200) -> dict:
    return assert_json(requests.get(f"{gateway.url}/shop/later/{request_id}", timeout=10),
                       status)


def test_an_async_request_goes_from_in_queue_to_completed(registry, replicas, gateway, tmp_path):
    deploy_jobs(registry, tmp_path, "{timeout: 1s}")  # the sync timeout does not apply
    gate = tmp_path / "gate"
    accepted = assert_json(post(gateway.url + "/shop/later?async=true",
                                {"id": "a", "gate": str(gate)}), 202)
    request_id = accepted["id"]
    assert state(gateway, request_id) == {"id": request_id, "status": "in_queue"}
    assert registry.queues.length("inferq.later") == 1  # waits like any other request

    replicas.start("later")  # well past the 1 s sync timeout
    wait_until(lambda: state(gateway, request_id)["status"] == "in_progress", 30,
               what="the request in progress")
    gate.touch()
    done = wait_until(lambda: (s := state(gateway, request_id))["status"] == "completed" and s,
                      30, what="the request completed")
    assert done == {"id": request_id, "status": "completed", "result": {"echo": "a"}}


def test_a_failed_async_request_keeps_its_error(registry, replicas, gateway, tmp_path):
    deploy_jobs(registry, tmp_path)
    replicas.start("later")
    request_id = assert_json(post(gateway.url + "/shop/later?async=true",
                                  {"id": "b", "fail": "cannot score b"}), 202)["id"]
    failed = wait_until(lambda: (s := state(gateway, request_id))["status"] == "failed" and s,
                        30, what="the request failed")
    assert failed == {"id": request_id, "status": "failed", "error": "cannot score b"}


def test_unknown_ids_and_ids_past_their_retention_are_404(registry, replicas, gateway, tmp_path):
    deploy_jobs(registry, tmp_path, "{async_retention: 2s}")
    replicas.start("later")
    assert "no async request" in state(gateway, "nope", 404)["error"]
    request_id = assert_json(post(gateway.url + "/shop/later?async=true", {"id": "c"}), 202)["id"]
    wait_until(lambda: state(gateway, request_id)["status"] == "completed", 30,
               what="the request completed")
    wait_until(lambda: requests.get(f"{gateway.url}/shop/later/{request_id}",
                                    timeout=10).status_code == 404, 10,
               what="the state gone after its retention")
    assert_json(requests.get(gateway.url + "/shop/nowhere/x", timeout=10), 404)


def test_any_gateway_answers_for_an_id_after_the_first_is_restarted(registry, replicas,
                                                                   start_gateway, tmp_path):
    deploy_jobs(registry, tmp_path)
    first = start_gateway()
    request_id = assert_json(post(first.url + "/shop/later?async=true", {"id": "d"}), 202)["id"]
    first.stop()
    second = start_gateway()
    replicas.start("later")
    done = wait_until(lambda: (s := state(second, request_id))["status"] == "completed" and s,
                      30, what="the request completed")
    assert done["result"] == {"echo": "d"}


def test_the_python_client_enqueues_and_reads_the_status(registry, replicas, tmp_path):
    deploy_jobs(registry, tmp_path)
    with Client(registry.url) as client:
        request_id = client.enqueue("later", {"id": "e"})
        assert client.status("later", request_id)["status"] in ("in_queue", "in_progress",
                                                                "completed")
        replicas.start("later")
        done = wait_until(lambda: (s := client.status("later", request_id))["status"]
                          == "completed" and s, 30, what="completed")
        assert done["result"] == {"echo": "e"}
        with pytest.raises(UnknownRequest):
            client.status("later", "nope")


def test_an_async_request_scales_an_idle_api_from_zero(registry, scalers, tmp_path):
    deploy_jobs(registry, tmp_path, "{min_replicas: 0, max_replicas: 1}")
    scalers.start()
    wait_until(lambda: (s := registry.replicas.status("later")) and s.status == "stopped", 60,
               what="the API stopped at zero replicas")
    with Client(registry.url) as client:
        request_id = client.enqueue("later", {"id": "f"})
        done = wait_until(lambda: (s := client.status("later", request_id))["status"]
                          == "completed" and s, 60, what="a replica started and answered")
    assert done["result"] == {"echo": "f"}
