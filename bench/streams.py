"""Streams: how fast an API drains a stream, how soon a steady stream's entries are answered,
what draining costs live requests, and the consumer's memory, in one run.

One stack (``inferq up`` with its embedded Redis, 2 replicas of bench/peers.py's iris-like
predictor with a ``predict_batch``, its API consuming the stream ``bench-in``), then:

(a) ``Client.map(batch_size=64, window=512)`` over N samples (``--samples``, default 100,000),
    then the same N samples as a backlog on the stream (added while the consumer process is
    stopped with SIGSTOP), timed from its SIGCONT to the last answer in the sink: samples/s
    of each and the stream as a share of the map (issue 20: >= 90%). Answers are checked.
(b) A producer process adding 200 entries a second (``--rate``) for ``--seconds``, each entry
    timed from its ``XADD`` to its answer in the sink (read by a blocking ``XREAD``), against
    ``Client.predict`` round trips in the same run (issue 20: p50 <= 2x, p99 <= 4x).
(c) Sequential synchronous requests through the gateway for ``--seconds``, idle, then while
    a backlog of ``--beside`` entries (200,000; added as in (a)) drains (issue 20: within 2x).
(d) A producer process adding ``--big`` entries (1,000,000) as fast as it can while the
    consumer drains them; the consumer process's RSS sampled every 0.2 s throughout: its peak
    next to the RSS once 10% was answered (flat: bounded by its window, whatever the backlog).

    .venv/bin/python bench/streams.py [--samples 50000] [--beside 100000] [--big 300000]
                                      [--seconds 8]

Figures from one run are comparable with each other only (bench/README.md). Exit status 1
when an answer is wrong or missing, or a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import redis

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from batching import PREDICT_BATCH, broker_url  # bench/
from harness import load_predictor
from jobs import make_samples, sync_latency
from peers import API, Processes, start_inferq, write_project

from inferq import Client
from inferq.processes import wait_until
from inferq.registry import Registry
from inferq.streams import Streams

REPLICAS = 2
BATCH, WINDOW = 64, 512
SOURCE, SINK = "bench-in", "bench-in:predictions"
STREAM = f"  stream: {{source: {SOURCE}, sink_max_len: 2000000}}\n"


def pipelined_add(client: redis.Redis, samples: list, chunk: int = 2000) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(samples), chunk):
        pipe = client.pipeline(transaction=False)
        for sample in samples[start:start + chunk]:
            pipe.xadd(SOURCE, {"data": json.dumps(sample)})
        ids += [i.decode() for i in pipe.execute()]
    return ids


def wait_answered(client: redis.Redis, count: int, start_length: int,
                  timeout: float = 1800) -> float:
    """Until the sink grew by ``count``; when that was (monotonic)."""
    deadline = time.monotonic() + timeout
    while client.xlen(SINK) < start_length + count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sink holds {client.xlen(SINK) - start_length} of {count}")
        time.sleep(0.005)
    return time.monotonic()


def settle(client: redis.Redis) -> None:
    """Between measurements: the streams emptied (what was answered is no longer needed) and
    no rewrite of the embedded Redis's append-only file under way (its fork and writes are
    not what the next figure measures)."""
    for key in (SOURCE, SINK):
        client.xtrim(key, maxlen=0)
    client.execute_command("BGREWRITEAOF")
    wait_until(lambda: all(int(client.info("persistence")[k]) == 0 for k in (
        "aof_rewrite_in_progress", "aof_rewrite_scheduled", "rdb_bgsave_in_progress")), 120,
        interval=0.1, what="the append-only file rewritten")


def consumer_pid(registry: Registry) -> int:
    name = wait_until(lambda: Streams(registry).state(API).consumer, 60,
                      what="the stream's consumer")
    return int(name.rsplit("-", 1)[1])


def drain(client: redis.Redis, registry: Registry, samples: list, expected: list) -> float:
    """(a): samples/s of a backlog: the entries are added while the consumer is stopped
    (SIGSTOP; its lease outlives the pause), then timed from its SIGCONT to the last answer.
    The answers are checked."""
    before = client.xlen(SINK)
    last = client.xrevrange(SINK, count=1)
    after = last[0][0].decode() if last else None
    pid = consumer_pid(registry)
    os.kill(pid, signal.SIGSTOP)
    try:
        ids = pipelined_add(client, samples)
    finally:
        os.kill(pid, signal.SIGCONT)
    began = time.monotonic()
    ended = wait_answered(client, len(samples), before)
    answers = client.xrange(SINK, min=f"({after}" if after else "-", max="+")
    got = [(f[b"source_id"].decode(), json.loads(f[b"result"])) for _, f in answers]
    if [i for i, _ in got] != ids or [r for _, r in got] != expected:
        raise RuntimeError("the stream's answers are not the samples' predictions, in order")
    return len(samples) / (ended - began)


PRODUCER = """
import json, sys, time
import redis
url, rate, seconds, out, key = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), *sys.argv[4:6]
client = redis.Redis.from_url(url)
sample = {"sepal_length": 5.2, "sepal_width": 3.6, "petal_length": 1.4, "petal_width": 0.3}
sent = {}
start = time.monotonic()
n = 0
while time.monotonic() - start < seconds:
    due = start + n / rate
    time.sleep(max(0.0, due - time.monotonic()))
    at = time.time()
    sent[client.xadd(key, {"data": json.dumps(sample)}).decode()] = at
    n += 1
