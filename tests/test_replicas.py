"""Replicas end to end: real Redis, real ``inferq worker`` processes, real requests.

Replicas are started by the ``replicas`` fixture (not by the scaler), so each test decides
how many run and which of their processes to signal. Predictors that need it record each
run in a file (``start <pid> <id>`` when predict() begins, ``done <pid> <id>`` when it
returns), which is how the tests count executions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ONNX_IRIS_HANDLER, copy_example, write_project

from inferq import keys
from inferq.client import Client
from inferq.deploy import deploy
from inferq.errors import PredictionError
from inferq.processes import wait_until
from inferq.registry import EXIT_INIT_FAILED, ReplicaRecord

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
SETOSA = {"sepal_length": 5.2, "sepal_width": 3.6, "petal_length": 1.4, "petal_width": 0.3}

# A predictor that records its runs. A sample says how long predict() works ("sleep") and
# how many of its runs are held until a file appears ("gate", "held_runs"), so a test can
# keep a request in predict() exactly as long as it needs, without guessing durations.
RECORDING_PREDICTOR = """
import os
import time


def _record(metadata, event, sample):
    \"\"\"Append the event; return how many times it happened for this sample so far.\"\"\"
    with open(metadata["runs"], "a+") as runs:
        runs.write(f"{event} {os.getpid()} {sample['id']}\\n")
        runs.seek(0)
        return sum(1 for line in runs if line.split()[::2] == [event, sample["id"]])


def predict(sample, metadata):
    run = _record(metadata, "start", sample)
    if run <= sample.get("held_runs", 0):
        deadline = time.monotonic() + 60
        while not os.path.exists(sample["gate"]) and time.monotonic() < deadline:
            time.sleep(0.01)
    time.sleep(sample.get("sleep", 0))
    _record(metadata, "done", sample)
    return {"id": sample["id"], "pid": os.getpid()}
"""


def _one_api(name: str, predictor: str = "predictor.py", metadata: dict | None = None) -> str:
    lines = ["- kind: api", f"  name: {name}", "  predictor:", f"    path: {predictor}"]
    if metadata:
        lines.append("    metadata:")
        lines += [f"      {key}: {value}" for key, value in metadata.items()]
    return "\n".join(lines) + "\n"


def _deployment(*apis: str) -> str:
    return "- kind: deployment\n  name: replicas-test\n" + "".join(apis)


@pytest.fixture
def client(redis_url):
    with Client(redis_url) as client:
        yield client


@pytest.fixture
def recording(tmp_path, registry):
    """The deployed API ``slow`` (RECORDING_PREDICTOR) and the file its runs are written to."""
    runs = tmp_path / "runs.log"
    runs.touch()
    config = _deployment(_one_api("slow", metadata={"runs": runs}))
    deploy(write_project(tmp_path / "slow", config, {"predictor.py": RECORDING_PREDICTOR}),
           registry)
    return runs


def _runs(path: Path, event: str, sample_id: str | None = None) -> list[int]:
    """PIDs of the recorded ``event`` lines (of one sample, if given), in order."""
    pids = []
    for line in path.read_text().splitlines():
        kind, pid, ident = line.split()
        if kind == event and sample_id in (None, ident):
            pids.append(int(pid))
    return pids


def _start(replicas, api: str, count: int) -> list[subprocess.Popen]:
    """Start ``count`` replicas of ``api`` at once and wait until every one is live."""
    processes = [replicas.start(api, wait_live=False) for _ in range(count)]
    for process in processes:
        replicas.wait_live(api, process)
    return processes


def _record_of(registry, api: str, process: subprocess.Popen) -> ReplicaRecord:
    return next(r for r in registry.replicas.of(api) if r.id.endswith(f"-{process.pid}"))


def _import_example_predictor(project: Path):
    """The iris example's own predictor, loaded in this process, for the expected labels."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("iris_host_predictor", project / "predictor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = yaml.safe_load((project / "cortex.yaml").read_text())
    predictor = next(r for r in config if r["kind"] == "api")["predictor"]
    module.init(str(project / predictor["model"]), predictor.get("metadata") or {})
    return module


