"""Streams: an API that consumes a Redis stream and adds its answers to another, over a real
Redis, real replicas and real consumers (the scaler starts them), through faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter

import pytest
import redis
import requests
from helpers import inferq_command, write_project

from inferq import keys
from inferq.deploy import deploy
from inferq.errors import DeployError
from inferq.processes import pid_alive, spawn, stop, wait_until
from inferq.stack import EmbeddedRedis, free_port, redis_server_binary
from inferq.streams import Streams

PREDICTOR = """
import os
import time


def predict(sample, metadata):
    time.sleep(float(metadata.get("slow", 0)))
    if sample.get("fail"):
        raise ValueError(f"cannot score {sample['id']}")
    return {"id": sample["id"], "double": sample["x"] * 2, "pid": os.getpid(),
            "version": metadata.get("version", "v1")}
"""

BATCHED = PREDICTOR + """

def predict_batch(samples, metadata):
    return [dict(predict(s, metadata), batch=len(samples)) for s in samples]
"""


def project(tmp_path, *, stream: str, compute: str = "{min_replicas: 1, max_replicas: 1}",
            metadata: str = "{}", predictor: str = PREDICTOR, name: str = "scorer"):
    return write_project(tmp_path / f"project-{name}", f"""\
        - kind: deployment
          name: events
        - kind: api
          name: {name}
          predictor: {{path: predictor.py, metadata: {metadata}}}
          compute: {compute}
          stream: {stream}
        """, {"predictor.py": predictor})


def add(client: redis.Redis, source: str, samples: list) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for sample in samples:
        pipe.xadd(source, {"data": sample if isinstance(sample, str) else json.dumps(sample)})
    return [i.decode() for i in pipe.execute()]


def entries(client: redis.Redis, key: str) -> list[dict]:
    return [{k.decode(): v.decode() for k, v in fields.items()} | {"id": i.decode()}
            for i, fields in client.xrange(key)]


def answered(client: redis.Redis, sink: str) -> list[dict]:
    return [{**e, "result": json.loads(e["result"])} if "result" in e else e
            for e in entries(client, sink)]


@pytest.fixture
def source(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_entries_in_answers_out_in_order_and_failures_in_the_dead_letter(
        registry, scalers, source, tmp_path):
    before = add(source, "events", [{"id": 0, "x": 0}])  # start: all takes it too
    deploy(project(tmp_path, stream="{source: events, start: all}"), registry)
    scalers.start()
    ids = before + add(source, "events", [{"id": n, "x": n} for n in range(1, 30)]
                       + ["not json", {"id": 30, "x": 1, "fail": True}]
                       + [{"id": n, "x": n} for n in range(31, 40)]
                       + ['{"x": NaN}', "[" * 5000 + "]" * 5000])
    wait_until(lambda: len(entries(source, "events:predictions")) == len(ids), 60,
               what="every entry answered")
    out = answered(source, "events:predictions")
    assert [e["source_id"] for e in out] == ids  # one answer each, in the stream's order
    results = [e["result"] for e in out if "result" in e]
    assert [r["id"] for r in results] == [n for n in range(40) if n != 30]
    assert all(r["double"] == 2 * r["id"] for r in results)
    errors = {e["source_id"]: e["error"] for e in out if "error" in e}
    assert errors[ids[30]].startswith("the sample is not JSON")
    assert errors[ids[31]] == "cannot score 30"
    assert errors[ids[41]] == "the sample is not JSON: NaN is not a JSON value"
    assert "nests deeper than 100 levels" in errors[ids[42]]  # the consumer lives on
    dead = entries(source, "events:predictions:failed")
    assert [(d["source_id"], d["sample"]) for d in dead] == [
        (ids[30], "not json"), (ids[31], json.dumps({"id": 30, "x": 1, "fail": True})),
        (ids[41], '{"x": NaN}'), (ids[42], "[" * 5000 + "]" * 5000)]
    group = source.xinfo_groups("events")[0]
    assert group["name"] == b"inferq:scorer" and group["pending"] == 0  # all acknowledged


def test_start_new_answers_only_what_comes_after_and_all_answers_everything(
        registry, scalers, source, tmp_path):
    old = add(source, "events", [{"id": n, "x": n} for n in range(5)])
    deploy(write_project(tmp_path / "both", """\
        - kind: deployment
          name: events
        - kind: api
          name: fresh
          predictor: {path: predictor.py}
          stream: {source: events, sink: fresh-out}
        - kind: api
          name: history
          predictor: {path: predictor.py}
          stream: {source: events, sink: history-out, start: all}
        """, {"predictor.py": PREDICTOR}), registry)
    # Added once the deploy returned, before any consumer runs: "new" counts from the deploy.
    new = add(source, "events", [{"id": n, "x": n} for n in range(5, 8)])
    scalers.start()
    wait_until(lambda: len(entries(source, "history-out")) == 8
               and len(entries(source, "fresh-out")) == 3, 60, what="both answered")
    assert [e["source_id"] for e in entries(source, "fresh-out")] == new
    assert [e["source_id"] for e in entries(source, "history-out")] == old + new


def _consumer_pid(registry, api: str) -> int:
    name = wait_until(lambda: Streams(registry).state(api).consumer, 60,
                      what="the stream's consumer reporting")
    return int(name.rsplit("-", 1)[1])


def _produce(source: redis.Redis, count: int, seconds: float, *, start: int = 0) -> list[str]:
    """``count`` entries spread over ``seconds`` (a producer at a steady rate)."""
    ids = []
    for n in range(start, start + count):
        ids += add(source, "events", [{"id": n, "x": n}])
        time.sleep(seconds / count)
    return ids


def _every_entry_answered(source: redis.Redis, ids: list[str], timeout: float = 90) -> int:
    """Wait until each of ``ids`` has a sink entry; return how many are answered twice."""
    def done() -> bool:
        return set(ids) <= {e["source_id"] for e in entries(source, "events:predictions")}

    wait_until(done, timeout, what="every entry answered")
    counted = Counter(e["source_id"] for e in entries(source, "events:predictions"))
    duplicates = sum(n - 1 for n in counted.values())
    print(f"{len(ids)} entries, {duplicates} answered twice")  # at least once: reported
    return duplicates


def test_a_sigkilled_consumer_is_replaced_and_no_entry_is_lost(registry, scalers, source,
                                                               tmp_path):
    deploy(project(tmp_path, stream="{source: events}", metadata="{slow: 0.002}"), registry)
    scalers.start()
    pid = _consumer_pid(registry, "scorer")
    ids = _produce(source, 100, 0.5)
    os.kill(pid, signal.SIGKILL)
    ids += _produce(source, 100, 0.5, start=100)
    wait_until(lambda: _consumer_pid(registry, "scorer") != pid, 60, what="a new consumer")
    duplicates = _every_entry_answered(source, ids)
    assert duplicates <= 64  # at most what the killed consumer had in flight
    assert source.xinfo_groups("events")[0]["pending"] == 0
    consumers = [c["name"] for c in source.xinfo_consumers("events", "inferq:scorer")]
    assert len(consumers) == 1  # the dead one's name was retired once its entries were claimed


def test_a_sigkilled_replica_loses_no_entry(registry, scalers, source, tmp_path):
    deploy(project(tmp_path, stream="{source: events}", metadata="{slow: 0.01}",
                   compute="{min_replicas: 2, max_replicas: 2}"), registry)
    scalers.start()
    _consumer_pid(registry, "scorer")
    wait_until(lambda: sum(r.status == "live" for r in registry.replicas.of("scorer")) == 2,
               60, what="2 replicas live")
    ids = _produce(source, 100, 0.5)
    (victim, *_) = [r for r in registry.replicas.of("scorer") if r.status == "live"]
    os.kill(victim.pid, signal.SIGKILL)
    ids += _produce(source, 100, 0.5, start=100)
    _every_entry_answered(source, ids)
    assert not [e for e in entries(source, "events:predictions") if "error" in e]


def test_a_broker_restart_mid_stream_loses_no_entry(redis_url, tmp_path):
    from helpers import Scalers

    from inferq.registry import Registry

    broker = EmbeddedRedis(tmp_path / "broker", port=free_port(), persist=True)
    broker.start()
    registry = Registry(broker.url, socket_timeout=5)
    pool = Scalers(broker.url, registry, tmp_path / "broker-scaler-logs")
    client = redis.Redis.from_url(broker.url)
    try:
        deploy(project(tmp_path, stream="{source: events}", metadata="{slow: 0.002}"), registry)
        pool.start()
        _consumer_pid(registry, "scorer")
        ids = _produce(client, 100, 0.5)
        broker.stop()  # a restart: it comes back on its port, from its append-only file
        broker = EmbeddedRedis(tmp_path / "broker", port=broker.port, persist=True)
        broker.start()
        ids += _produce(client, 100, 0.5, start=100)
        _every_entry_answered(client, ids, timeout=90)
    finally:
        client.close()
        pool.stop_all()
        registry.close()
        broker.stop()


def test_redeploys_and_a_delete_go_on_where_the_stream_stood(registry, scalers, source,
                                                             tmp_path):
    deploy(project(tmp_path, stream="{source: events}"), registry)
    scalers.start()
    _consumer_pid(registry, "scorer")
    first = add(source, "events", [{"id": n, "x": n} for n in range(10)])
    _every_entry_answered(source, first)
    # A redeploy (a new version, the same stream) keeps consuming through its rollout.
    deploy(project(tmp_path, stream="{source: events}", metadata="{version: v2}"), registry)
    second = add(source, "events", [{"id": n, "x": n} for n in range(10, 20)])
    _every_entry_answered(source, first + second)
    # Deleted, nothing is consumed; deployed again, it goes on from the group's position.
    consumer = _consumer_pid(registry, "scorer")
    registry.deployments.delete("events")
    wait_until(lambda: not pid_alive(consumer) and not registry.replicas.of("scorer"), 60,
               what="the consumer and the replicas stopped")
    during = add(source, "events", [{"id": n, "x": n} for n in range(20, 25)])
    assert len(entries(source, "events:predictions")) == 20
    deploy(project(tmp_path, stream="{source: events}", metadata="{version: v3}"), registry)
    _every_entry_answered(source, first + second + during)
    out = entries(source, "events:predictions")
    assert len(out) == 25, "an entry was read again"  # old entries were not re-read
    assert json.loads(out[-1]["result"])["version"] == "v3"


def test_a_source_on_a_second_redis_with_a_password_never_shows_it(registry, scalers,
                                                                   tmp_path):
    port = free_port()
    other = spawn([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                   "--requirepass", "s3cret-pass", "--save", "", "--appendonly", "no"])
    url = f"redis://:s3cret-pass@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        wait_until(lambda: _answers(client), 10, what="the second Redis answering")
        folder = project(tmp_path, stream=f"{{source: events, url: '{url}', start: all}}")
        ids = add(client, "events", [{"id": n, "x": n} for n in range(20)])
        deploy(folder, registry)
        scalers.start()
        _every_entry_answered(client, ids)
        assert not registry.redis.exists("events:predictions")  # on the second Redis only
        shown = [subprocess.run(inferq_command(*args), capture_output=True, text=True,
                                timeout=60, check=False)
                 for args in (("get",), ("get", "scorer"), ("deploy", "--dry-run",
                                                              str(folder)))]
        assert "redis://:***@127.0.0.1" in shown[1].stdout + shown[2].stdout
        for done in shown:
            assert "s3cret-pass" not in done.stdout + done.stderr
        assert "s3cret-pass" not in scalers.log()
    finally:
        client.close()
        stop(other)


def test_a_deploy_whose_stream_cannot_be_read_is_refused_and_says_why(registry, tmp_path):
    url = f"redis://:s3cret-pass@127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(DeployError) as refused:
        deploy(project(tmp_path, stream=f"{{source: events, url: '{url}'}}"), registry)
    message = str(refused.value)
    assert message.startswith("api scorer: its stream 'events' on redis://:***@127.0.0.1:")
    assert "cannot be read" in message and "s3cret-pass" not in message
    assert registry.deployments.names() == []  # nothing half-deployed


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_backlog_scales_an_idle_api_from_zero_and_shows_its_lag(registry, scalers, source,
                                                                  gateway, tmp_path):
    deploy(project(tmp_path, stream="{source: events}", metadata="{slow: 0.05}",
                   compute="{min_replicas: 0, max_replicas: 3}"), registry)
    scalers.start()
    _consumer_pid(registry, "scorer")
    assert registry.replicas.of("scorer") == []  # idle: scaled to zero
    ids = add(source, "events", [{"id": n, "x": n} for n in range(300)])
    wait_until(lambda: registry.hosts.plan().desired.get("scorer") == 3, 30,
               what="the backlog asking for max_replicas")
    shown = subprocess.run(inferq_command("get"), capture_output=True, text=True, timeout=60,
                           check=False).stdout
    lag = wait_until(lambda: _metric(gateway, "scorer"), 30, what="the lag in /metrics")
    assert lag > 0
    assert "stream" in shown and "events" in shown
    _every_entry_answered(source, ids, timeout=120)
    assert pid_alive(_consumer_pid(registry, "scorer"))


def _metric(gateway, api: str) -> float:
    text = requests.get(gateway.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f'inferq_stream_lag{{api="{api}"}} '):
            return float(line.split()[-1])
    return 0.0


def test_predict_batch_serves_a_stream_and_a_key_under_inferq_is_refused(
        registry, scalers, source, tmp_path):
    deploy(project(tmp_path, stream="{source: events}", predictor=BATCHED), registry)
    scalers.start()
    _consumer_pid(registry, "scorer")
    ids = add(source, "events", [{"id": n, "x": n} for n in range(200)])
    _every_entry_answered(source, ids)
    sizes = [json.loads(e["result"]).get("batch", 1)
             for e in entries(source, "events:predictions")]
    assert max(sizes) > 1  # a backlog travels in batch messages, to predict_batch
    done = subprocess.run(inferq_command("deploy", "--dry-run", str(project(
        tmp_path, stream="{source: 'inferq:events'}", name="bad"))), capture_output=True,
        text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert 'api "bad": stream.source: "inferq:events" is under inferq\'s own keys' in done.stderr
    assert keys.stream_state("scorer") != "events"
