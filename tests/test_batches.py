"""Many samples per message: predict_batch, per-sample answers, map's batches, the tracker,
and the queue's sample count, over real replicas."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import copy_example, write_project

from inferq import Client, PredictionError
from inferq.deploy import deploy
from inferq.processes import wait_until

CORTEX = """
- kind: deployment
  name: batches
- kind: api
  name: {name}
  predictor: {{path: predictor.py}}
  tracker: {{model_type: classification, key: label}}
"""

# predict_batch answers each sample with the size of the batch it came in; a sample
# {"fail": msg} makes the whole batch raise (so each is retried alone to find it) and then
# fails alone through predict(); {"short": true} makes predict_batch drop a prediction.
PREDICTOR = """
def predict(sample, metadata):
    if "fail" in sample:
        raise ValueError(sample["fail"])
    return {"n": sample["n"], "batch": 1, "label": "odd" if sample["n"] % 2 else "even"}


def predict_batch(samples, metadata):
    if any("fail" in s for s in samples):
        raise ValueError("a sample in this batch is bad")
    answers = [{"n": s["n"], "batch": len(samples), "label": "odd" if s["n"] % 2 else "even"}
               for s in samples]
    return answers[1:] if any(s.get("short") for s in samples) else answers
"""


@pytest.fixture
def batcher(registry, replicas, tmp_path):
    deploy(write_project(tmp_path / "p", CORTEX.format(name="batcher"),
                         {"predictor.py": PREDICTOR}), registry)
    replicas.start("batcher")
    with Client(registry.url) as client:
        yield client


def test_a_batch_reaches_predict_batch_together_and_each_sample_is_answered(batcher):
    futures = batcher.submit_batch("batcher", [{"n": n} for n in range(5)])
    assert [f.result(timeout=30) for f in futures] == [
        {"n": n, "batch": 5, "label": "odd" if n % 2 else "even"} for n in range(5)]


def test_a_failing_sample_in_the_middle_fails_alone_naming_its_index(batcher):
    samples = [{"n": 0}, {"n": 1}, {"fail": "cannot score 2"}, {"n": 3}]
    futures = batcher.submit_batch("batcher", samples, first_index=100)
    assert futures[0].result(timeout=30)["n"] == 0
    assert futures[1].result(timeout=30)["n"] == 1
    assert futures[3].result(timeout=30)["n"] == 3
    with pytest.raises(PredictionError) as caught:
        futures[2].result(timeout=30)
    assert caught.value.api == "batcher" and caught.value.index == 102
    assert "cannot score 2" in str(caught.value)


def test_predict_batch_returning_the_wrong_length_is_a_clear_error_for_every_sample(batcher):
    futures = batcher.submit_batch("batcher", [{"n": 0, "short": True}, {"n": 1}, {"n": 2}])
    for future in futures:
        with pytest.raises(PredictionError) as caught:
            future.result(timeout=30)
        assert caught.value.api == "batcher"
        assert "predict_batch() returned 2 predictions for 3 samples" in str(caught.value)


def test_map_sends_batches_in_input_order_from_a_generator(batcher):
    results = list(batcher.map("batcher", ({"n": n} for n in range(100)), batch_size=7,
                               window=21))
    assert [r["n"] for r in results] == list(range(100))
    assert {r["batch"] for r in results} <= {7, 2}  # 14 batches of 7, then one of 2
    assert max(r["batch"] for r in results) == 7


def test_map_raises_for_the_first_failed_sample_with_its_index(batcher):
    samples = [{"n": n} for n in range(30)]
    samples[17] = {"fail": "bad sample"}
    with pytest.raises(PredictionError) as caught:
        list(batcher.map("batcher", samples, batch_size=8))
    assert caught.value.index == 17 and "bad sample" in str(caught.value)


def test_the_tracker_counts_every_sample_of_a_batch(batcher, registry):
    list(batcher.map("batcher", [{"n": n} for n in range(50)], batch_size=16))
    def tracked() -> int:
        return sum((registry.telemetry.tracker_stats("batcher").classes or {}).values())

    wait_until(lambda: tracked() == 50, 10, what="50 tracked predictions")
    assert registry.telemetry.tracker_stats("batcher").classes == {"even": 25, "odd": 25}


def test_the_queue_counts_samples_not_messages(registry, tmp_path):
    deploy(write_project(tmp_path / "p", CORTEX.format(name="idle"),
                         {"predictor.py": PREDICTOR}), registry)
    with Client(registry.url) as client:  # no replica: the batches wait
        client.submit_batch("idle", [{"n": n} for n in range(10)])
        client.submit("idle", {"n": 10})
        assert registry.queues.length("inferq.idle") == 2
        assert registry.queues.queued_samples("inferq.idle") == 11


def test_a_withdrawn_batch_leaves_the_sample_count(registry, tmp_path):
    deploy(write_project(tmp_path / "p", CORTEX.format(name="idle"),
                         {"predictor.py": PREDICTOR}), registry)
    with Client(registry.url) as client:
        futures = client.submit_batch("idle", [{"n": n} for n in range(10)], timeout=0.5)
        with pytest.raises(PredictionError):
            futures[0].result(timeout=10)
        wait_until(lambda: registry.queues.queued_samples("inferq.idle") == 0, 5,
                   what="the timed-out batch withdrawn")


def test_the_iris_example_predict_batch_agrees_with_predict(tmp_path, registry, replicas):
    deploy(copy_example("iris", tmp_path), registry)
    replicas.start("classifier")
    samples = [{"sepal_length": 5.1 + i / 10, "sepal_width": 3.5 - i / 20,
                "petal_length": 1.4 + i / 5, "petal_width": 0.2 + i / 12} for i in range(40)]
    with Client(registry.url) as client:
        alone = [client.predict("classifier", s) for s in samples]
        batched = list(client.map("classifier", samples, batch_size=16))
    assert batched == alone
    assert set(alone) == {"setosa", "versicolor", "virginica"}


PLAIN_CELERY_BATCH = """
import json
import sys

from celery import Celery

broker, samples = sys.argv[1], json.loads(sys.argv[2])
app = Celery(broker=broker, backend=broker)
app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
result = app.send_task("inferq.predict", args=[samples], kwargs={"batch": True},
                       queue="inferq.batcher")
print(json.dumps(result.get(timeout=60)))
"""


def test_plain_celery_sends_a_batch_and_reads_one_answer_per_sample(batcher, redis_url,
                                                                    tmp_path):
    script = tmp_path / "plain_batch.py"
    script.write_text(PLAIN_CELERY_BATCH)
    samples = [{"n": 1}, {"fail": "no"}, {"n": 2}]
    done = subprocess.run([sys.executable, str(script), redis_url, json.dumps(samples)],
                          check=False, capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        {"result": {"n": 1, "batch": 1, "label": "odd"}},
        {"error": "no", "index": 1},
        {"result": {"n": 2, "batch": 1, "label": "even"}},
    ]
