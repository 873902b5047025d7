"""Gateway overhead against Cortex v0.11's way of serving, measured in one run.

Starts a private Redis, deploys a trivial predictor, and serves it two ways:

- **gateway**: ``inferq gateway`` -> the API's Celery queue -> ``inferq worker`` replicas;
- **baseline**: the same predictor called inside a Flask handler on waitress (4 threads,
  waitress's default), in one process, as Cortex v0.11 served a predictor.

Both are measured with the same load generator (keep-alive ``http.client`` connections, one
per client thread): sequential requests (p50, p99) and concurrent clients (req/s, p50,
p99), the gateway with one replica and then with two. Each figure is printed with the ratio
gateway / baseline. Targets: sequential p50 ratio <= 1.5; with 2 replicas, the concurrent
throughput ratio >= 0.8.

Then, where the milliseconds go: the CPU time each process spent per request in each run
(on a small machine the processes share the cores, so CPU per request bounds throughput and,
for sequential requests, is most of the latency).

    .venv/bin/python bench/gateway.py [--sequential 500] [--concurrent 2000] [--clients 16]

Every process it starts (Redis, gateway, replicas, baseline) is stopped before it exits.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import BASELINE_ENDPOINT, Run, load, serve_baseline  # bench/

from inferq.deploy import deploy
from inferq.processes import spawn, stop, wait_until
from inferq.registry import Registry
from inferq.stack import EmbeddedRedis, free_port

CORTEX_YAML = """\
- kind: deployment
  name: bench

- kind: api
  name: trivial
  predictor:
    path: predictor.py
"""

PREDICTOR = """\
def init(model_path, metadata):
    pass


def predict(sample, metadata):
    return {"prediction": sample["x"] * 2}
