"""inferq against its peers: the same predictor served four ways, measured the same way.

One trivial predictor (an iris-like fixed linear model in pure Python, so serving is all
that is measured) served by:

- **in-process Flask + waitress**: Cortex v0.11's own way, the predictor called in the
  request handler (``bench/harness.py``);
- **LitServe**: uvicorn, one API server process and one inference worker process
  (``bench/peers_litserve.py``; ``pip install -e '.[bench]'``);
- **inferq up, 1 replica** and **2 replicas**: ``inferq up PROJECT --port P`` with an
  embedded Redis in a temp ``INFERQ_HOME`` and ``min_replicas = max_replicas``.

Each is measured with the same keep-alive load generator, ``wrk`` when it is on PATH (else
Python threads): sequential requests (1 connection: p50, p99), then 16 connections
(requests/s, p99), ``--seconds`` each. Printed as one markdown table, with inferq's ratios
to LitServe against their targets (issue 23): sequential p50 (1 replica) <= 1.0x, 16-client
throughput (2 replicas) >= 1.2x, 16-client p99 (2 replicas) <= 1.5x.

Then the Python client: ``inferq.Client.predict`` in a loop against the 1-replica stack, and
a bare Celery round trip on the same Redis (a held producer sends the task with
``reply_to`` a Redis list; a standalone ``-P solo`` worker runs it and RPUSHes the result
there; the caller BLPOPs it). Target: Client / bare <= 0.5.

    .venv/bin/python bench/peers.py [--seconds 8] [--quick] [--only flask,litserve,...]

Every server runs on 127.0.0.1, one at a time, and is stopped (by PID, with the processes
it started) before the next starts, also on Ctrl-C, SIGTERM or an error. Exit status 1 when
a request failed or a target was missed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

import contextlib

from harness import (  # bench/
    BASELINE_ENDPOINT,
    Run,
    load,
    load_predictor,
    serve_baseline,
    wrk,
    wrk_path,
)

from inferq.processes import spawn, stop, wait_until
from inferq.stack import free_port

# An iris-like fixed linear model (the coefficients of configs/examples/iris/model.json,
# rounded), in pure Python: a few microseconds per prediction.
PREDICTOR = '''\
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
CLASSES = ("setosa", "versicolor", "virginica")
COEF = ((-0.4235, 0.9674, -2.5172, -1.0793),
        (0.5345, -0.3216, -0.2064, -0.9443),
        (-0.1110, -0.6458, 2.7235, 2.0236))
INTERCEPT = (9.8496, 2.2372, -12.0868)


def init(model_path, metadata):
    pass


def predict(sample, metadata):
    x = [float(sample[name]) for name in FEATURES]
    scores = [b + sum(w * v for w, v in zip(row, x)) for row, b in zip(COEF, INTERCEPT)]
    return CLASSES[scores.index(max(scores))]
'''

CORTEX_YAML = """\
- kind: deployment
  name: peers

- kind: api
  name: iris
  predictor:
    path: predictor.py
  compute:
    min_replicas: {replicas}
    max_replicas: {replicas}
