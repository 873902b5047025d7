"""Batch jobs over real replicas, real scalers (which drive jobs) and a real S3 server.

The predictor writes one line per prediction to a file, so a test can count how often each
sample was predicted: a job that is stopped and resumed, or whose driver is SIGKILLed, must
predict every sample exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest
import requests
from helpers import S3_PART_MIN_BYTES, Scalers, inferq_command, write_project

from inferq import Client, JobError, UnknownAPI
from inferq.deploy import deploy
from inferq.processes import pid_alive, wait_until
from inferq.registry import Registry
from inferq.stack import EmbeddedRedis

# Each prediction appends its sample's id to PREDICTED (O_APPEND: whole lines, from any
# number of replicas). "fail": raise; "slow": sleep that long first.
PREDICTOR = """
import os, time

def init(model_path, metadata):
    global log
    log = os.open(metadata["predicted"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)

def predict(sample, metadata):
    time.sleep(float(metadata.get("slow", 0)))
    os.write(log, f"{sample['id']}\\n".encode())
    if "fail" in sample:
        raise ValueError(sample["fail"])
    return {"id": sample["id"], "double": sample["x"] * 2}
"""


def deploy_scorer(registry, tmp_path, *, replicas: int = 1, slow: float = 0,
                  compute: str | None = None) -> str:
    predicted = tmp_path / "predicted.log"
    compute = compute or f"{{min_replicas: {replicas}, max_replicas: {replicas}, cpu: 100m}}"
    deploy(write_project(tmp_path / "project", f"""
        - kind: deployment
          name: shop
        - kind: api
          name: scorer
          predictor:
            path: predictor.py
            metadata: {{predicted: "{predicted}", slow: "{slow}"}}
          compute: {compute}
        """, {"predictor.py": PREDICTOR}), registry)
    return str(predicted)


def write_samples(path, count: int, *, fail: set[int] = frozenset(), bad: set[int] = frozenset(),
                  first: int = 0) -> list[str]:
    lines = []
    for i in range(first, first + count):
        if i in bad:
            lines.append("{not json")
        elif i in fail:
            lines.append(json.dumps({"id": i, "x": i, "fail": f"cannot score {i}"}))
        else:
            lines.append(json.dumps({"id": i, "x": i}))
    path.write_text("\n".join(lines) + "\n")
    return lines


def predicted_counts(path: str) -> Counter:
    if not os.path.exists(path):
        return Counter()
    with open(path) as file:
        return Counter(int(line) for line in file if line.strip())


def read_lines(path) -> list[dict]:
    with open(path) as file:
        return [json.loads(line) for line in file]


def wait_ended(client: Client, job_id: str, timeout: float = 90) -> dict:
    return wait_until(lambda: (s := client.job(job_id).status())["status"] in (
        "succeeded", "completed with failures", "failed", "stopped") and s, timeout,
        what=f"job {job_id} ended")


@pytest.fixture
def client(redis_url):
    with Client(redis_url) as client:
        yield client


def test_a_job_from_a_local_file_keeps_input_order_and_a_dead_letter(
        registry, scalers, client, tmp_path):
    predicted = deploy_scorer(registry, tmp_path, replicas=2)
    scalers.start()
    source = tmp_path / "in.jsonl"
    write_samples(source, 500, fail={7, 300}, bad={42})

    done = subprocess.run(inferq_command("batch", "submit", "scorer", str(source), "--wait",
                                         "--batch-size", "16", "--window", "64"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # --wait: 0 only for a job that succeeded
    assert "completed with failures" in done.stdout
    assert "497 done, 3 failed, of 500" in done.stdout

    out = read_lines(tmp_path / "in.predictions.jsonl")
    assert [line["index"] for line in out] == list(range(500))
    assert out[1] == {"index": 1, "result": {"id": 1, "double": 2}}
    assert out[7] == {"index": 7, "error": "cannot score 7"}
    assert "not JSON" in out[42]["error"] and "in.jsonl" in out[42]["error"]
    dead = read_lines(tmp_path / "in.predictions.failed.jsonl")
    assert [(d["index"], d["error"]) for d in dead if d["index"] != 42] == [
        (7, "cannot score 7"), (300, "cannot score 300")]
    assert dead[0]["sample"] == {"id": 7, "x": 7, "fail": "cannot score 7"}
    assert dead[1] == {"index": 42, "sample": "{not json", "error": out[42]["error"]}
    counts = predicted_counts(predicted)
    assert set(counts) == set(range(500)) - {42} and set(counts.values()) == {1}

    listing = subprocess.run(inferq_command("batch", "get"), capture_output=True, text=True,
                             timeout=30)
    assert "completed with failures" in listing.stdout and "scorer" in listing.stdout


def test_a_job_over_an_s3_prefix_writes_to_s3_in_order(registry, scalers, client, s3, tmp_path):
    predicted = deploy_scorer(registry, tmp_path, replicas=2)
    scalers.start()
    s3.create_bucket(Bucket="data")
    for part, first in (("a.jsonl", 0), ("b.jsonl", 150)):
        local = tmp_path / part
        write_samples(local, 150, first=first, fail={160})
        s3.upload_file(str(local), "data", f"in/{part}")
    s3.put_object(Bucket="data", Key="in/README.txt", Body=b"not an input")

    job = client.batch("scorer", "s3://data/in/", "s3://data/out/scores.jsonl", batch_size=32)
    state = job.wait(timeout=90)
    assert (state["status"], state["done"], state["failed"], state["total"]) == (
        "completed with failures", 299, 1, 300)
    assert state["dead_letter"] == "s3://data/out/scores.failed.jsonl"

    body = s3.get_object(Bucket="data", Key="out/scores.jsonl")["Body"].read()
    out = [json.loads(line) for line in body.decode().splitlines()]
    assert [line["index"] for line in out] == list(range(300))
    assert [line["result"]["id"] for line in out if "result" in line] == \
        [i for i in range(300) if i != 160]
    dead = s3.get_object(Bucket="data", Key="out/scores.failed.jsonl")["Body"].read()
    assert [json.loads(line) for line in dead.decode().splitlines()] == [
        {"index": 160, "sample": {"id": 160, "x": 160, "fail": "cannot score 160"},
         "error": "cannot score 160"}]
    assert set(predicted_counts(predicted).values()) == {1}


def test_a_stopped_job_resumes_without_predicting_a_sample_twice(
        registry, scalers, client, tmp_path):
    predicted = deploy_scorer(registry, tmp_path, replicas=2, slow=0.002)
    scalers.start()
    source = tmp_path / "in.jsonl"
    write_samples(source, 3000)
    job = client.batch("scorer", str(source), batch_size=8, window=64)
    wait_until(lambda: job.status()["done"] >= 200, 60, what="the job under way")

    stop = subprocess.run(inferq_command("batch", "stop", job.id), capture_output=True,
                          text=True, timeout=30)
    assert stop.returncode == 0 and "stop" in stop.stdout
    stopped = wait_ended(client, job.id)
    assert stopped["status"] == "stopped"
    assert 200 <= stopped["done"] < 3000
    # What was predicted is written (chunks the replicas held when it stopped wait for the
    # resume in Redis), and nothing more is predicted while it is stopped.
    settled = sum(predicted_counts(predicted).values())
    assert settled - stopped["done"] <= 64
    assert len(read_lines(tmp_path / "in.predictions.jsonl")) == stopped["done"]

    resumed = subprocess.run(inferq_command("batch", "submit", "--resume", job.id, "--wait"),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert job.status()["status"] == "succeeded"
    counts = predicted_counts(predicted)
    assert set(counts) == set(range(3000)) and set(counts.values()) == {1}
    out = read_lines(tmp_path / "in.predictions.jsonl")
    assert [line["index"] for line in out] == list(range(3000))


def test_a_job_survives_the_sigkill_of_its_driver(registry, scalers, client, tmp_path):
    predicted = deploy_scorer(registry, tmp_path, replicas=2, slow=0.002)
    scalers.start()
    source = tmp_path / "in.jsonl"
    write_samples(source, 2000)
    job = client.batch("scorer", str(source), tmp_path / "out.jsonl", batch_size=8, window=64)
    wait_until(lambda: job.status()["done"] >= 200, 60, what="the job under way")

    driver = client.jobs.require(job.id).driver
    pid = int(driver.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), 10, what="the driver gone")

    state = wait_ended(client, job.id)
    assert (state["status"], state["done"], state["failed"]) == ("succeeded", 2000, 0)
    assert client.jobs.require(job.id).driver != driver  # another driver finished it
    counts = predicted_counts(predicted)
    assert set(counts) == set(range(2000)) and set(counts.values()) == {1}
    assert [line["index"] for line in read_lines(tmp_path / "out.jsonl")] == list(range(2000))


def test_a_job_goes_on_on_another_host_when_its_host_is_lost(registry, scalers, client, s3,
                                                            tmp_path):
    """A host lost (its scaler SIGKILLed: its replicas and the job's driver die with it): the
    driver's lease lapses and the other host's scaler goes on with the job."""
    predicted = deploy_scorer(registry, tmp_path, replicas=1, slow=0.002)
    scalers.start("host-a")
    s3.create_bucket(Bucket="data")
    source = tmp_path / "in.jsonl"
    write_samples(source, 3000)
    s3.upload_file(str(source), "data", "in.jsonl")
    job = client.batch("scorer", "s3://data/in.jsonl", "s3://data/out.jsonl", batch_size=8,
                       window=64)
    wait_until(lambda: job.status()["done"] >= 200, 60, what="the job under way on host-a")
    scalers.start("host-b")
    wait_until(lambda: "host-b" in registry.hosts.all(), 30, what="host-b up")

    driver = client.jobs.require(job.id).driver
    scalers.kill("host-a")
    wait_until(lambda: not pid_alive(int(driver.rsplit(":", 1)[1])), 10,
               what="the driver gone with its host")
    state = wait_ended(client, job.id, timeout=120)
    assert (state["status"], state["done"]) == ("succeeded", 3000)
    counts = predicted_counts(predicted)
    assert set(counts) == set(range(3000))
    # Only the chunk host-a's replica was predicting when it died runs again (a replica's
    # death retries what it held); the job itself sends no chunk twice.
    assert sum(count - 1 for count in counts.values()) <= 8, counts.most_common(10)
    body = s3.get_object(Bucket="data", Key="out.jsonl")["Body"].read().decode()
    assert [json.loads(line)["index"] for line in body.splitlines()] == list(range(3000))


def test_a_job_goes_on_after_the_broker_restarts(tmp_path):
    """The broker (persisted, as `inferq up`'s) stops mid-job and comes back on its port: the
    driver that lost it exits, its scaler starts another once the broker answers, and the
    job ends with every sample written once, in order."""
    broker = EmbeddedRedis(tmp_path / "broker", persist=True)
    broker.start()
    registry = Registry(broker.url, socket_timeout=5)
    pool = Scalers(broker.url, registry, tmp_path / "broker-scaler-logs")
    try:
        predicted = deploy_scorer(registry, tmp_path, replicas=2, slow=0.002)
        pool.start()
        source = tmp_path / "in.jsonl"
        write_samples(source, 3000)
        with Client(broker.url) as client:
            job = client.batch("scorer", source, tmp_path / "out.jsonl", batch_size=8,
                               window=64)
            wait_until(lambda: job.status()["done"] >= 300, 60, what="the job under way")
        broker.stop()
        broker = EmbeddedRedis(tmp_path / "broker", port=broker.port, persist=True)
        broker.start()
        with Client(broker.url) as client:
            state = wait_until(lambda: (s := client.job(job.id).status())["status"] in (
                "succeeded", "failed") and s, 120, what="the job ended after the restart")
        assert (state["status"], state["done"]) == ("succeeded", 3000), state
        lines = read_lines(tmp_path / "out.jsonl")
        assert [line["index"] for line in lines] == list(range(3000))
        counts = predicted_counts(predicted)
        assert set(counts) == set(range(3000))
        # A replica whose acknowledgement the broker never got predicts its chunk again;
        # the job sends nothing twice.
        assert sum(count - 1 for count in counts.values()) <= 2 * 8, counts.most_common(5)
    finally:
        pool.stop_all()
        registry.close()
        broker.stop()


def test_an_s3_output_goes_on_with_its_multipart_upload_after_the_driver_dies(
        registry, scalers, client, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("INFERQ_JOB_PART_BYTES", str(S3_PART_MIN_BYTES))  # parts of 64 KiB
    predicted = deploy_scorer(registry, tmp_path, replicas=2, slow=0.001)
    scalers.start()
    s3.create_bucket(Bucket="data")
    source = tmp_path / "in.jsonl"
    write_samples(source, 6000, fail={4321})
    s3.upload_file(str(source), "data", "in.jsonl")
    job = client.batch("scorer", "s3://data/in.jsonl", "s3://data/out.jsonl", batch_size=16,
                       window=128)
    # a part or more uploaded and checkpointed: the upload is under way
    wait_until(lambda: len(client.jobs.require(job.id).writers.get("output", {})
                           .get("parts", ())) >= 1, 60, what="a part uploaded")

    driver = client.jobs.require(job.id).driver
    os.kill(int(driver.rsplit(":", 1)[1]), signal.SIGKILL)
    state = wait_ended(client, job.id)
    assert (state["status"], state["done"], state["failed"]) == (
        "completed with failures", 5999, 1)
    assert client.jobs.require(job.id).driver != driver
    body = s3.get_object(Bucket="data", Key="out.jsonl")["Body"].read().decode()
    assert [json.loads(line)["index"] for line in body.splitlines()] == list(range(6000))
    assert len(body) > 3 * S3_PART_MIN_BYTES  # it did travel in several parts
    dead = s3.get_object(Bucket="data", Key="out.failed.jsonl")["Body"].read().decode()
    assert [json.loads(line)["index"] for line in dead.splitlines()] == [4321]
    assert s3.list_multipart_uploads(Bucket="data").get("Uploads", []) == []
    counts = predicted_counts(predicted)
    assert set(counts) == set(range(6000)) and set(counts.values()) == {1}


def test_sync_requests_do_not_wait_behind_a_running_job(
        registry, scalers, client, start_gateway, tmp_path):
    """The job keeps at most a chunk per two replicas waiting in the queue, so a synchronous
    request finds a few chunks ahead of it, never the job's thousands of samples."""
    predicted = deploy_scorer(registry, tmp_path, replicas=2, slow=0.004)
    scalers.start()
    gateway = start_gateway()
    source = tmp_path / "in.jsonl"
    write_samples(source, 4000)
    job = client.batch("scorer", str(source), batch_size=8, window=256)
    wait_until(lambda: job.status()["done"] >= 100, 60, what="the job under way")

    depths = []
    sampling = threading.Event()

    def sample_depth() -> None:
        while not sampling.is_set():
            depths.append(registry.queues.length("inferq.scorer"))
            sampling.wait(0.002)

    sampler = threading.Thread(target=sample_depth)
    sampler.start()
    try:
        for k in range(10):
            with open(predicted, "a") as log:  # how far the job was when the request left
                log.write(f"{-1 - k}\n")
            answer = gateway.post("/shop/scorer", {"id": 100_000 + k, "x": 1})
            assert answer.status_code == 200, answer.text
    finally:
        sampling.set()
        sampler.join()
    assert job.status()["status"] == "running"
    # one chunk waiting (2 replicas), and at times the one sync request behind it
    assert max(depths) <= 2, Counter(depths)

    order = [int(line) for line in Path(predicted).read_text().splitlines() if line.strip()]
    for k in range(10):
        sent, answered = order.index(-1 - k), order.index(100_000 + k)
        ahead = [i for i in order[sent:answered] if 0 <= i < 4000]
        # 3 chunks of 8 at most when it was queued, and what was predicted on its way there
        assert len(ahead) <= 400, f"request {k} waited behind {len(ahead)} job samples"

    assert job.stop() == "running"
    state = wait_ended(client, job.id)
    assert state["status"] == "stopped"
    metrics = requests.get(gateway.url + "/metrics", timeout=10).text
    assert (f'inferq_job_samples_total{{api="scorer",outcome="completed"}} '
            f'{float(state["done"])}') in metrics


def test_inferq_get_shows_a_running_job_beside_the_apis(registry, scalers, client, tmp_path):
    deploy_scorer(registry, tmp_path, replicas=1, slow=0.01)
    scalers.start()
    source = tmp_path / "in.jsonl"
    write_samples(source, 2000)
    job = client.batch("scorer", str(source), batch_size=8, window=32)
    wait_until(lambda: job.status()["status"] == "running", 60, what="the job running")
    shown = subprocess.run(inferq_command("get"), capture_output=True, text=True, timeout=30)
    assert "scorer" in shown.stdout and job.id in shown.stdout and "running" in shown.stdout
    assert job.stop() == "running"
    assert wait_ended(client, job.id)["status"] == "stopped"


def test_a_job_scales_an_idle_api_from_zero(registry, scalers, client, tmp_path):
    deploy_scorer(registry, tmp_path, compute="{min_replicas: 0, max_replicas: 1, cpu: 100m}")
    scalers.start()
    wait_until(lambda: (s := registry.replicas.status("scorer")) and s.status == "stopped", 60,
               what="the API stopped at zero replicas")
    source = tmp_path / "in.jsonl"
    write_samples(source, 200)
    state = client.batch("scorer", source, batch_size=16).wait(timeout=90)
    assert (state["status"], state["done"]) == ("succeeded", 200)


def test_bad_submissions_are_refused_before_a_job_exists(registry, client, s3, tmp_path):
    deploy_scorer(registry, tmp_path)
    source = tmp_path / "in.jsonl"
    write_samples(source, 3)
    with pytest.raises(UnknownAPI, match='no API named "nope"'):
        client.batch("nope", str(source))
    with pytest.raises(JobError, match=r"input .*missing\.jsonl: no such file"):
        client.batch("scorer", str(tmp_path / "missing.jsonl"))
    with pytest.raises(JobError, match=r"output .*: its folder .*nowhere does not exist"):
        client.batch("scorer", str(source), str(tmp_path / "nowhere" / "out.jsonl"))
    with pytest.raises(JobError, match="it is the job's own input"):
        client.batch("scorer", str(source), str(source))
    s3.create_bucket(Bucket="data")
    s3.put_object(Bucket="data", Key="in/a.jsonl", Body=b'{"id": 1, "x": 1}\n')
    with pytest.raises(JobError, match=r"no \.jsonl object under it"):
        client.batch("scorer", "s3://data/empty/")
    with pytest.raises(JobError, match='bucket "nobucket" does not exist'):
        client.batch("scorer", "s3://data/in/", "s3://nobucket/out.jsonl")
    with pytest.raises(JobError, match="under the input prefix"):
        client.batch("scorer", "s3://data/in/", "s3://data/in/out.jsonl")
    assert client.jobs.newest() == []
    with pytest.raises(JobError, match="no batch job 'nope'"):
        client.job("nope")


def test_only_a_stopped_or_failed_job_resumes(registry, client, tmp_path):
    deploy_scorer(registry, tmp_path)
    source = tmp_path / "in.jsonl"
    write_samples(source, 3)
    job = client.batch("scorer", str(source))  # no scaler: it waits, queued
    assert job.status()["status"] == "queued"
    with pytest.raises(JobError, match="is queued: only a stopped or failed job"):
        job.resume()
    assert job.stop() == "stopped"  # a queued job stops at once
    assert job.resume().status()["status"] == "queued"


def test_a_slow_predictor_gets_small_chunks_so_sync_requests_wait_little(
        registry, scalers, client, start_gateway, tmp_path):
    """At 20 ms a sample, a chunk of 64 would hold a replica for over a second; the driver
    sizes chunks from the replicas' timings to about one sample's time instead."""
    predicted = deploy_scorer(registry, tmp_path, replicas=2, slow=0.02)
    scalers.start()
    gateway = start_gateway()
    source = tmp_path / "in.jsonl"
    write_samples(source, 400)
    job = client.batch("scorer", str(source))  # batch_size 64: the most, not the rule
    wait_until(lambda: job.status()["done"] >= 20, 60, what="the job under way")
    for k in range(5):
        with open(predicted, "a") as log:
            log.write(f"{-1 - k}\n")
        assert gateway.post("/shop/scorer", {"id": 100_000 + k, "x": 1}).status_code == 200
    assert job.status()["status"] == "running"
    order = [int(line) for line in Path(predicted).read_text().splitlines() if line.strip()]
    for k in range(5):
        sent, answered = order.index(-1 - k), order.index(100_000 + k)
        ahead = [i for i in order[sent:answered] if 0 <= i < 400]
        assert len(ahead) <= 12, f"request {k} waited behind {len(ahead)} job samples"
    job.stop()
    assert wait_ended(client, job.id)["status"] == "stopped"


@pytest.mark.parametrize(("cost", "expected"), [
    (lambda n: 0.00001 * n, 64),  # numpy-like: cheap per sample, chunks of batch_size
    (lambda n: 0.020 + 0.0001 * n, 64),  # a GPU batch: the cost is per call
    (lambda n: 0.010 * n, 1),  # predict at 10 ms a sample: one sample a chunk
])
def test_chunk_sizes_follow_what_a_chunk_costs(cost, expected):
    from inferq.chunks import ChunkSizer

    sizer = ChunkSizer(64)
    for _ in range(40):
        size = sizer.size
        sizer.answered(size, cost(size))
    assert sizer.size == expected


def test_no_chunk_goes_out_beside_the_first_before_a_sample_is_measured():
    # A quick replica and a sender slow to collect answers (nice 10, a busy machine) would
    # otherwise send a whole backlog one sample a chunk before the first answer sizes them.
    from inferq.chunks import ChunkSizer

    sizer = ChunkSizer(64)
    assert sizer.may_send(awaiting=False)  # the first chunk, of one sample
    assert not sizer.may_send(awaiting=True)  # nothing beside it
    sizer.answered(1, 0.0001)
    assert sizer.may_send(awaiting=True) and sizer.size == 2  # measured: chunks pipeline


def test_a_chunk_size_found_slow_in_a_busy_moment_is_tried_again_later():
    from inferq.chunks import SIZER_RETRY, ChunkSizer

    sizer = ChunkSizer(64)
    for _ in range(10):
        sizer.answered(sizer.size, 0.00001 * sizer.size)
    assert sizer.size == 64
    sizer.answered(64, 0.5)  # the machine stalled once
    assert sizer.size == 32
    for _ in range(SIZER_RETRY + 1):
        sizer.answered(sizer.size, 0.00001 * sizer.size)
    assert sizer.size == 64
