"""The gateway over real HTTP: every answer of the README's "HTTP" table, against real replicas.

The gateway runs as ``inferq gateway`` in a subprocess, replicas as ``inferq worker``
processes, all on a private Redis; every process is stopped by PID in a fixture teardown.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from helpers import Gateway, Replicas, assert_json, inferq_command, post, write_project

from inferq import Client, UnknownAPI, keys
from inferq.deploy import deploy
from inferq.gateway.server import server_log
from inferq.processes import wait_until
from inferq.registry import Registry
from inferq.stack import EmbeddedRedis, StackInfo, home

# One predictor for every test; the sample says what to do. "hold" blocks the replica until
# the test creates the file it names (the replica is then busy for as long as a test needs,
# without guessing a duration). Every sample that reaches predict() is recorded first, so a
# test can prove a request never ran.
PREDICTOR = """
import json
import os
import time


def predict(sample, metadata):
    with open(metadata["record"], "a") as handle:
        handle.write(json.dumps(sample) + "\\n")
    if not isinstance(sample, dict):
        return {"echo": sample}
    if "hold" in sample:
        deadline = time.monotonic() + 60
        while not os.path.exists(sample["hold"]) and time.monotonic() < deadline:
            time.sleep(0.01)
    if "sleep" in sample:
        time.sleep(sample["sleep"])
    if "fail" in sample:
        raise ValueError(sample["fail"])
    return {"echo": sample}