"""

ENDPOINT = "/bench/trivial"
SAMPLE, EXPECTED = {"x": 21}, {"prediction": 42}


# -- the benchmark -----------------------------------------------------------------------------


class Bench:
    """The processes of one benchmark run; :meth:`close` stops every one of them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis = EmbeddedRedis(workdir / "redis", persist=False)
        self.processes: list[subprocess.Popen] = []
        self.env: dict[str, str] = {}
        self.registry: Registry | None = None

    def start(self) -> None:
        url = self.redis.start()
        self.env = {**os.environ, "INFERQ_BROKER_URL": url,
                    "INFERQ_HOME": str(self.workdir / "home"), "INFERQ_LOGLEVEL": "WARNING"}
        self.registry = Registry(url)
        project = self.workdir / "project"
        project.mkdir()
        (project / "cortex.yaml").write_text(CORTEX_YAML)
        (project / "predictor.py").write_text(PREDICTOR)
        deploy(project, self.registry)
        self.project = project

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "wb") as log:
            process = spawn(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(ROOT))
        process.name = name
        self.processes.append(process)
        return process

    def add_replica(self) -> None:
        replicas = sum(p.name.startswith("replica") for p in self.processes)
        process = self._spawn([sys.executable, "-m", "inferq", "worker", "trivial"],
                              f"replica-{replicas + 1}")

        def live() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the replica exited:\n{self._log(process)}")
            return any(r.id.endswith(f"-{process.pid}") and r.status == "live"
                       for r in self.registry.replicas.of("trivial"))

        wait_until(live, 60, what="the replica live")

    def start_gateway(self) -> int:
        port = free_port()
        process = self._spawn([sys.executable, "-m", "inferq", "gateway", "--port", str(port)],
                              "gateway")
        self._wait_http(process, port)
        return port

    def start_baseline(self) -> int:
        port = free_port()
        process = self._spawn([sys.executable, __file__, "--serve-baseline", str(port),
                               str(self.project)], "baseline")
        self._wait_http(process, port)
        return port

    def _wait_http(self, process: subprocess.Popen, port: int) -> None:
        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{process.name} exited:\n{self._log(process)}")
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                connection.request("GET", "/healthz")
                return connection.getresponse().status == 200
            except OSError:
                return False
            finally:
                connection.close()

        wait_until(answers, 30, what=f"{process.name} answering")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by each process (a replica's supervisor and its serving
        process apart), plus this process (the load generator)."""
        used = {"load generator": sum(os.times()[:2]), "redis": _cpu(self.redis.process.pid)}
        for process in self.processes:
            if process.poll() is not None:
                continue
            used[process.name] = _cpu(process.pid)
            serving = f"{process.name} serving"  # a replica's, or the gateway's uWSGI workers
            for child in psutil.Process(process.pid).children(recursive=True):
                used[serving] = used.get(serving, 0.0) + _cpu(child.pid)
        return used

    def _log(self, process: subprocess.Popen) -> str:
        return (self.workdir / f"{process.name}.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for process in reversed(self.processes):
            stop(process, timeout=15)
        if self.registry is not None:
            self.registry.close()
        self.redis.stop()


def _cpu(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def measure(bench: Bench, label: str, profile: dict, port: int, path: str, requests: int,
            clients: int) -> Run:
    """One load run, recording the CPU milliseconds per request of every process."""
    before = bench.cpu_seconds()
    run = load(port, path, SAMPLE, EXPECTED, requests=requests, clients=clients)
    after = bench.cpu_seconds()
    count = run.count
    profile[label] = {name: (after[name] - before.get(name, 0.0)) * 1000 / count
                      for name in after if after[name] - before.get(name, 0.0) > 0.00001 * count}
    return run


def report_profile(profile: dict[str, dict[str, float]]) -> None:
    print("\nCPU milliseconds per request, by process:")
    for label, used in profile.items():
        parts = ", ".join(f"{name} {ms:.2f}" for name, ms in sorted(used.items(),
                                                                    key=lambda i: -i[1]))
        print(f"  {label:24} total {sum(used.values()):5.2f}: {parts}")


def report(rows: list[tuple[str, float, float, str]]) -> None:
    print(f"{'':34} {'baseline':>10} {'gateway':>10} {'ratio':>7}")
    for label, baseline, gateway, target in rows:
        ratio = gateway / baseline if baseline else float("nan")
        print(f"{label:34} {baseline:10.2f} {gateway:10.2f} {ratio:7.2f}  {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=500, help="sequential requests")
    parser.add_argument("--concurrent", type=int, default=2000,
                        help="requests of each concurrent run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--serve-baseline", nargs=2, metavar=("PORT", "PROJECT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline:
        serve_baseline(int(args.serve_baseline[0]), Path(args.serve_baseline[1]))
        return 0

    with tempfile.TemporaryDirectory(prefix="inferq-bench-") as folder:
        bench = Bench(Path(folder))
        try:
            bench.start()
            baseline_port = bench.start_baseline()
            bench.add_replica()
            gateway_port = bench.start_gateway()
            print(f"trivial predictor; {args.sequential} sequential requests, "
                  f"{args.concurrent} requests from {args.clients} clients; "
                  f"{os.cpu_count()} CPUs\n")

            c, profile = args.clients, {}
            base_seq = measure(bench, "baseline sequential", profile,
                               baseline_port, BASELINE_ENDPOINT, args.sequential, 1)
            gate_seq = measure(bench, "gateway sequential", profile,
                               gateway_port, ENDPOINT, args.sequential, 1)
            base_con = measure(bench, f"baseline {c} clients", profile,
                               baseline_port, BASELINE_ENDPOINT, args.concurrent, c)
            gate_con1 = measure(bench, f"gateway {c} clients, 1 rep", profile,
                                gateway_port, ENDPOINT, args.concurrent, c)
            bench.add_replica()
            gate_con2 = measure(bench, f"gateway {c} clients, 2 rep", profile,
                                gateway_port, ENDPOINT, args.concurrent, c)
        finally:
            bench.close()

    ms = 1000
    report([
        ("sequential p50 (ms)", base_seq.percentile(50) * ms, gate_seq.percentile(50) * ms,
         "target <= 1.5"),
        ("sequential p99 (ms)", base_seq.percentile(99) * ms, gate_seq.percentile(99) * ms, ""),
        (f"{c} clients, 1 replica: req/s", base_con.rate, gate_con1.rate, ""),
        (f"{c} clients, 1 replica: p50 (ms)", base_con.percentile(50) * ms,
         gate_con1.percentile(50) * ms, ""),
        (f"{c} clients, 1 replica: p99 (ms)", base_con.percentile(99) * ms,
         gate_con1.percentile(99) * ms, ""),
        (f"{c} clients, 2 replicas: req/s", base_con.rate, gate_con2.rate, "target >= 0.8"),
        (f"{c} clients, 2 replicas: p50 (ms)", base_con.percentile(50) * ms,
         gate_con2.percentile(50) * ms, ""),
        (f"{c} clients, 2 replicas: p99 (ms)", base_con.percentile(99) * ms,
         gate_con2.percentile(99) * ms, ""),
    ])
    report_profile(profile)
    errors = sum(r.errors for r in (base_seq, gate_seq, base_con, gate_con1, gate_con2))
    if errors:
        print(f"\n{errors} requests failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