# -- the iris example through the Python client ------------------------------------------------


def test_iris_example_answers_predict_submit_and_a_10000_sample_map_in_input_order(
        registry, replicas, client, tmp_path):
    project = copy_example("iris", tmp_path)
    deploy(project, registry)
    _start(replicas, "classifier", 2)

    sample = json.loads((project / "sample.json").read_text())
    assert client.predict("classifier", sample) == "setosa"
    assert client.submit("classifier", sample).result(timeout=10) == "setosa"

    from sklearn.datasets import load_iris

    rows = load_iris().data
    rng = np.random.default_rng(3)
    picked = rows[rng.integers(0, len(rows), 10_000)] + rng.normal(0, 0.3, (10_000, 4))
    samples = [dict(zip(FEATURES, map(float, row), strict=True)) for row in picked]
    host = _import_example_predictor(project)
    expected = [host.predict(s, None) for s in samples]
    assert set(expected) == {"setosa", "versicolor", "virginica"}

    started = time.monotonic()
    predictions = list(client.map("classifier", samples))
    elapsed = time.monotonic() - started
    assert predictions == expected
    print(f"map of 10000 samples on 2 replicas: {elapsed:.1f}s")


# -- predict() errors and odd return values ----------------------------------------------------

FAULTY_PREDICTOR = """
import math

import numpy as np


def predict(sample, metadata):
    kind = sample.get("kind")
    if kind == "raise":
        raise ValueError(f"cannot score {sample['value']!r}")
    if kind == "object":
        return {"model": object()}
    if kind == "set":
        return {"tags": {1, 2}}
    if kind == "nan":
        return math.nan
    if kind == "bigint":
        return {"n": 10 ** 5000}
    if kind == "deep":
        deep = []
        for _ in range(5000):
            deep = [deep]
        return deep
    if kind == "numpy":
        return {
            "score": np.float32(0.5),
            "count": np.int64(7),
            "flag": np.bool_(True),
            "vector": np.arange(3),
            "matrix": np.eye(2),
            "by_class": {np.int64(2): np.float64(0.25)},
            "pair": (np.int32(1), np.float16(2.0)),
        }
    return sample["value"] * 2
"""


@pytest.fixture
def faulty(tmp_path, registry, replicas):
    deploy(write_project(tmp_path / "faulty", _deployment(_one_api("faulty")),
                         {"predictor.py": FAULTY_PREDICTOR}), registry)
    (process,) = _start(replicas, "faulty", 1)
    return process


def test_a_raising_predict_fails_its_request_only_naming_the_api_message_and_map_index(
        faulty, client, registry):
    child = _record_of(registry, "faulty", faulty).pid
    with pytest.raises(PredictionError) as caught:
        client.predict("faulty", {"kind": "raise", "value": "x"})
    assert caught.value.api == "faulty"
    assert str(caught.value) == 'api "faulty": cannot score \'x\''

    # the replica lives on, in the same process, and serves the next request
    assert client.predict("faulty", {"value": 21}) == 42
    assert faulty.poll() is None
    assert _record_of(registry, "faulty", faulty).pid == child
    assert registry.queues.in_flight("faulty") == {}

    samples = [{"value": i} for i in range(20)]
    samples[13] = {"kind": "raise", "value": 13}
    results = client.map("faulty", samples)
    assert [next(results) for _ in range(13)] == [2 * i for i in range(13)]
    with pytest.raises(PredictionError) as caught:
        next(results)
    assert caught.value.index == 13
    assert str(caught.value) == 'api "faulty", sample 13: cannot score 13'
    assert client.predict("faulty", {"value": 1}) == 2