"""

API = "iris"
ENDPOINT = "/peers/iris"
SAMPLE = {"sepal_length": 5.2, "sepal_width": 3.6, "petal_length": 1.4, "petal_width": 0.3}
EXPECTED = "setosa"
CLIENTS = 16

ROWS = {
    "flask": "in-process Flask + waitress",
    "litserve": "LitServe",
    "inferq1": "inferq up 1 replica",
    "inferq2": "inferq up 2 replicas",
}
PARTS = (*ROWS, "client")

BARE_TASK = "peers.predict"
BARE_QUEUE = "peers.bare"

START_TIMEOUT = 120.0  # seconds a server may take to answer (2 busy cores, cold imports)


# -- processes ---------------------------------------------------------------------------------


def stop_tree(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM ``process`` (a server stops its own children), SIGKILL it after ``timeout``;
    then SIGKILL whatever of its descendants, as they were just before, still runs."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    stop(process, timeout=timeout)
    _, alive = psutil.wait_procs(descendants, timeout=5)
    for leftover in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    psutil.wait_procs(alive, timeout=5)


class Processes:
    """The processes one server needs; leaving the ``with`` block stops them, newest first.

    Each is started in its own process group (a terminal's Ctrl-C reaches only this script,
    which then stops them) and dies with this script even if it is SIGKILLed.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        with open(self.log_path(name), "ab") as log:
            process = spawn(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(cwd or self.workdir))
        self.started.append((name, process))
        return process

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log(self, name: str) -> str:
        try:
            return self.log_path(name).read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def alive(self, name: str, process: subprocess.Popen) -> None:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}:\n{self.log(name)}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # Ctrl-C or SIGTERM now must not cut the clean-up short (the children do not get
        # it): it is noted, and raised once every process is stopped.
        interrupted = []
        previous = {sig: signal.signal(sig, lambda *_: interrupted.append(True))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.started:
                _, process = self.started.pop()
                stop_tree(process)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if interrupted and exc_type is None:
            raise KeyboardInterrupt


def run_command(args: list[str], env: dict[str, str], timeout: float = 30.0) -> str:
    """Run a short command that dies with this script; its stdout, or raise."""
    process = spawn(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        stop(process, timeout=2)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {err.decode(errors='replace')[-1000:]}")
    return out.decode()


def post(port: int, path: str, timeout: float = 5.0, sample: Any = SAMPLE) -> tuple[int, Any]:
    """One POST of ``sample``: (status, parsed answer); (0, None) when nothing answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body=json.dumps(sample),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body.decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return 0, None
    finally:
        connection.close()


def wait_get(port: int, path: str, check) -> None:
    """Wait until ``GET path`` answers 200 while ``check()`` says the server still runs."""

    def answers() -> bool:
        check()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", path)
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    wait_until(answers, START_TIMEOUT, interval=0.2, what=f"GET 127.0.0.1:{port}{path} == 200")


# -- the servers -------------------------------------------------------------------------------


@dataclass
class Served:
    port: int
    path: str
    home: Path | None = None  # the INFERQ_HOME of an inferq stack


def write_project(workdir: Path, replicas: int) -> Path:
    project = workdir / f"project-{replicas}"
    project.mkdir(exist_ok=True)
    (project / "cortex.yaml").write_text(CORTEX_YAML.format(replicas=replicas))
    (project / "predictor.py").write_text(PREDICTOR)
    return project


def start_flask(procs: Processes, project: Path) -> Served:
    port = free_port()
    process = procs.start("flask", [sys.executable, __file__, "--serve-flask", str(port),
                                    str(project)])
    wait_get(port, "/healthz", lambda: procs.alive("flask", process))
    return Served(port, BASELINE_ENDPOINT)


def start_litserve(procs: Processes, project: Path) -> Served:
    port = free_port()
    process = procs.start("litserve", [sys.executable, str(BENCH / "peers_litserve.py"),
                                       str(port), str(project)])
    wait_get(port, "/health", lambda: procs.alive("litserve", process))
    return Served(port, "/predict")


def inferq_env(home: Path) -> dict[str, str]:
    """The environment of ``inferq up`` and ``inferq get``: the embedded stack in ``home``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("INFERQ_BROKER_URL", "INFERQ_GATEWAY_URL")}
    env["INFERQ_HOME"] = str(home)
    return env


def start_inferq(procs: Processes, project: Path, replicas: int, *, api: str = API,
                 endpoint: str = ENDPOINT, sample: Any = SAMPLE, expected: Any = EXPECTED,
                 broker_url: str | None = None) -> Served:
    """``inferq up`` until the endpoint answers ``sample`` with ``expected`` and ``replicas``
    replicas of ``api`` are live; on ``broker_url`` when given, else its embedded Redis."""
    home = procs.workdir / f"home-{replicas}"
    env = inferq_env(home)  # `inferq get` finds the broker in home/stack.json
    port = free_port()
    name = f"inferq-up-{replicas}"
    up_env = {**env, "INFERQ_BROKER_URL": broker_url} if broker_url else env
    process = procs.start(name, [sys.executable, "-m", "inferq", "up", str(project),
                                 "--port", str(port)], env=up_env)

    def ready() -> bool:
        procs.alive(name, process)
        if not (home / "stack.json").is_file():
            return False
        try:
            rows = json.loads(run_command(
                [sys.executable, "-m", "inferq", "get", api, "--output", "json"], env))
        except (RuntimeError, ValueError):
            return False  # not deployed yet
        row = rows[0]
        if row["status"] != "live" or row["up_to_date"] != replicas:
            return False
        return post(port, endpoint, sample=sample) == (200, expected)

    wait_until(ready, START_TIMEOUT, interval=0.5,
               what=f"inferq up with {replicas} live replica(s)")
    return Served(port, endpoint, home)


# -- HTTP measurements -------------------------------------------------------------------------


@dataclass
class Row:
    sequential: Run
    concurrent: Run


def use_wrk(generator: str) -> bool:
    if generator == "wrk" and not wrk_path():
        raise SystemExit("--generator wrk: wrk is not on PATH (Debian: apt-get install wrk)")
    return generator == "wrk" or (generator == "auto" and wrk_path() is not None)


def measure_http(served: Served, seconds: float, with_wrk: bool) -> Row:
    status, answer = post(served.port, served.path, timeout=30)
    if (status, answer) != (200, EXPECTED):
        raise RuntimeError(f"{served.path} answered {status} {answer!r}, not 200 {EXPECTED!r}")
    # warm up every path a request takes (connections, lazily imported code)
    load(served.port, served.path, SAMPLE, EXPECTED, clients=4, requests=200, warmup=8)

    def run(clients: int) -> Run:
        if with_wrk:
            return wrk(served.port, served.path, SAMPLE, clients=clients, seconds=seconds)
        return load(served.port, served.path, SAMPLE, EXPECTED, clients=clients,
                    seconds=seconds, warmup=clients)

    return Row(run(1), run(CLIENTS))


# -- the Python client against a bare Celery round trip ----------------------------------------


def run_bare_worker(broker_url: str, project: Path) -> int:
    """A standalone Celery worker (solo pool, one at a time): the task predicts and RPUSHes
    ``{"id", "result"}`` to the message's ``reply_to`` list."""
    import redis
    from celery import Celery

    predictor = load_predictor(project / "predictor.py")
    replies = redis.Redis.from_url(broker_url)
    app = Celery("peers-bare", broker=broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                    worker_prefetch_multiplier=1, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True)

    @app.task(name=BARE_TASK, bind=True)
    def predict(task, sample):
        result = predictor.predict(sample, {})
        replies.rpush(task.request.reply_to, json.dumps({"id": task.request.id,
                                                         "result": result}))

    worker = app.Worker(hostname=f"peers-bare@{os.getpid()}", queues=[BARE_QUEUE],
                        pool="solo", concurrency=1, loglevel="WARNING", without_gossip=True,
                        without_mingle=True, without_heartbeat=True, quiet=True)
    worker.start()
    return worker.exitcode or 0


class BareCelery:
    """The caller's side of a bare Celery round trip: a held producer, a reply list."""

    def __init__(self, broker_url: str) -> None:
        import redis
        from celery import Celery

        self.app = Celery("peers-bare-client", broker=broker_url, set_as_current=False)
        self.app.conf.update(task_serializer="json", accept_content=["json"])
        self.redis = redis.Redis.from_url(broker_url)
        self.reply_to = f"peers.replies.{uuid.uuid4().hex}"
        self.producer = self.app.producer_pool.acquire(block=True)

    def predict(self, sample: Any, timeout: float = 30.0) -> Any:
        task_id = uuid.uuid4().hex
        self.app.send_task(BARE_TASK, args=[sample], queue=BARE_QUEUE, task_id=task_id,
                           reply_to=self.reply_to, ignore_result=True, producer=self.producer)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            reply = self.redis.blpop([self.reply_to], timeout=left)
            if reply is None:
                break
            data = json.loads(reply[1])
            if data.get("id") == task_id:
                return data["result"]
            # else: the late reply to a request that timed out while the worker started
        raise TimeoutError(f"no reply from the bare Celery worker within {timeout:g}s")

    def close(self) -> None:
        self.producer.release()
        self.redis.close()
        self.app.close()


def per_request(call, seconds: float) -> tuple[int, float]:
    """Call ``call()`` in a loop for ``seconds``: (calls, seconds they took)."""
    count, began = 0, time.perf_counter()
    deadline = began + seconds
    while time.perf_counter() < deadline:
        if call() != EXPECTED:
            raise RuntimeError(f"a prediction other than {EXPECTED!r}")
        count += 1
    return count, time.perf_counter() - began


def measure_client(procs: Processes, served: Served, project: Path,
                   seconds: float) -> dict[str, float]:
    """ms per request of ``Client.predict`` and of the bare round trip, alternated in two
    rounds each so that the machine's other load weighs on both alike."""
    from inferq import Client

    broker_url = json.loads((served.home / "stack.json").read_text())["broker_url"]
    worker = procs.start("celery-bare", [sys.executable, __file__, "--bare-worker", broker_url,
                                         str(project)])
    bare = BareCelery(broker_url)
    client = Client(broker_url)
    def answers() -> bool:
        procs.alive("celery-bare", worker)
        try:
            return bare.predict(SAMPLE, timeout=1.0) == EXPECTED
        except TimeoutError:
            return False

    try:
        wait_until(answers, START_TIMEOUT, what="the bare Celery worker answering")
        for _ in range(50):  # warm-up
            bare.predict(SAMPLE)
            client.predict(API, SAMPLE)
        totals = {"client": [0, 0.0], "bare": [0, 0.0]}
        for _ in range(2):
            for name, call in (("bare", lambda: bare.predict(SAMPLE)),
                               ("client", lambda: client.predict(API, SAMPLE))):
                count, took = per_request(call, seconds / 2)
                totals[name][0] += count
                totals[name][1] += took
        return {name: took * 1000 / count for name, (count, took) in totals.items()}
    finally:
        client.close()
        bare.close()


# -- the report --------------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value * 1000:.2f} ms"


def table(rows: dict[str, Row]) -> list[str]:
    lines = [(f"| server | sequential p50 | sequential p99 | {CLIENTS} clients req/s "
              f"| {CLIENTS} clients p99 |"),
             "|---|---:|---:|---:|---:|"]
    for key, label in ROWS.items():
        if key in rows:
            s, c = rows[key].sequential, rows[key].concurrent
            lines.append(f"| {label} | {ms(s.percentile(50))} | {ms(s.percentile(99))} "
                         f"| {c.rate:.0f} | {ms(c.percentile(99))} |")
    return lines


def verdict(ratio: float, target: str) -> str:
    op, bound = target.split()
    met = ratio <= float(bound) if op == "<=" else ratio >= float(bound)
    return "met" if met else "missed"


def checks(rows: dict[str, Row], client: dict[str, float] | None
           ) -> list[tuple[str, float, str]]:
    """(what, measured ratio, target) of each target this run measured."""
    checks = []
    lit = rows.get("litserve")
    if lit and "inferq1" in rows:
        checks.append(("sequential p50, inferq 1 replica / LitServe",
                       rows["inferq1"].sequential.percentile(50) / lit.sequential.percentile(50),
                       "<= 1.0"))
    if lit and "inferq2" in rows:
        checks.append((f"{CLIENTS} clients req/s, inferq 2 replicas / LitServe",
                       rows["inferq2"].concurrent.rate / lit.concurrent.rate, ">= 1.2"))
        checks.append((f"{CLIENTS} clients p99, inferq 2 replicas / LitServe",
                       rows["inferq2"].concurrent.percentile(99) / lit.concurrent.percentile(99),
                       "<= 1.5"))
    if client:
        checks.append(("Client.predict / bare Celery round trip",
                       client["client"] / client["bare"], "<= 0.5"))
    return checks


def ratios(rows: dict[str, Row], client: dict[str, float] | None) -> list[str]:
    measured = checks(rows, client)
    if not measured:
        return []
    lines = ["| ratio | measured | target | |", "|---|---:|---:|---|"]
    for label, ratio, target in measured:
        lines.append(f"| {label} | {ratio:.2f}x | {target}x | {verdict(ratio, target)} |")
    return lines


def report(rows: dict[str, Row], client: dict[str, float] | None, seconds: float,
           with_wrk: bool) -> None:
    generator = "wrk" if with_wrk else "the Python load generator"
    print(f"\nThe same predictor, {os.cpu_count()} CPUs.\n")
    if rows:
        print(f"HTTP, {seconds:g} s per measurement with {generator} (keep-alive "
              f"connections):\n")
        print("\n".join(table(rows)) + "\n")
    if client:
        print(f"Python client, {seconds:g} s each (two alternated rounds), one request at "
              f"a time:\n")
        print("| Python client | ms per request |\n|---|---:|")
        print(f"| bare Celery round trip (send_task, reply_to list, solo worker) "
              f"| {client['bare']:.2f} |")
        print(f"| inferq `Client.predict` (1 replica) | {client['client']:.2f} |\n")
    lines = ratios(rows, client)
    if lines:
        print("\n".join(lines))


# -- main --------------------------------------------------------------------------------------


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops everything as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="seconds of each measurement (default 8)")
    parser.add_argument("--quick", action="store_true", help="2 s measurements (smoke test)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma list of what to run, of {','.join(PARTS)} (default: all)")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto",
                        help="HTTP load generator (default: wrk when on PATH, else Python)")
    parser.add_argument("--serve-flask", nargs=2, metavar=("PORT", "PROJECT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--bare-worker", nargs=2, metavar=("BROKER_URL", "PROJECT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_flask:
        serve_baseline(int(args.serve_flask[0]), Path(args.serve_flask[1]))
        return 0
    if args.bare_worker:
        return run_bare_worker(args.bare_worker[0], Path(args.bare_worker[1]))

    only = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(only) - set(PARTS))
    if unknown or not only:
        parser.error(f"--only: unknown {', '.join(unknown) or 'nothing'}; "
                     f"choose from {','.join(PARTS)}")
    if "litserve" in only:
        try:
            import litserve  # noqa: F401
        except ImportError:
            parser.error("LitServe is not installed: pip install -e '.[bench]'")
    seconds = 2.0 if args.quick else args.seconds
    with_wrk = use_wrk(args.generator)

    signal.signal(signal.SIGTERM, _terminate)
    rows: dict[str, Row] = {}
    client = None
    failed = 0
    with tempfile.TemporaryDirectory(prefix="inferq-peers-") as folder:
        workdir = Path(folder)
        project = {n: write_project(workdir, n) for n in (1, 2)}
        starts = {
            "flask": lambda procs: start_flask(procs, project[1]),
            "litserve": lambda procs: start_litserve(procs, project[1]),
            "inferq1": lambda procs: start_inferq(procs, project[1], 1),
            "inferq2": lambda procs: start_inferq(procs, project[2], 2),
        }
        try:
            for key, label in ROWS.items():
                wanted = key in only or (key == "inferq1" and "client" in only)
                if not wanted:
                    continue
                print(f"{label}: starting", file=sys.stderr, flush=True)
                with Processes(workdir) as procs:
                    served = starts[key](procs)
                    if key in only:
                        print(f"{label}: measuring", file=sys.stderr, flush=True)
                        rows[key] = measure_http(served, seconds, with_wrk)
                        failed += rows[key].sequential.errors + rows[key].concurrent.errors
                    if key == "inferq1" and "client" in only:
                        print("Python client: measuring", file=sys.stderr, flush=True)
                        client = measure_client(procs, served, project[1], seconds)
        except KeyboardInterrupt:
            print("interrupted; everything it started is stopped", file=sys.stderr)
            return 130
    report(rows, client, seconds, with_wrk)
    missed = [label for label, ratio, target in checks(rows, client)
              if verdict(ratio, target) == "missed"]
    if failed:
        print(f"\n{failed} requests failed")
    for label in missed:
        print(f"MISSED: {label}")
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
