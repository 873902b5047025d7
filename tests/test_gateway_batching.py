"""Dynamic batching at the gateway (``predictor.server_side_batching``), over real HTTP and
real replicas: concurrent requests travel together, and each caller keeps its own answer,
its own 500 and its own 504."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers import assert_json, post, write_project

from inferq.deploy import deploy
from inferq.processes import wait_until

# Every sample that reaches the predictor is recorded with the size of the call it came in.
# "hold" blocks until the file it names exists; "fail" raises.
PREDICTOR = """
import json
import os
import time


def _record(samples, metadata):
    with open(metadata["record"], "a") as handle:
        for sample in samples:
            handle.write(json.dumps({"sample": sample, "batch": len(samples)}) + "\\n")


def _answer(sample, size):
    if "hold" in sample:
        deadline = time.monotonic() + 60
        while not os.path.exists(sample["hold"]) and time.monotonic() < deadline:
            time.sleep(0.01)
    if "fail" in sample:
        raise ValueError(sample["fail"])
    return {"id": sample["id"], "batch": size}


def predict(sample, metadata):
    _record([sample], metadata)
    return _answer(sample, 1)


def predict_batch(samples, metadata):
    _record(samples, metadata)
    return [_answer(sample, len(samples)) for sample in samples]
"""


def deploy_batching(registry, tmp_path: Path, *, size: int = 8, interval: str = "300ms",
                    timeout: str = "30s") -> Path:
    record = tmp_path / "record.jsonl"
    record.touch()
    deploy(write_project(tmp_path / "project", f"""
        - kind: deployment
          name: shop
        - kind: api
          name: batched
          predictor:
            path: predictor.py
            metadata: {{record: "{record}"}}
            server_side_batching: {{max_batch_size: {size}, batch_interval: {interval}}}
          compute: {{timeout: {timeout}}}
        """, {"predictor.py": PREDICTOR}), registry)
    return record


def recorded(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_concurrent_requests_reach_predict_batch_together_each_with_its_own_answer(
        registry, replicas, gateway, tmp_path):
    record = deploy_batching(registry, tmp_path, size=8, interval="500ms")
    replicas.start("batched")
    url = gateway.url + "/shop/batched"
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda n: assert_json(post(url, {"id": n}), 200), range(8)))
    assert [a["id"] for a in answers] == list(range(8))
    assert max(a["batch"] for a in answers) > 1  # they travelled together
    assert sorted(r["sample"]["id"] for r in recorded(record)) == list(range(8))


def test_good_and_bad_requests_in_one_batch_each_get_their_own_answer(
        registry, replicas, gateway, tmp_path):
    deploy_batching(registry, tmp_path, size=6, interval="500ms")
    replicas.start("batched")
    url = gateway.url + "/shop/batched"
    samples = [{"id": n} if n % 3 else {"id": n, "fail": f"bad sample {n}"} for n in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda s: post(url, s), samples))
    for sample, response in zip(samples, responses, strict=True):
        if "fail" in sample:
            body = assert_json(response, 500)
            assert body["error"] == f"prediction failed: bad sample {sample['id']}"
        else:
            assert assert_json(response, 200)["id"] == sample["id"]


def test_a_caller_that_times_out_gets_its_504_and_its_sample_never_runs(
        registry, replicas, gateway, tmp_path):
    record = deploy_batching(registry, tmp_path, size=4, interval="50ms", timeout="2s")
    replicas.start("batched")
    url = gateway.url + "/shop/batched"
    release = tmp_path / "release"
    with ThreadPoolExecutor(max_workers=2) as pool:
        held = pool.submit(post, url, {"id": "held", "hold": str(release)})
        wait_until(lambda: any(r["sample"]["id"] == "held" for r in recorded(record)), 30,
                   what="the replica held")
        late = assert_json(post(url, {"id": "late"}), 504)  # waits behind the held batch
        assert late["error"].startswith("timeout: ")
        release.touch()
        assert held.result(timeout=30).status_code == 504  # it, too, outlived its 2 s
    assert assert_json(post(url, {"id": "after"}), 200)["id"] == "after"
    assert [r["sample"]["id"] for r in recorded(record)] == ["held", "after"]


def test_without_the_key_each_request_is_its_own_message(registry, replicas, gateway, tmp_path):
    record = tmp_path / "record.jsonl"
    record.touch()
    deploy(write_project(tmp_path / "plain", f"""
        - kind: deployment
          name: shop
        - kind: api
          name: batched
          predictor: {{path: predictor.py, metadata: {{record: "{record}"}}}}
        """, {"predictor.py": PREDICTOR}), registry)
    replicas.start("batched")
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(
            lambda n: assert_json(post(gateway.url + "/shop/batched", {"id": n}), 200), range(8)))
    assert {a["batch"] for a in answers} == {1}