def test_numpy_values_are_converted_and_what_json_cannot_carry_is_a_clear_error(
        faulty, client):
    assert client.predict("faulty", {"kind": "numpy"}) == {
        "score": 0.5,
        "count": 7,
        "flag": True,
        "vector": [0, 1, 2],
        "matrix": [[1.0, 0.0], [0.0, 1.0]],
        "by_class": {"2": 0.25},
        "pair": [1, 2.0],
    }
    for kind, message in [
        ("object", "prediction['model'] is not JSON-serialisable: builtins.object"),
        ("set", "prediction['tags'] is not JSON-serialisable: builtins.set"),
        ("nan", "prediction is nan, which JSON cannot carry"),
        ("deep", "the prediction nests too deep to be sent as JSON"),
        ("bigint", "prediction['n'] is an integer JSON cannot carry: Exceeds the limit (4300"),
    ]:
        with pytest.raises(PredictionError) as caught:
            client.predict("faulty", {"kind": kind}, timeout=20)
        assert caught.value.api == "faulty"
        assert message in str(caught.value), kind
    assert client.predict("faulty", {"value": 2}) == 4
    assert faulty.poll() is None


# -- predictors that cannot start --------------------------------------------------------------

BROKEN = {
    "init-raises": (
        "broken_init.py",
        """
        def load(path):
            raise RuntimeError(f"no weights at {path}")


        def init(model_path, metadata):
            load("/models/missing.bin")


        def predict(sample, metadata):
            return sample
        """,
        ["broken_init.py: init() raised", "Traceback (most recent call last)",
         'broken_init.py", line 3, in load',
         "RuntimeError: no weights at /models/missing.bin"],
    ),
    "no-predict": (
        "no_predict.py",
        """
        def init(model_path, metadata):
            pass


        def infer(sample, metadata):
            return sample
        """,
        ["no_predict.py: no predict(sample, metadata) function is defined"],
    ),
    "bad-signature": (
        "bad_signature.py",
        """
        def predict(sample):
            return sample
        """,
        ["bad_signature.py: predict(sample) cannot be called as predict(sample, metadata)"],
    ),
    # deploy refuses a predictor with a syntax error; one in a module it imports shows here
    "syntax-error": (
        "syntax_error.py",
        """
        import broken_helper


        def predict(sample, metadata)  :
            return sample
        """,
        ["syntax_error.py: importing it failed", "Traceback (most recent call last)",
         'File "broken_helper.py", line 2', "SyntaxError"],
    ),
}
HELPERS = {"broken_helper.py": "\ndef helper(sample)\n    return sample\n"}


def test_a_predictor_that_cannot_start_stops_its_replica_with_the_file_and_traceback(
        tmp_path, registry, replicas):
    config = _deployment(*(_one_api(api, predictor=file) for api, (file, _, _) in BROKEN.items()))
    files = {file: text for file, text, _ in BROKEN.values()} | HELPERS
    deploy(write_project(tmp_path / "broken", config, files), registry)
    processes = {api: replicas.start(api, wait_live=False) for api in BROKEN}

    for api, process in processes.items():
        assert process.wait(timeout=60) == EXIT_INIT_FAILED, f"{api}:\n{replicas.log(process)}"
        (record,) = registry.replicas.of(api)
        assert record.status == "error", api
        assert record.id.endswith(f"-{process.pid}")
        for expected in BROKEN[api][2]:
            assert expected in record.error, f"{api}: {record.error}"
            assert expected in replicas.log(process), api
        assert registry.queues.in_flight(api) == {}


# -- replicas dying mid-request -----------------------------------------------------------------


def test_a_killed_prediction_is_answered_once_by_another_replica_within_predict_time_plus_5s(
        recording, registry, replicas, client, tmp_path):
    first, second = _start(replicas, "slow", 2)
    # the first run is held in predict() until it is killed; the retry works for 1 s
    sample = {"id": "a", "sleep": 1.0, "held_runs": 1, "gate": str(tmp_path / "never")}
    future = client.submit("slow", sample)

    def predicting():
        busy = registry.queues.in_flight("slow")
        return next((r for r in registry.replicas.of("slow")
                     if future.task_id in busy.get(r.id, [])), None)

    record = wait_until(predicting, 10, what="a replica predicting the request")
    wait_until(lambda: _runs(recording, "start", "a"), 10, what="predict() started")
    assert _runs(recording, "start", "a") == [record.pid]
    os.kill(record.pid, signal.SIGKILL)  # the serving process, as the OOM killer would
    killed_at = time.monotonic()

    # its supervisor notices the death at once and puts the request back for the other one
    wait_until(lambda: _runs(recording, "start", "a")[1:], 3, what="the retry started")
    prediction = future.result(timeout=1.0 + 5)
    assert time.monotonic() - killed_at < 1.0 + 5
    assert prediction == {"id": "a", "pid": _runs(recording, "done", "a")[0]}
    assert len(_runs(recording, "start", "a")) == 2
    assert len(_runs(recording, "done", "a")) == 1
    killed = first if record.id.endswith(f"-{first.pid}") else second
    assert killed.wait(timeout=10) == 128 + signal.SIGKILL  # the scaler starts a new one
    assert "1 request(s) put back" in replicas.log(killed)
    assert registry.queues.in_flight("slow") == {}
    assert [client.predict("slow", {"id": f"b{i}"}, timeout=10)["id"] for i in range(2)] == [
        "b0", "b1"]
    assert len(_runs(recording, "done", "a")) == 1