"""


def project_yaml(record: Path, *, endpoint: str | None = None, compute: str = "") -> str:
    lines = [
        "- kind: deployment",
        "  name: shop",
        "",
        "- kind: api",
        "  name: echo",
    ]
    if endpoint:
        lines.append(f"  endpoint: {endpoint}")
    lines += [
        "  predictor:",
        "    path: predictor.py",
        "    metadata:",
        f"      record: {record}",
    ]
    if compute:
        lines += ["  compute:"] + [f"    {line}" for line in compute.strip().splitlines()]
    return "\n".join(lines) + "\n"


def deploy_echo(registry: Registry, tmp_path: Path, **yaml_options) -> Path:
    """Deploy the echo API; return the file its predictor records samples in."""
    record = tmp_path / "record.jsonl"
    record.touch()
    project = write_project(tmp_path / "project", project_yaml(record, **yaml_options),
                            {"predictor.py": PREDICTOR})
    deploy(project, registry)
    return record


def recorded(record: Path) -> list:
    return [json.loads(line) for line in record.read_text().splitlines()]


def hold_replica(gateway_url: str, registry: Registry, release: Path, pool: ThreadPoolExecutor,
                 *, ident: str = "held"):
    """Make the API's one replica busy until ``release`` exists; return the request's future."""
    held = pool.submit(post, gateway_url, {"id": ident, "hold": str(release)}, timeout=60)
    wait_until(lambda: registry.queues.in_flight("echo"), 30, what="the replica predicting")
    return held


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    text = requests.get(gateway.url + "/metrics", timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.split()[-1])
    return 0.0


# -- every answer of an endpoint ---------------------------------------------------------------


def test_every_answer_of_an_api_endpoint(registry, replicas, start_gateway, tmp_path):
    record = deploy_echo(registry, tmp_path, endpoint="/custom/predict-it")
    replica = replicas.start("echo")
    gateway = start_gateway("--max-body", "4096")
    url = gateway.url + "/custom/predict-it"

    assert assert_json(post(url, {"x": 1}), 200) == {"echo": {"x": 1}}

    summary = assert_json(requests.get(url, timeout=10), 200)
    assert summary["api"] == "echo"
    assert "POST" in summary["summary"] and url in summary["summary"]
    assert "\n" not in summary["summary"]

    bad = assert_json(requests.post(url, data=b"{not json", timeout=10), 400)
    assert bad["api"] == "echo" and "not JSON" in bad["error"]

    missing = assert_json(post(gateway.url + "/shop/echo", {"x": 1}), 404)
    assert "/custom/predict-it" in missing["error"]  # says what is deployed

    for method in ("PUT", "DELETE", "PATCH"):
        wrong = requests.request(method, url, data=b"{}", timeout=10)
        assert assert_json(wrong, 405)["api"] == "echo"
        assert set(wrong.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    healthz_post = requests.post(gateway.url + "/healthz", timeout=10)
    assert assert_json(healthz_post, 405) and "POST" not in healthz_post.headers["Allow"]

    too_big = requests.post(url, data=json.dumps({"x": "a" * 5000}), timeout=10)
    assert assert_json(too_big, 413) == {
        "error": "the request body is over the 4096 byte limit", "api": "echo",
    }
    assert assert_json(post(url, {"x": "a" * 3000}), 200)["echo"]["x"] == "a" * 3000

    failed = assert_json(post(url, {"fail": "the model is on fire"}), 500)
    assert failed == {"error": "prediction failed: the model is on fire", "api": "echo"}
    assert assert_json(post(url, {"after": "failure"}), 200) == {"echo": {"after": "failure"}}
    assert replica.poll() is None  # the replica lives on

    assert recorded(record) == [{"x": 1}, {"x": "a" * 3000}, {"fail": "the model is on fire"},
                                {"after": "failure"}]


def test_a_body_nested_too_deep_is_a_400_naming_the_limit(registry, replicas, start_gateway,
                                                         tmp_path):
    record = deploy_echo(registry, tmp_path)
    replicas.start("echo")
    gateway = start_gateway()
    url = gateway.url + "/shop/echo"

    def nested(levels: int) -> bytes:
        return b"[" * levels + b"]" * levels

    for body in (nested(100_000), nested(101), b'{"a": ' + nested(100) + b"}"):
        refused = assert_json(requests.post(url, data=body, timeout=30), 400)
        assert refused == {"api": "echo", "error": "the request body nests deeper than 100 "
                           "levels (inferq's limit for JSON samples)"}
    # At the limit, the sample makes the whole trip: parsed, queued, predicted and echoed back.
    at_limit = json.loads(nested(100))
    assert assert_json(requests.post(url, data=nested(100), timeout=30), 200) == {
        "echo": at_limit}
    # Brackets inside strings are text, not nesting.
    assert assert_json(post(url, {"text": "[" * 5000}), 200) == {"echo": {"text": "[" * 5000}}
    assert recorded(record) == [at_limit, {"text": "[" * 5000}]
    assert "Traceback" not in gateway.log()


def test_debug_logs_the_sample_and_the_prediction_on_the_replica(registry, replicas,
                                                                    start_gateway, tmp_path):
    deploy_echo(registry, tmp_path)
    replica = replicas.start("echo")
    gateway = start_gateway()
    url = gateway.url + "/shop/echo"

    assert_json(post(url, {"quiet": "sample-without-debug"}), 200)
    assert assert_json(post(url + "?debug=true", {"loud": "sample-with-debug"}), 200) == {
        "echo": {"loud": "sample-with-debug"}
    }

    def logged() -> bool:
        log = replicas.log(replica)
        return ('debug: sample: {"loud": "sample-with-debug"}' in log
                and 'debug: prediction: {"echo": {"loud": "sample-with-debug"}}' in log)

    wait_until(logged, 10, what="the debug lines in the replica's log")
    assert "sample-without-debug" not in replicas.log(replica)


def test_healthz_and_metrics(registry, replicas, start_gateway, tmp_path):
    deploy_echo(registry, tmp_path)
    replicas.start("echo")
    gateway = start_gateway()
    assert assert_json(requests.get(gateway.url + "/healthz", timeout=10), 200)["status"] == "ok"
    assert_json(post(gateway.url + "/shop/echo", {"x": 1}), 200)
    assert_json(post(gateway.url + "/shop/echo", {"fail": "no"}), 500)

    scraped = requests.get(gateway.url + "/metrics", timeout=10)
    assert scraped.status_code == 200
    assert scraped.headers["Content-Type"].startswith("text/plain")
    assert metric(gateway, "inferq_requests_total", api="echo", code="2xx") == 1
    assert metric(gateway, "inferq_requests_total", api="echo", code="5xx") == 1
    assert metric(gateway, "inferq_request_duration_seconds_count", api="echo") == 2
    assert 'inferq_request_duration_seconds_bucket{api="echo",le="0.1"}' in scraped.text
    assert 'inferq_queue_depth{api="echo"} 0.0' in scraped.text
    assert 'inferq_replicas{api="echo",status="live"} 1.0' in scraped.text


def test_metrics_have_series_only_for_deployed_apis(registry, start_gateway, tmp_path):
    deploy_echo(registry, tmp_path)
    gateway = start_gateway()
    for n in range(300):  # a scanner trying endpoints
        assert_json(post(f"{gateway.url}/probe-{n}", {"x": n}), 404)
    assert_json(requests.get(gateway.url + "/shop/echo", timeout=10), 200)  # no replica needed

    def apis_in_metrics() -> set[str]:
        text = requests.get(gateway.url + "/metrics", timeout=10).text
        return set(re.findall(r'\bapi="([^"]*)"', text))

    assert apis_in_metrics() == {"echo"}
    assert metric(gateway, "inferq_requests_total", api="echo", code="2xx") == 1
    registry.deployments.delete("shop")
    assert apis_in_metrics() == set()  # a deleted API's series go with it


def test_a_404_names_at_most_10_deployed_endpoints(registry, start_gateway, tmp_path):
    apis = "".join(f"- kind: api\n  name: api-{n:02}\n  predictor: {{path: predictor.py}}\n"
                   for n in range(25))
    deploy(write_project(tmp_path / "many", "- kind: deployment\n  name: many\n" + apis,
                         {"predictor.py": PREDICTOR}), registry)
    gateway = start_gateway()
    missing = assert_json(post(gateway.url + "/nowhere", {}), 404)
    listed = ", ".join(f"/many/api-{n:02}" for n in range(10))
    assert missing == {"error": f"no API at /nowhere (deployed endpoints: {listed} and 15 more)"}
    with Client(registry.url) as client, pytest.raises(UnknownAPI) as caught:
        client.predict("nowhere", {})
    assert str(caught.value).endswith("(deployed: api-00, api-01, api-02, api-03, api-04, "
                                      "api-05, api-06, api-07, api-08, api-09 and 15 more)")


# -- routes follow the registry ----------------------------------------------------------------


def test_routes_follow_deploys_redeploys_and_deletes_without_a_restart(registry, replicas,
                                                                      start_gateway, tmp_path):
    gateway = start_gateway()
    assert_json(post(gateway.url + "/shop/echo", {"x": 1}), 404)

    deploy_echo(registry, tmp_path)
    replicas.start("echo")
    assert assert_json(post(gateway.url + "/shop/echo", {"x": 1}), 200) == {"echo": {"x": 1}}

    deploy_echo(registry, tmp_path, endpoint="/moved")  # the same API at a new endpoint
    assert_json(post(gateway.url + "/shop/echo", {"x": 2}), 404)
    assert assert_json(post(gateway.url + "/moved", {"x": 3}), 200) == {"echo": {"x": 3}}

    registry.deployments.delete("shop")
    assert_json(post(gateway.url + "/moved", {"x": 4}), 404)
    assert_json(requests.get(gateway.url + "/moved", timeout=10), 404)


# -- 503, 504, withdrawn requests --------------------------------------------------------------


def test_a_full_queue_answers_503_with_retry_after(registry, replicas, start_gateway, tmp_path):
    deploy_echo(registry, tmp_path, compute="max_queue_length: 1")
    replicas.start("echo")
    gateway = start_gateway()
    url = gateway.url + "/shop/echo"
    release = tmp_path / "release"
    with ThreadPoolExecutor(4) as pool:
        held = hold_replica(url, registry, release, pool)
        queued = pool.submit(post, url, {"id": "queued"})
        wait_until(lambda: registry.queues.length("inferq.echo") == 1, 30,
                   what="one request queued")
        full = post(url, {"id": "refused"})
        body = assert_json(full, 503)
        assert int(full.headers["Retry-After"]) >= 1
        assert body["api"] == "echo" and "max_queue_length" in body["error"]
        release.touch()
        assert assert_json(held.result(), 200)["echo"]["id"] == "held"
        assert assert_json(queued.result(), 200)["echo"]["id"] == "queued"


def test_a_timed_out_request_is_504_and_never_runs_later(registry, replicas, start_gateway,
                                                         tmp_path):
    record = deploy_echo(registry, tmp_path, compute="timeout: 1s")
    replicas.start("echo")
    gateway = start_gateway()
    url = gateway.url + "/shop/echo"
    release = tmp_path / "release"
    with ThreadPoolExecutor(2) as pool:
        held = hold_replica(url, registry, release, pool)

        started = time.monotonic()
        late = post(url, {"id": "timed-out"})
        waited = time.monotonic() - started
        body = assert_json(late, 504)
        assert body["api"] == "echo"
        assert body["error"].startswith("timeout: ") and "within 1s" in body["error"]
        assert 0.9 <= waited < 5

        assert_json(held.result(), 504)  # it ran past the timeout too (it was already running)
    release.touch()
    # The queue is first in, first out: once a later request is answered, the replica has
    # taken (and dropped) the timed-out one before it.
    assert assert_json(post(url, {"id": "after"}), 200) == {"echo": {"id": "after"}}
    assert [s["id"] for s in recorded(record)] == ["held", "after"]
    assert registry.queues.length("inferq.echo") == 0


def test_a_request_whose_client_went_away_is_withdrawn(registry, replicas, start_gateway,
                                                       tmp_path):
    record = deploy_echo(registry, tmp_path)
    replicas.start("echo")
    gateway = start_gateway()
    url = gateway.url + "/shop/echo"
    release = tmp_path / "release"
    with ThreadPoolExecutor(2) as pool:
        held = hold_replica(url, registry, release, pool)

        body = json.dumps({"id": "abandoned"}).encode()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(
                b"POST /shop/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            wait_until(lambda: registry.queues.length("inferq.echo") == 1, 30,
                       what="the abandoned request queued")
        # The gateway notices the closed connection and withdraws the request (answering it
        # 499, which nobody reads, counted as a 4xx).
        wait_until(lambda: metric(gateway, "inferq_requests_total", api="echo", code="4xx"),
                   10, what="the gateway withdrawing the abandoned request")
        release.touch()
        assert assert_json(held.result(), 200)["echo"]["id"] == "held"
    assert assert_json(post(url, {"id": "after"}), 200) == {"echo": {"id": "after"}}
    assert [s["id"] for s in recorded(record)] == ["held", "after"]


def test_the_broker_going_away_and_coming_back(replicas, start_gateway, tmp_path):
    # A Redis of this test's own, persisted, so a restart on the same port keeps the API.
    broker = EmbeddedRedis(tmp_path / "broker", persist=True)
    broker.start()
    registry = Registry(broker.url, socket_timeout=5)
    pool = Replicas(broker.url, registry, tmp_path / "broker-replica-logs")
    try:
        record = deploy_echo(registry, tmp_path)
        pool.start("echo")
        gateway = start_gateway(broker_url=broker.url)
        url = gateway.url + "/shop/echo"
        assert assert_json(post(url, {"id": "before"}), 200) == {"echo": {"id": "before"}}

        broker.stop()
        health = requests.get(gateway.url + "/healthz", timeout=10)
        assert assert_json(health, 503)["status"] == "unavailable"
        assert health.headers["Retry-After"] == "1"
        down = post(url, {"id": "while-down"})
        assert assert_json(down, 503)["api"] == "echo"
        assert down.headers["Retry-After"] == "1"
        assert_json(requests.get(gateway.url + "/elsewhere", timeout=10), 503)

        broker = EmbeddedRedis(tmp_path / "broker", port=broker.port, persist=True)
        broker.start()
        wait_until(lambda: requests.get(gateway.url + "/healthz", timeout=10).status_code == 200,
                   20, what="/healthz answering 200 again")

        def answered():
            response = post(url, {"id": "after"})
            assert response.status_code in (200, 503), response.text
            return response.status_code == 200 and response

        after = wait_until(answered, 60, interval=0.2, what="a prediction after the restart")
        assert assert_json(after, 200) == {"echo": {"id": "after"}}
        assert "while-down" not in [s["id"] for s in recorded(record)]
        assert gateway.process.poll() is None
    finally:
        pool.stop_all()
        registry.close()
        broker.stop()


# -- load --------------------------------------------------------------------------------------


def test_512_concurrent_clients_all_get_their_answer(registry, replicas, start_gateway, tmp_path):
    deploy_echo(registry, tmp_path)
    for _ in range(2):
        replicas.start("echo", wait_live=False)
    for process in replicas.processes:
        replicas.wait_live("echo", process)
    gateway = start_gateway()
    clients = 512

    def call(index: int) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=110)
        try:
            connection.request("POST", "/shop/echo", body=json.dumps({"i": index, "sleep": 0.1}),
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    peak_rss = [gateway.rss()]
    done = threading.Event()

    def sample_rss() -> None:
        while not done.wait(0.2):
            peak_rss.append(gateway.rss())

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    cpu_before = gateway.cpu_seconds()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(call, range(clients)))
    finally:
        done.set()
        sampler.join()
    elapsed = time.monotonic() - started
    cpu = gateway.cpu_seconds() - cpu_before

    failures = sorted({(status, body.get("error", "")) for status, body in answers
                       if status != 200})
    assert not failures, failures
    assert [body for _, body in answers] == [{"echo": {"i": i, "sleep": 0.1}}
                                             for i in range(clients)]
    assert elapsed < 90  # 512 x 0.1 s on 2 replicas is ~26 s of predicting
    assert max(peak_rss) < 300 * 1024 * 1024, f"gateway RSS peaked at {max(peak_rss)} bytes"
    # No per-request busy polling: the gateway mostly sleeps while requests wait.
    assert cpu < 0.5 * elapsed, f"the gateway used {cpu:.1f}s of CPU in {elapsed:.1f}s"
    log = gateway.log()
    assert "Traceback" not in log and " ERROR " not in log, log


# -- the server (uWSGI) ------------------------------------------------------------------------


def _answer(response: requests.Response) -> tuple[int, str, dict, bytes]:
    headers = {name: response.headers.get(name) for name in ("Content-Type", "Retry-After")}
    return response.status_code, response.reason, headers, response.content


def test_the_fast_path_answers_as_flask_does(registry, replicas, start_gateway, tmp_path):
    # A plain POST is answered below Flask's dispatch (gateway/fast.py); any query string
    # sends it through Flask's route. Both must give the same status line, headers and body.
    deploy_echo(registry, tmp_path)
    replicas.start("echo")
    gateway = start_gateway("--max-body", "4096")
    url = gateway.url + "/shop/echo"
    bodies = [json.dumps({"x": 1}).encode(), b"{not json", b"[" * 101 + b"]" * 101,
              json.dumps({"fail": "on fire"}).encode(), b"NaN", b'"' + b"a" * 5000 + b'"']
    for body in bodies:
        fast = requests.post(url, data=body, timeout=30)
        flask = requests.post(url + "?debug=false", data=body, timeout=30)
        assert _answer(fast) == _answer(flask), body[:40]
    assert metric(gateway, "inferq_requests_total", api="echo", code="2xx") == 2


def test_a_chunked_body_and_large_headers_are_read(registry, replicas, start_gateway, tmp_path):
    record = deploy_echo(registry, tmp_path)
    replicas.start("echo")
    gateway = start_gateway("--max-body", "4096")
    url = gateway.url + "/shop/echo"

    def chunks(data: bytes, size: int):  # requests sends a generator chunked
        yield from (data[i:i + size] for i in range(0, len(data), size))

    sample = {"text": "chunked " * 100}
    chunked = requests.post(url, data=chunks(json.dumps(sample).encode(), 100), timeout=30)
    assert assert_json(chunked, 200) == {"echo": sample}
    too_big = requests.post(url, data=chunks(b'"' + b"a" * 9000 + b'"', 1000), timeout=30)
    assert assert_json(too_big, 413) == {
        "error": "the request body is over the 4096 byte limit", "api": "echo"}
    # A proxy's or a browser's headers (cookies, tokens) of several KiB are served too.
    big_headers = {"Authorization": "Bearer " + "t" * 6000, "Cookie": "c=" + "k" * 6000}
    answer = requests.post(url, json={"headers": "big"}, headers=big_headers, timeout=30)
    assert assert_json(answer, 200) == {"echo": {"headers": "big"}}
    assert recorded(record) == [sample, {"headers": "big"}]


def test_a_stopped_gateway_answers_what_it_holds_first(registry, replicas, start_gateway,
                                                       tmp_path):
    deploy_echo(registry, tmp_path)
    replicas.start("echo")
    gateway = start_gateway()
    url = gateway.url + "/shop/echo"
    release = tmp_path / "release"
    with ThreadPoolExecutor(1) as pool:
        held = hold_replica(url, registry, release, pool)
        gateway.process.send_signal(signal.SIGTERM)  # what docker stop and systemd send
        uwsgi_log = server_log(gateway.port)
        wait_until(lambda: "graceful shutdown" in uwsgi_log.read_text(), 30,
                   what="the gateway stopping")
        assert gateway.process.poll() is None  # the request in flight is answered first
        release.touch()
        assert assert_json(held.result(), 200) == {"echo": {"id": "held", "hold": str(release)}}
    assert gateway.process.wait(timeout=30) == 0
    assert not [p for p in psutil.process_iter(["ppid"]) if p.info["ppid"] == gateway.process.pid]


def test_two_gateway_processes_serve_one_port(registry, replicas, start_gateway, tmp_path):
    deploy_echo(registry, tmp_path)
    replicas.start("echo")
    gateway = start_gateway("--processes", "2", "--threads", "8")
    assert len(gateway.tree()) == 3  # uWSGI's master and two workers
    url = gateway.url + "/shop/echo"
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: post(url, {"i": i}, timeout=60), range(64)))
    assert [assert_json(answer, 200) for answer in answers] == [
        {"echo": {"i": i}} for i in range(64)]


# -- the CLI -----------------------------------------------------------------------------------


def test_inferq_predict_prints_the_prediction_or_the_error(registry, replicas, start_gateway,
                                                           tmp_path):
    deploy_echo(registry, tmp_path)
    replica = replicas.start("echo")
    gateway = start_gateway()
    env = {**os.environ, "INFERQ_GATEWAY_URL": gateway.url}
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"flower": "iris-cli-sample"}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fail": "cli failure"}))

    def predict(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(inferq_command("predict", *args), env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    ok = predict("echo", str(good), "--debug")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"echo": {"flower": "iris-cli-sample"}}
    wait_until(lambda: 'debug: sample: {"flower": "iris-cli-sample"}' in replicas.log(replica),
               10, what="the CLI's debug request logged")

    failed = predict("echo", str(bad))
    assert failed.returncode != 0
    assert "500" in failed.stderr
    assert re.search(r'"error": ?"prediction failed: cli failure"', failed.stderr), failed.stderr

    unknown = predict("nope", str(good))
    assert unknown.returncode != 0 and 'no API named "nope"' in unknown.stderr

    # Without INFERQ_GATEWAY_URL, the running stack's stack.json names the gateway.
    del env["INFERQ_GATEWAY_URL"]
    home().mkdir(parents=True, exist_ok=True)
    StackInfo(pid=os.getpid(), broker_url=registry.url, gateway_url=gateway.url).write()
    from_stack = predict("echo", str(good))
    assert from_stack.returncode == 0, from_stack.stderr
    assert json.loads(from_stack.stdout) == {"echo": {"flower": "iris-cli-sample"}}


def test_a_request_sent_again_after_a_broken_connection_is_queued_once(registry, tmp_path):
    """The sync path's queueing is idempotent: a gateway whose connection broke mid-call
    (queued or not?) sends the same request again once the broker answers."""
    deploy_echo(registry, tmp_path)
    args = ("inferq.echo", '{"m": 1}', "req-1", keys.reply("c:req-1"), 0.01)
    first = registry.queues.call(*args, changes=registry.deployments.changes(), limit=10, ttl=60)
    again = registry.queues.call(*args, changes=registry.deployments.changes(), limit=10, ttl=60)
    assert first[0] == again[0] == "queued"
    assert registry.queues.length("inferq.echo") == 1
