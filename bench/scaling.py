"""How fast the scaler follows a burst: replicas up when it starts, back down when it ends.

One run starts everything it needs and stops all of it at the end (also on Ctrl-C):

- a private Redis (embedded, no persistence) on a free 127.0.0.1 port, in a temp dir;
- one scaler process (``python -m inferq scaler --host-name bench --quiet``) with
  ``INFERQ_BROKER_URL`` and ``INFERQ_HOME`` pointing at them;
- a temp project: API ``burst`` with ``min_replicas: 1, max_replicas: 4`` whose ``predict``
  sleeps 200 ms; the stabilization windows are the defaults unless ``--downscale`` is given.

Once one replica is live it sends a burst with the Python client (``--concurrency`` clients,
each in a closed loop, ``--requests`` requests in all) while a thread polls the registry's
replica records every 50 ms, and prints:

- for each added replica, the time from the burst's start until its record appeared
  ("started": the scaler spawned its process) and until it was live;
- p50 / p99 latency of the burst's requests and its throughput;
- the time from the burst's end until the API was back at one replica (exactly one record,
  and it is live: nothing stopping or starting), bounded by ``--settle-timeout``.

Targets: the first new replica started within 2 s of the burst; back to one replica within
60 s of the load ending.

    .venv/bin/python bench/scaling.py [--requests 200] [--concurrency 16] [--downscale 30s]
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import redis

from inferq import Client
from inferq.deploy import deploy
from inferq.errors import InferqError
from inferq.processes import spawn, stop, wait_until
from inferq.registry import Registry
from inferq.stack import EmbeddedRedis

API = "burst"
POLL_SECONDS = 0.05
TARGET_FIRST_START_S = 2.0
TARGET_BACK_TO_ONE_S = 60.0

PREDICTOR = """
import time

def predict(sample, metadata):
    time.sleep(sample.get("sleep", 0.2))
    return {"ok": True}
