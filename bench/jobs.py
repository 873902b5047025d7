"""Batch jobs: a job's samples/s next to ``Client.map``'s, sync latency beside a job, and
the memory a large job's driver holds, in one run.

One stack (``inferq up`` with its embedded Redis, 2 replicas of bench/peers.py's iris-like
predictor with a ``predict_batch``), then:

(a) ``Client.map(batch_size=64, window=512)`` over N samples (``--samples``, default 100,000),
    and a batch job over the same samples in a JSON Lines file (same batch size and window),
    timed from submit to its end and by its own rate (from its driver's start): samples/s of
    each, and the job as a share of the map. Both
    answers are checked against the predictor run in this process.
(b) Sequential synchronous requests through the gateway for ``--seconds``, idle, then while
    a job of ``--big`` samples (default 1,000,000) runs: p50 / p90 / p99 and their ratios
    (issue 15: within 2x). Then the same on a stack of its own whose predictor takes
    ``--slow-ms`` (default 5) a sample without ``predict_batch``, where chunks of 64 would
    hold a replica 64 times as long as a request (the driver sizes its chunks down).
(c) The peak RSS of that big job's driver process, sampled every 0.2 s, against the input's
    size: bounded memory means it stays flat whatever the input's size.

    .venv/bin/python bench/jobs.py [--samples 50000] [--big 300000] [--seconds 8]

Figures from one run are comparable with each other only (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import contextlib

from batching import PREDICT_BATCH, broker_url  # bench/
from harness import load, load_predictor
from peers import API, Processes, start_inferq, write_project

from inferq import Client

REPLICAS = 2
BATCH, WINDOW = 64, 512


def make_samples(count: int, seed: int = 15) -> list[dict[str, float]]:
    rng = random.Random(seed)
    return [{"sepal_length": round(rng.uniform(4, 8), 1),
             "sepal_width": round(rng.uniform(2, 4.5), 1),
             "petal_length": round(rng.uniform(1, 7), 1),
             "petal_width": round(rng.uniform(0.1, 2.5), 1)}
            for _ in range(count)]


def write_jsonl(path: Path, samples: list) -> Path:
    with open(path, "w") as file:
        for sample in samples:
            file.write(json.dumps(sample) + "\n")
    return path


def run_job(client: Client, source: Path, output: Path, *, watch_driver: bool = False
            ) -> tuple[dict, float, int]:
    """Submit a job and wait for it; (its end state, wall seconds, driver's peak RSS)."""
    peak = 0
    began = time.perf_counter()
    job = client.batch(API, source, output, batch_size=BATCH, window=WINDOW)
    while True:
        state = job.status()
        if watch_driver and state["status"] == "running":
            driver = client.jobs.require(job.id).driver
            with contextlib.suppress(psutil.NoSuchProcess, ValueError, IndexError):
                peak = max(peak, psutil.Process(int(driver.rsplit(":", 1)[1])).memory_info().rss)
        if state["status"] in ("succeeded", "completed with failures", "failed", "stopped"):
            return state, time.perf_counter() - began, peak
        time.sleep(0.2 if watch_driver else 0.05)


def sync_latency(port: int, endpoint: str, sample: dict, expected: str, seconds: float) -> dict:
    run = load(port, endpoint, sample, expected, clients=1, seconds=seconds, warmup=20)
    if run.errors:
        raise RuntimeError(f"{run.errors} sync requests failed: {dict(run.outcomes)}")
    return {p: run.percentile(p) for p in (50, 90, 99)}


SLOW_PREDICTOR = """
import time

def predict(sample, metadata):
    time.sleep({seconds})
    return "ok"
"""


def slow_case(workdir: Path, slow_ms: float, seconds: float) -> tuple[dict, dict, bool]:
    """Sync latency idle and beside a job, for a predictor at ``slow_ms`` a sample without
    predict_batch: with chunks of 64 a request would wait behind 64 x slow_ms."""
    workdir.mkdir()
    with Processes(workdir) as procs:
        project = write_project(workdir, REPLICAS)
        (project / "predictor.py").write_text(SLOW_PREDICTOR.format(seconds=slow_ms / 1000))
        sample = {"x": 1}
        served = start_inferq(procs, project, REPLICAS, sample=sample, expected="ok")
        source = write_jsonl(workdir / "in.jsonl", [{"x": i} for i in range(
            int(4 * seconds * REPLICAS * 1000 / slow_ms))])  # lasts about 4 x seconds
        idle = sync_latency(served.port, served.path, sample, "ok", seconds)
        with Client(broker_url(served.home)) as client:
            job = client.batch(API, source, workdir / "out.jsonl", batch_size=BATCH,
                               window=WINDOW)
            time.sleep(1.0)  # the job under way (a benchmark, not a test: a plain pause)
            during = sync_latency(served.port, served.path, sample, "ok", seconds)
            running = job.status()["status"] == "running"
            job.stop()
    return idle, during, running


def print_latency(idle: dict, during: dict) -> None:
    print(f"{'':16}{'p50':>10}{'p90':>10}{'p99':>10}")
    print(f"{'idle':16}" + "".join(f"{idle[p] * 1000:9.2f}m" for p in (50, 90, 99)))
    print(f"{'beside a job':16}" + "".join(f"{during[p] * 1000:9.2f}m" for p in (50, 90, 99)))
    print(f"{'ratio':16}" + "".join(f"{during[p] / idle[p]:9.2f}x" for p in (50, 90, 99)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--slow-ms", type=float, default=5.0,
                        help="the slow predictor's time per sample (0: skip that case)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="inferq-bench-jobs-") as tmp, \
            Processes(Path(tmp)) as procs:
        workdir = Path(tmp)
        project = write_project(workdir, REPLICAS)
        with open(project / "predictor.py", "a") as file:
            file.write(PREDICT_BATCH)
        predictor = load_predictor(project / "predictor.py")
        served = start_inferq(procs, project, REPLICAS)
        samples = make_samples(args.samples)
        expected = [predictor.predict(s, {}) for s in samples]
        source = write_jsonl(workdir / "in.jsonl", samples)

        with Client(broker_url(served.home)) as client:
            list(client.map(API, samples[:2000], batch_size=BATCH, window=WINDOW))  # warm
            began = time.perf_counter()
            mapped = list(client.map(API, samples, batch_size=BATCH, window=WINDOW))
            map_rate = len(samples) / (time.perf_counter() - began)
            assert mapped == expected, "Client.map answered wrongly"

            state, took, _ = run_job(client, source, workdir / "out.jsonl")
            job_rate = len(samples) / took
            with open(workdir / "out.jsonl") as file:
                written = [json.loads(line)["result"] for line in file]
            assert state["status"] == "succeeded" and written == expected, state

            sample, answer = samples[0], expected[0]
            idle = sync_latency(served.port, served.path, sample, answer, args.seconds)
            big = write_jsonl(workdir / "big.jsonl", make_samples(args.big, seed=16))
            big_mib = big.stat().st_size / 2**20
            during: dict = {}
            outcome: dict = {}

            def job_thread() -> None:
                outcome["state"], outcome["took"], outcome["peak"] = run_job(
                    client, big, workdir / "big.out.jsonl", watch_driver=True)

            runner = threading.Thread(target=job_thread)
            runner.start()
            time.sleep(2.0)  # the job under way (a benchmark, not a test: a plain pause)
            during = sync_latency(served.port, served.path, sample, answer, args.seconds)
            still_running = runner.is_alive()
            runner.join()
    if args.slow_ms:  # on a stack of its own, the first one stopped
        with tempfile.TemporaryDirectory(prefix="inferq-bench-jobs-") as tmp:
            slow = slow_case(Path(tmp) / "slow", args.slow_ms, args.seconds)

    print(f"\n# batch jobs: {REPLICAS} replicas, batch {BATCH}, window {WINDOW}, "
          f"{len(samples):,} samples\n")
    print(f"Client.map            {map_rate:10,.0f} samples/s")
    print(f"batch job, submit->end{job_rate:10,.0f} samples/s   "
          f"{job_rate / map_rate:.0%} of map (a driver starts: ~1 s)")
    print(f"batch job, its own run{state['rate']:10,.0f} samples/s   "
          f"{state['rate'] / map_rate:.0%} of map (from the driver's start)")
    print(f"\n# sync requests, one at a time, {args.seconds:g}s each "
          f"({'the job ran throughout' if still_running else 'THE JOB ENDED EARLY'})\n")
    print_latency(idle, during)
    big_state = outcome.get("state", {})
    print(f"\n# the big job: {args.big:,} samples ({big_mib:.1f} MiB of "
          f"input), {big_state.get('status')}, {args.big / outcome.get('took', 1):,.0f} "
          f"samples/s beside the sync requests")
    print(f"driver peak RSS       {outcome.get('peak', 0) / 2**20:10.1f} MiB")
    if args.slow_ms:
        throughout = "the job ran throughout" if slow[2] else "THE JOB ENDED EARLY"
        print(f"\n# sync requests beside a job, a predictor at {args.slow_ms:g} ms a sample "
              f"without predict_batch ({throughout})\n")
        print_latency(slow[0], slow[1])
    return 0 if big_state.get("status") == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