json.dump(sent, open(out, "w"))
"""


BULK_PRODUCER = f"""
import json, sys
import redis
sys.path.insert(0, {str(BENCH)!r})
from jobs import make_samples
client = redis.Redis.from_url(sys.argv[1])
samples = make_samples(int(sys.argv[2]), seed=17)
for start in range(0, len(samples), 2000):
    pipe = client.pipeline(transaction=False)
    for sample in samples[start:start + 2000]:
        pipe.xadd("{SOURCE}", {{"data": json.dumps(sample)}})
    pipe.execute()
"""


def steady(url: str, workdir: Path, rate: float, seconds: float, *, source: str = SOURCE,
           sink: str = SINK) -> list[float]:
    """(b): XADD-to-answer latency of each entry of a producer at ``rate`` entries/s, as a
    reader of ``sink`` sees it (with ``sink`` = ``source``: the reader's own hop, no API)."""
    client = redis.Redis.from_url(url)
    seen: dict[str, float] = {}
    stop = threading.Event()
    last = client.xrevrange(sink, count=1)
    after = last[0][0].decode() if last else "$"

    def observe() -> None:
        nonlocal after
        reader = redis.Redis.from_url(url)
        while not stop.is_set():
            for _, entries in reader.xread({sink: after}, block=200) or []:
                for entry_id, fields in entries:
                    seen.setdefault(fields.get(b"source_id", entry_id).decode(), time.time())
                    after = entry_id.decode()

    watcher = threading.Thread(target=observe)
    watcher.start()
    out = workdir / "sent.json"
    subprocess.run([sys.executable, "-c", PRODUCER, url, str(rate), str(seconds), str(out),
                    source], check=True, timeout=seconds + 60)
    sent = json.loads(out.read_text())
    deadline = time.monotonic() + 60
    while not set(sent) <= set(seen) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    watcher.join()
    missing = set(sent) - set(seen)
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(sent)} entries never answered")
    return sorted(seen[i] - at for i, at in sent.items())