"""


def cortex_yaml(downscale: str | None) -> str:
    extra = f", downscale_stabilization_period: {downscale}" if downscale else ""
    return textwrap.dedent(
        f"""\
        - kind: deployment
          name: bench
        - kind: api
          name: {API}
          predictor:
            path: predictor.py
          compute: {{min_replicas: 1, max_replicas: 4{extra}}}
        """
    )


@dataclass
class Watch:
    """What the poller saw: when each replica record appeared, became live, stopped, vanished."""

    appeared: dict[str, float] = field(default_factory=dict)
    live: dict[str, float] = field(default_factory=dict)
    stopping: dict[str, float] = field(default_factory=dict)
    gone: dict[str, float] = field(default_factory=dict)
    baseline: set[str] = field(default_factory=set)  # records present before the burst
    desired: list[tuple[float, int]] = field(default_factory=list)  # plan changes
    records: list[dict] = field(default_factory=list)  # the latest poll
    polls: int = 0
    error: str | None = None


class Poller(threading.Thread):
    """Polls the API's replica records and the plan's desired count every 50 ms."""

    def __init__(self, broker_url: str, watch: Watch) -> None:
        super().__init__(name="bench-poller", daemon=True)
        self.registry = Registry(broker_url)
        self.watch = watch
        self.lock = threading.Lock()
        self.halt = threading.Event()

    def run(self) -> None:
        seen: set[str] = set()
        last_desired = None
        try:
            while not self.halt.is_set():
                now = time.monotonic()
                records = self.registry.replicas.of(API)
                desired = self.registry.hosts.plan().desired.get(API)
                with self.lock:
                    w = self.watch
                    ids = {r.id for r in records}
                    for record in records:
                        rid = record.id
                        w.appeared.setdefault(rid, now)
                        if record.status == "live":
                            w.live.setdefault(rid, now)
                        elif record.status == "stopping":
                            w.stopping.setdefault(rid, now)
                    for rid in seen - ids:
                        w.gone.setdefault(rid, now)
                    seen = ids
                    if desired != last_desired:
                        w.desired.append((now, desired))
                        last_desired = desired
                    w.records = records
                    w.polls += 1
                self.halt.wait(max(0.0, POLL_SECONDS - (time.monotonic() - now)))
        except redis.RedisError as exc:  # the broker went away
            if not self.halt.is_set():
                self.watch.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.registry.close()

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.watch.records)

    def close(self) -> None:
        self.halt.set()
        self.join(timeout=5)


@dataclass
class Burst:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0


def run_burst(clients: list[Client], requests: int, sleep: float, timeout: float,
              halt: threading.Event) -> Burst:
    """``len(clients)`` closed loops, one per client, ``requests`` requests in all."""
    burst = Burst()
    lock = threading.Lock()
    remaining = [requests]

    def take() -> bool:
        with lock:
            if remaining[0] <= 0 or halt.is_set():
                return False
            remaining[0] -= 1
            return True

    def loop(client: Client) -> None:
        while take():
            began = time.monotonic()
            try:
                client.submit(API, {"sleep": sleep}, timeout=timeout).result(timeout + 5)
                elapsed = time.monotonic() - began
                with lock:
                    burst.latencies.append(elapsed)
            except (InferqError, FutureTimeout) as exc:  # counted and reported, the burst goes on
                with lock:
                    burst.errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in clients]
    burst.started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # join in slices so Ctrl-C is not held up
            thread.join(0.2)
    burst.ended = time.monotonic()
    return burst


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def back_to_one(records: list[dict]) -> bool:
    """Exactly one replica record and it is live: nothing stopping, nothing starting."""
    return len(records) == 1 and records[0].status == "live"


def report(args: argparse.Namespace, watch: Watch, burst: Burst,
           settled_at: float | None) -> list[str]:
    misses = []
    t0 = burst.started
    print()
    print(f"burst: {args.requests} requests, {args.concurrency} clients in a closed loop, "
          f"predict sleeps {args.sleep * 1000:.0f} ms, downscale_stabilization_period "
          f"{args.downscale or '30s (default)'}")
    added = sorted((t, rid) for rid, t in watch.appeared.items() if rid not in watch.baseline)
    if not added:
        print("no replica was added during the burst")
    for n, (appeared, rid) in enumerate(added, start=2):
        live = watch.live.get(rid)
        live_s = f"+{live - t0:6.2f} s" if live is not None else "   never"
        print(f"replica {n} started {appeared - t0:+6.2f} s   live {live_s}   ({rid})")
    first = added[0][0] - t0 if added else None
    for at, desired in watch.desired:
        if at >= t0:
            print(f"plan: desired {desired} at {at - t0:+6.2f} s")
    lat = burst.latencies
    if lat:
        print(f"latency p50          {percentile(lat, 50) * 1000:8.1f} ms")
        print(f"latency p99          {percentile(lat, 99) * 1000:8.1f} ms")
        print(f"latency max          {max(lat) * 1000:8.1f} ms")
        print(f"latency mean         {statistics.fmean(lat) * 1000:8.1f} ms")
    duration = burst.ended - burst.started
    print(f"burst duration       {duration:8.2f} s")
    print(f"throughput           {len(lat) / duration if duration else 0:8.1f} req/s "
          f"({len(lat)} ok, {len(burst.errors)} failed)")
    for error in sorted(set(burst.errors))[:5]:
        print(f"  error: {error}")
    stops = sorted(t for rid, t in watch.stopping.items())
    if stops:
        print(f"first replica stopping  +{stops[0] - burst.ended:6.2f} s after the burst's end")
    if settled_at is not None:
        settle = settled_at - burst.ended
        print(f"back to 1 replica       +{settle:6.2f} s after the burst's end")
    else:
        settle = None
        print(f"back to 1 replica       not within {args.settle_timeout:g} s of the burst's end")
    print()
    if first is None or first > TARGET_FIRST_START_S:
        misses.append("first new replica started")
    print(f"target: first new replica started within {TARGET_FIRST_START_S:g} s: "
          + (f"{first:.2f} s " if first is not None else "none ")
          + ("ok" if first is not None and first <= TARGET_FIRST_START_S else "MISSED"))
    if settle is None or settle > TARGET_BACK_TO_ONE_S:
        misses.append("back to 1 replica")
    print(f"target: back to 1 replica within {TARGET_BACK_TO_ONE_S:g} s of the load ending: "
          + (f"{settle:.2f} s " if settle is not None else "never ")
          + ("ok" if settle is not None and settle <= TARGET_BACK_TO_ONE_S else "MISSED"))
    return misses


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests in the burst")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="clients, each in a closed loop (one request at a time)")
    parser.add_argument("--sleep", type=float, default=0.2, help="seconds predict() sleeps")
    parser.add_argument("--downscale", metavar="DURATION",
                        help="compute.downscale_stabilization_period (default: the default, 30s)")
    parser.add_argument("--settle-timeout", type=float, default=120.0,
                        help="seconds to wait after the burst for the API to be back at 1")
    parser.add_argument("--keep-logs", action="store_true",
                        help="print the scaler's log at the end")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _interrupt)  # stops the benchmark as Ctrl-C does

    tmp = tempfile.TemporaryDirectory(prefix="inferq-bench-")
    root = Path(tmp.name)
    server = EmbeddedRedis(root / "redis", persist=False)
    scaler: subprocess.Popen | None = None
    poller: Poller | None = None
    clients: list[Client] = []
    registry: Registry | None = None
    halt = threading.Event()
    scaler_log = root / "scaler.log"
    misses: list[str] = []
    try:
        url = server.start()
        home = root / "home"
        home.mkdir()
        env = {**os.environ, "INFERQ_BROKER_URL": url, "INFERQ_HOME": str(home)}
        with open(scaler_log, "wb") as log:
            scaler = spawn([sys.executable, "-m", "inferq", "scaler", "--host-name", "bench",
                            "--quiet"], env=env, stdout=log, stderr=subprocess.STDOUT)
        print(f"redis {url} (pid {server.process.pid}), scaler pid {scaler.pid}")

        project = root / "project"
        project.mkdir()
        (project / "cortex.yaml").write_text(cortex_yaml(args.downscale))
        (project / "predictor.py").write_text(PREDICTOR)
        registry = Registry(url)
        deploy(project, registry)

        def one_live() -> bool:
            if scaler.poll() is not None:
                raise RuntimeError(f"the scaler exited ({scaler.returncode}):\n"
                                   + scaler_log.read_text(errors="replace")[-3000:])
            return back_to_one(registry.replicas.of(API))

        began = time.monotonic()
        wait_until(one_live, 90, interval=0.05, what="1 live replica")
        print(f"1 replica live after {time.monotonic() - began:.2f} s")

        clients = [Client(url) for _ in range(args.concurrency)]
        for client in clients:
            client.apis()  # connect and cache the deployed APIs before the clock starts

        watch = Watch()
        poller = Poller(url, watch)
        poller.start()
        wait_until(lambda: watch.polls >= 2, 10, what="the poller running")
        with poller.lock:
            watch.baseline = set(watch.appeared)

        print(f"burst: {args.requests} requests from {args.concurrency} clients ...")
        timeout = max(60.0, args.requests * args.sleep * 2)
        burst = run_burst(clients, args.requests, args.sleep, timeout, halt)
        print(f"burst done in {burst.ended - burst.started:.2f} s; waiting for 1 replica "
              f"(at most {args.settle_timeout:g} s) ...")

        settled_at = None
        deadline = burst.ended + args.settle_timeout
        while time.monotonic() < deadline:
            if back_to_one(poller.snapshot()) and watch.polls:
                settled_at = time.monotonic()
                break
            if scaler.poll() is not None:
                print(f"the scaler exited ({scaler.returncode})")
                break
            time.sleep(POLL_SECONDS)
        if watch.error:
            print(f"poller failed: {watch.error}")
        misses = report(args, watch, burst, settled_at)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything ...")
        misses = ["interrupted"]
    finally:
        # Clean-up runs to the end: a second Ctrl-C must not leave processes behind (the
        # scaler is SIGKILLed after 60 s at worst).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        halt.set()
        for client in clients:
            client.close()
        if poller is not None:
            poller.close()
        if registry is not None:
            registry.close()
        if scaler is not None:
            # SIGTERM: the scaler stops its replicas (warm shutdown) and leaves; SIGKILL after
            # 60 s (its replicas die with it: parent-death signal).
            code = stop(scaler, timeout=60)
            print(f"scaler (pid {scaler.pid}) stopped, exit code {code}")
            if args.keep_logs or code not in (0, -signal.SIGTERM):
                print(scaler_log.read_text(errors="replace")[-5000:])
        if server.process is not None:
            pid = server.process.pid
            server.stop()
            print(f"redis (pid {pid}) stopped")
        tmp.cleanup()
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