def test_a_request_whose_retry_is_killed_too_fails_clearly_and_never_runs_a_third_time(
        recording, registry, replicas, client, tmp_path):
    _start(replicas, "slow", 2)
    # every run is held in predict() until it is killed
    future = client.submit("slow", {"id": "a", "held_runs": 3, "gate": str(tmp_path / "never")})

    pid = wait_until(lambda: _runs(recording, "start", "a"), 10, what="predict() started")[0]
    os.kill(pid, signal.SIGKILL)
    retry = wait_until(lambda: _runs(recording, "start", "a")[1:], 10, what="the retry started")[0]
    os.kill(retry, signal.SIGKILL)

    with pytest.raises(PredictionError) as caught:
        future.result(timeout=10)
    assert caught.value.api == "slow"
    assert "died while predicting, and again when the request was retried" in str(caught.value)
    assert registry.queues.in_flight("slow") == {}

    # A new replica serves "b" and nothing else: no third run of "a" was queued.
    _start(replicas, "slow", 1)
    assert client.predict("slow", {"id": "b", "sleep": 0.5}, timeout=10)["id"] == "b"
    assert registry.queues.length(keys.queue("slow")) == 0
    assert _runs(recording, "start", "a") == [pid, retry]
    assert _runs(recording, "done", "a") == []


def test_sigterm_is_a_warm_shutdown_that_answers_the_current_request(
        recording, registry, replicas, client, tmp_path):
    (process,) = _start(replicas, "slow", 1)
    gate = tmp_path / "gate"
    current = client.submit("slow", {"id": "current", "held_runs": 1, "gate": str(gate)})
    wait_until(lambda: _runs(recording, "start", "current"), 10, what="predict() started")
    waiting = client.submit("slow", {"id": "waiting"})
    assert registry.queues.length(keys.queue("slow")) == 1

    process.send_signal(signal.SIGTERM)
    wait_until(lambda: "Warm shutdown" in replicas.log(process), 10, what="a warm shutdown")
    assert process.poll() is None and not current.done()
    gate.touch()  # the request finishes only now, while the replica is shutting down
    assert current.result(timeout=10)["id"] == "current"
    assert process.wait(timeout=15) == 0
    assert len(_runs(recording, "done", "current")) == 1
    # the stopping replica took no new request: the queued one waits for another replica
    assert _runs(recording, "start", "waiting") == []
    assert registry.queues.length(keys.queue("slow")) == 1
    assert registry.replicas.of("slow") == []
    assert registry.queues.in_flight("slow") == {}

    _start(replicas, "slow", 1)
    assert waiting.result(timeout=10)["id"] == "waiting"


def test_a_new_replica_takes_queued_work_at_once_while_the_first_is_busy(
        recording, registry, replicas, client, tmp_path):
    (busy,) = _start(replicas, "slow", 1)
    gate = tmp_path / "gate"
    long = client.submit("slow", {"id": "long", "held_runs": 1, "gate": str(gate)})
    wait_until(lambda: _runs(recording, "start", "long"), 10, what="the long request started")
    queued = [client.submit("slow", {"id": f"q{i}"}) for i in range(3)]
    # the busy replica holds only the task it runs (no prefetched message hidden from others)
    assert registry.queues.length(keys.queue("slow")) == 3

    (fresh,) = _start(replicas, "slow", 1)
    child = _record_of(registry, "slow", fresh).pid
    assert [f.result(timeout=15) for f in queued] == [{"id": f"q{i}", "pid": child}
                                                        for i in range(3)]
    assert not long.done()
    gate.touch()
    assert long.result(timeout=10) == {"id": "long",
                                       "pid": _record_of(registry, "slow", busy).pid}