def predict_round_trips(client: Client, sample: dict, seconds: float) -> list[float]:
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()
        client.predict(API, sample)
        times.append(time.perf_counter() - began)
    return sorted(times)


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--beside", type=int, default=200_000)
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    missed = []

    with tempfile.TemporaryDirectory(prefix="inferq-bench-streams-") as tmp, \
            Processes(Path(tmp)) as procs:
        workdir = Path(tmp)
        project = write_project(workdir, REPLICAS)
        with open(project / "predictor.py", "a") as file:
            file.write(PREDICT_BATCH)
        with open(project / "cortex.yaml", "a") as file:
            file.write(STREAM)
        predictor = load_predictor(project / "predictor.py")
        served = start_inferq(procs, project, REPLICAS)
        url = broker_url(served.home)
        stream = redis.Redis.from_url(url)
        registry = Registry(url)
        samples = make_samples(args.samples)
        expected = [predictor.predict(s, {}) for s in samples]

        with Client(url) as client:
            list(client.map(API, samples[:2000], batch_size=BATCH, window=WINDOW))  # warm
            settle(stream)
            began = time.perf_counter()
            mapped = list(client.map(API, samples, batch_size=BATCH, window=WINDOW))
            map_rate = len(samples) / (time.perf_counter() - began)
            assert mapped == expected, "Client.map answered wrongly"
            drain(stream, registry, samples[:2000], expected[:2000])  # warm
            settle(stream)
            stream_rate = drain(stream, registry, samples, expected)

            settle(stream)
            latencies = steady(url, workdir, args.rate, args.seconds)
            hops = steady(url, workdir, args.rate, args.seconds, source="bench-hop",
                          sink="bench-hop")
            trips = predict_round_trips(client, samples[0], args.seconds)

        sample, answer = samples[0], expected[0]
        settle(stream)
        idle = sync_latency(served.port, served.path, sample, answer, args.seconds)
        beside = make_samples(args.beside, seed=16)
        start_length = stream.xlen(SINK)
        pid = consumer_pid(registry)
        os.kill(pid, signal.SIGSTOP)  # a backlog, as after a pause (the lease outlives it)
        try:
            pipelined_add(stream, beside)
        finally:
            os.kill(pid, signal.SIGCONT)
        began = time.monotonic()
        during = sync_latency(served.port, served.path, sample, answer, args.seconds)
        draining = stream.xlen(SINK) - start_length < args.beside
        beside_end = wait_answered(stream, args.beside, start_length)

        # (d) the consumer's memory while a producer process adds --big entries at full speed
        settle(stream)
        start_length = stream.xlen(SINK)
        peak = early = 0
        answered_at_early = args.big // 10
        done = threading.Event()

        def watch_consumer() -> None:
            nonlocal peak, early
            while not done.is_set():
                consumer = Streams(registry).state(API).consumer
                with contextlib.suppress(psutil.NoSuchProcess, ValueError, AttributeError):
                    rss = psutil.Process(int(consumer.rsplit("-", 1)[1])).memory_info().rss
                    peak = max(peak, rss)
                    if not early and stream.xlen(SINK) - start_length >= answered_at_early:
                        early = rss
                done.wait(0.2)

        watcher = threading.Thread(target=watch_consumer)
        watcher.start()
        big_began = time.monotonic()
        subprocess.run([sys.executable, "-c", BULK_PRODUCER, url, str(args.big)], check=True,
                       timeout=1800)
        big_end = wait_answered(stream, args.big, start_length)
        done.set()
        watcher.join()
        registry.close()

    ratio = stream_rate / map_rate
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    t50, t99 = percentile(trips, 50), percentile(trips, 99)
    print(f"\n# streams: {REPLICAS} replicas, the iris-like predictor with predict_batch\n")
    print(f"Client.map                       {map_rate:10,.0f} samples/s")
    print(f"a backlog of {len(samples):,} drained    {stream_rate:10,.0f} samples/s   "
          f"{ratio:.0%} of map (target >= 90%)")
    print(f"\n# a steady stream of {args.rate:g} entries/s for {args.seconds:g}s: XADD to "
          "answer, against Client.predict\n")
    h50, h99 = percentile(hops, 50), percentile(hops, 99)
    s50, s99 = p50 - h50, p99 - h99  # to the sink entry: less the reader's own hop
    print(f"{'':34}{'p50':>10}{'p99':>10}{'mean':>10}")
    print(f"{'stream entry, as a reader sees it':34}{p50 * 1000:9.2f}m{p99 * 1000:9.2f}m"
          f"{statistics.mean(latencies) * 1000:9.2f}m")
    print(f"{'a reader alone, XADD to XREAD':34}{h50 * 1000:9.2f}m{h99 * 1000:9.2f}m"
          f"{statistics.mean(hops) * 1000:9.2f}m")
    print(f"{'stream entry, to its sink entry':34}{s50 * 1000:9.2f}m{s99 * 1000:9.2f}m")
    print(f"{'Client.predict':34}{t50 * 1000:9.2f}m{t99 * 1000:9.2f}m"
          f"{statistics.mean(trips) * 1000:9.2f}m")
    print(f"{'to the sink / predict (2x, 4x)':34}{s50 / t50:9.2f}x{s99 / t99:9.2f}x")
    print(f"{'as seen / predict':34}{p50 / t50:9.2f}x{p99 / t99:9.2f}x")
    print(f"\n# sync requests, one at a time, {args.seconds:g}s each, idle and while a backlog "
          f"of {args.beside:,} drains ({'it drained throughout' if draining else 'IT ENDED EARLY'})"
          "\n")
    print(f"{'':16}{'p50':>10}{'p90':>10}{'p99':>10}")
    print(f"{'idle':16}" + "".join(f"{idle[p] * 1000:9.2f}m" for p in (50, 90, 99)))
    print(f"{'beside a stream':16}" + "".join(f"{during[p] * 1000:9.2f}m"
                                              for p in (50, 90, 99)))
    print(f"{'ratio':16}" + "".join(f"{during[p] / idle[p]:9.2f}x" for p in (50, 90, 99)))
    print(f"\nthe backlog of {args.beside:,}: {args.beside / (beside_end - began):,.0f} "
          "entries/s beside the sync requests")
    print(f"\n# {args.big:,} entries added by a producer process as fast as it can: "
          f"{args.big / (big_end - big_began):,.0f} entries/s answered")
    print(f"consumer RSS: {early / 2**20:.1f} MiB once 10% was answered, peak "
          f"{peak / 2**20:.1f} MiB")
    if ratio < 0.9:
        missed.append("backlog drain >= 90% of map")
    if s50 > 2 * t50 or s99 > 4 * t99:
        missed.append("steady-stream latency within 2x / 4x of Client.predict")
    if during[50] > 2 * idle[50]:
        missed.append("sync p50 beside a draining stream within 2x of idle")
    if early and peak > 1.5 * early:
        missed.append("consumer memory flat")
    for target in missed:
        print(f"MISSED: {target}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