# -- models from S3, ONNX, plain Celery ----------------------------------------------------------


def test_models_from_an_s3_file_and_an_s3_prefix(s3, tmp_path, registry, replicas, client):
    project = copy_example("iris", tmp_path)
    model = json.loads((project / "model.json").read_text())
    (project / "model.json").unlink()  # only S3 has the model
    # Renamed classes show that the replicas serve the models from S3.
    s3.create_bucket(Bucket="models")
    as_file = {**model, "classes": [f"file-{c}" for c in model["classes"]]}
    s3.put_object(Bucket="models", Key="iris/v1/model.json", Body=json.dumps(as_file).encode())
    as_prefix = {**model, "classes": [f"prefix-{c}" for c in model["classes"]]}
    s3.put_object(Bucket="models", Key="iris/v2/model.json", Body=json.dumps(as_prefix).encode())
    s3.put_object(Bucket="models", Key="iris/v2/README.txt", Body=b"notes")
    text = (project / "cortex.yaml").read_text()
    api = text[text.index("- kind: api"):]
    (project / "cortex.yaml").write_text(
        text.replace("model: model.json", "model: s3://models/iris/v1/model.json")
        + api.replace("name: classifier", "name: from-prefix")
        .replace("model: model.json", "model: s3://models/iris/v2/")
    )
    deploy(project, registry)
    _start(replicas, "classifier", 1)
    _start(replicas, "from-prefix", 1)

    assert client.predict("classifier", SETOSA) == "file-setosa"
    assert client.predict("from-prefix", SETOSA) == "prefix-setosa"


def test_an_onnx_model_is_served_with_a_v011_request_handler(tmp_path, registry, replicas,
                                                             client):
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, labels = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=1000).fit(features, labels)
    exported = to_onnx(model, initial_types=[("input", FloatTensorType([None, 4]))])
    project = write_project(tmp_path / "onnx", """
    - kind: deployment
      name: iris-onnx

    - kind: api
      name: onnx-classifier
      onnx:
        model: iris.onnx
        request_handler: handler.py
    """, {"handler.py": ONNX_IRIS_HANDLER})
    (project / "iris.onnx").write_bytes(exported.SerializeToString())
    deploy(project, registry)
    _start(replicas, "onnx-classifier", 1)

    rows = features[::10]
    samples = [dict(zip(FEATURES, map(float, row), strict=True)) for row in rows]
    names = ["iris-setosa", "iris-versicolor", "iris-virginica"]
    expected = [names[i] for i in model.predict(rows.astype(np.float32))]
    assert list(client.map("onnx-classifier", samples)) == expected
    assert len(set(expected)) == 3


# The README's "Plain Celery" snippet, with the test's broker, sample and queue filled in.
PLAIN_CELERY = """
import json
import sys

from celery import Celery

broker, sample = sys.argv[1], json.loads(sys.argv[2])
app = Celery(broker=broker, backend=broker)
app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
result = app.send_task("inferq.predict", args=[sample], kwargs={"debug": False},
                       queue="inferq.classifier")
print(json.dumps(result.get(timeout=60)))
assert "inferq" not in sys.modules and "workers" not in sys.modules
"""


def test_plain_celery_send_task_from_another_process_reaches_the_replica(
        tmp_path, registry, replicas, redis_url):
    deploy(copy_example("iris", tmp_path), registry)
    _start(replicas, "classifier", 1)
    script = tmp_path / "plain_celery.py"
    script.write_text(PLAIN_CELERY)
    done = subprocess.run(
        [sys.executable, str(script), redis_url, json.dumps(SETOSA)],
        check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "")},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == "setosa"
