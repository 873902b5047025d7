"""Batches: samples/s of many samples per message against one per message, in one run.

(a) ``Client.map`` over the same samples with ``batch_size`` 64 (``--batch-size``) and with 1
(one sample per message, as every sample travelled before batches: "today's map" of issue
12), for four predictors, each served by ``inferq up`` with 2 replicas and each next to an
in-process loop of the same function on the same data (``predict`` per sample;
``predict_batch`` over batches of the same size):

- ``trivial``: an iris-like fixed linear model in pure Python (bench/peers.py's), whose
  ``predict_batch`` loops in Python;
- ``trivial, predict only``: the same without ``predict_batch`` (the replica loops);
- ``iris``: the bundled example (numpy), with its vectorised ``predict_batch``;
- ``iris, predict only``: a copy of the example whose predictor.py lacks ``predict_batch``.

Every map's answers are checked against the in-process ones.

(b) The gateway at 64 concurrent clients (wrk when on PATH, else harness.py's Python load
generator) for the trivial predictor with ``predict_batch``, without
``predictor.server_side_batching`` and with each ``--batching`` setting (default two:
``32/5ms`` and ``64/2ms``), each on a stack of its own: requests/s and p99.

For each measurement, the CPU time every process of the stack (and this one, the client or
the load generator) spent per sample or request: on a small machine the processes share the
cores, so that is what bounds the throughput.

Targets (issue 12): map of iris with predict_batch >= 50% of the in-process predict_batch loop
and >= 20x one sample per message; map without predict_batch >= 5x one sample per message;
the gateway with server_side_batching >= 2x the throughput without it, p99 no worse.
Missed targets are reported, not failed; exit 1 when an answer was wrong or a request failed.

    .venv/bin/python bench/batching.py [--samples 5000] [--seconds 8] [--quick]
    .venv/bin/python bench/batching.py --only map        # or: --only gateway
    .venv/bin/python bench/batching.py --batching 32/5ms --batching 16/1ms

Every stack runs on 127.0.0.1 (``inferq up`` with its embedded Redis in a temp INFERQ_HOME,
``min_replicas = max_replicas = 2``), one at a time, and is stopped by PID with its
descendants before the next starts, also on Ctrl-C, SIGTERM, an error or ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from harness import load, load_predictor, wrk, wrk_path  # bench/
from peers import PREDICTOR, Processes, start_inferq

from inferq import Client

REPLICAS = 2
CLIENTS = 64
EXAMPLE = ROOT / "configs" / "examples" / "iris"
TODAY = 944  # samples/s of Client.map one sample per message when issue 12 was filed

PREDICT_BATCH = '''

def predict_batch(samples, metadata):
    return [predict(sample, metadata) for sample in samples]
'''

CORTEX_YAML = """\
- kind: deployment
  name: batching
- kind: api
  name: {api}
  predictor:
    path: predictor.py
{model}{batching}  compute:
    min_replicas: {replicas}
    max_replicas: {replicas}
"""


@dataclass
class Case:
    title: str
    api: str
    predictor: str  # predictor.py's text
    model: str | None = None  # a project file the predictor's init() loads
    batching: str = ""  # a server_side_batching block, for the gateway part


def iris_predictor(with_batch: bool) -> str:
    text = (EXAMPLE / "predictor.py").read_text()
    if with_batch:
        return text
    head, found, _ = text.partition("\n\ndef predict_batch")
    if not found:
        raise RuntimeError(f"{EXAMPLE / 'predictor.py'} has no predict_batch to leave out")
    return head + "\n"


CASES = [
    Case("trivial (pure Python), predict_batch", "trivial", PREDICTOR + PREDICT_BATCH),
    Case("trivial (pure Python), predict only", "trivial-single", PREDICTOR),
    Case("iris example (numpy), predict_batch", "iris", iris_predictor(True), "model.json"),
    Case("iris example (numpy), predict only", "iris-single", iris_predictor(False),
         "model.json"),
]
IRIS, IRIS_SINGLE, TRIVIAL_SINGLE = CASES[2].title, CASES[3].title, CASES[1].title


def write_project(workdir: Path, case: Case) -> Path:
    project = workdir / case.api
    project.mkdir()
    (project / "predictor.py").write_text(case.predictor)
    if case.model:
        shutil.copy(EXAMPLE / case.model, project / case.model)
    (project / "cortex.yaml").write_text(CORTEX_YAML.format(
        api=case.api, replicas=REPLICAS, batching=case.batching,
        model=f"    model: {case.model}\n" if case.model else ""))
    return project


def make_samples(count: int) -> list[dict[str, float]]:
    """Iris-like measurements spread over the three classes, the same in every run."""
    return [{"sepal_length": 4.5 + (i * 7 % 35) / 10, "sepal_width": 2.2 + (i * 3 % 22) / 10,
             "petal_length": 1.0 + (i * 11 % 59) / 10, "petal_width": 0.1 + (i * 5 % 24) / 10}
            for i in range(count)]


# -- CPU per process ---------------------------------------------------------------------------

ROLES = (  # (role, pattern of the command line); the first that matches names the process
    ("redis", re.compile(r"redis-server")),
    ("gateway", re.compile(r" -m inferq gateway ")),
    ("scaler", re.compile(r" -m inferq scaler")),
    ("replicas, serving", re.compile(r" -m inferq worker .* --serve ")),
    ("replicas, supervisors", re.compile(r" -m inferq worker ")),
    ("inferq up", re.compile(r" -m inferq up ")),
)
HERE = "this process"  # the Client (map) or nothing much (gateway runs)
LOADGEN = "load generator"  # wrk, or this process's threads


class CpuMeter:
    """CPU seconds used by every process of the stacks ``procs`` started (by role, the two
    replicas together) and by this process and its finished children (wrk)."""

    def __init__(self, procs: Processes) -> None:
        self.processes: list[tuple[str, psutil.Process]] = []
        for _, process in procs.started:
            try:
                root = psutil.Process(process.pid)
                for proc in [root, *root.children(recursive=True)]:
                    self.processes.append((self._role(proc), proc))
            except psutil.NoSuchProcess:
                continue

    @staticmethod
    def _role(proc: psutil.Process) -> str:
        line = " ".join(proc.cmdline()) + " "
        return next((role for role, pattern in ROLES if pattern.search(line)), proc.name())

    def snapshot(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for role, proc in self.processes:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            used[role] = used.get(role, 0.0) + times.user + times.system
        mine = os.times()
        used[HERE] = mine.user + mine.system
        used[LOADGEN] = mine.children_user + mine.children_system
        return used

    def measure(self, run: Callable[[], Any]) -> tuple[Any, float, dict[str, float]]:
        """``run()``'s value, its wall seconds, and the CPU seconds it took by role."""
        before = self.snapshot()
        started = time.perf_counter()
        value = run()
        took = time.perf_counter() - started
        after = self.snapshot()
        return value, took, {role: after[role] - before.get(role, 0.0) for role in after}


# -- (a) Client.map ----------------------------------------------------------------------------


def best_rate(count: int, run: Callable[[], Any], min_seconds: float) -> float:
    """Items/s of the fastest of at least three passes of ``run()`` over ``count`` items,
    passing again until ``min_seconds`` have gone by (a pass of numpy over 5,000 samples
    takes milliseconds, and the machine is shared)."""
    best, passes, began = 0.0, 0, time.perf_counter()
    while passes < 3 or time.perf_counter() - began < min_seconds:
        started = time.perf_counter()
        run()
        best = max(best, count / (time.perf_counter() - started))
        passes += 1
    return best


def in_process(project: Path, case: Case, samples: list, batch: int,
               min_seconds: float) -> tuple[float, float | None, list]:
    """Samples/s of ``predict`` per sample and of ``predict_batch`` over batches of ``batch``
    (None without it), and the answers, from the predictor imported here."""
    predictor = load_predictor(project / "predictor.py")
    if case.model:
        predictor.init(str(project / case.model), {})
    answers = [predictor.predict(s, {}) for s in samples]
    per_sample = best_rate(len(samples), lambda: [predictor.predict(s, {}) for s in samples],
                           min_seconds)
    if not hasattr(predictor, "predict_batch"):
        return per_sample, None, answers
    batches = [samples[i:i + batch] for i in range(0, len(samples), batch)]
    if [a for b in batches for a in predictor.predict_batch(b, {})] != answers:
        raise RuntimeError(f"{case.title}: predict_batch and predict disagree in-process")
    batched = best_rate(len(samples), lambda: [predictor.predict_batch(b, {}) for b in batches],
                        min_seconds)
    return per_sample, batched, answers


@dataclass
class Measured:
    """The passes of one way of mapping: the best rate, and CPU and wall time over all."""

    best: float = 0.0  # samples/s of the fastest pass
    samples: int = 0
    wall: float = 0.0  # seconds
    cpu: dict[str, float] = field(default_factory=dict)  # seconds by role

    def add(self, count: int, took: float, cpu: dict[str, float]) -> None:
        self.best = max(self.best, count / took)
        self.samples += count
        self.wall += took
        for role, used in cpu.items():
            self.cpu[role] = self.cpu.get(role, 0.0) + used

    @property
    def cpu_per_sample(self) -> dict[str, float]:
        """Microseconds by role."""
        return {role: used * 1e6 / self.samples for role, used in self.cpu.items()}

    @property
    def wall_per_sample(self) -> float:
        return self.wall * 1e6 / self.samples


@dataclass
class MapRow:
    case: str
    loop: float  # in-process predict per sample, samples/s
    loop_batch: float | None  # in-process predict_batch over batches
    one: Measured = field(default_factory=Measured)  # Client.map, one sample per message
    batched: Measured = field(default_factory=Measured)  # batch_size samples per message
    wrong: int = 0  # answers unlike the in-process ones

    @property
    def batched_loop(self) -> float:
        """The in-process loop of the function the batched map ends up calling."""
        return self.loop_batch or self.loop


def measure_map(workdir: Path, case: Case, samples: list, batch: int, rounds: int,
                min_seconds: float) -> MapRow:
    """In each of ``rounds`` rounds, one pass of map one per message and passes of the
    batched map for at least ``min_seconds`` / ``rounds`` (a pass takes ~0.1 s; the CPU
    clocks tick every 10 ms)."""
    project = write_project(workdir, case)
    loop, loop_batch, answers = in_process(project, case, samples, batch, min_seconds)
    row = MapRow(case.title, loop, loop_batch)
    run_dir = workdir / f"{case.api}-run"
    run_dir.mkdir()
    with Processes(run_dir) as procs:
        served = start_inferq(procs, project, REPLICAS, api=case.api,
                              endpoint=f"/batching/{case.api}", sample=samples[0],
                              expected=answers[0])
        meter = CpuMeter(procs)
        with Client(broker_url(served.home)) as client:
            def one_pass(size: int, into: Measured) -> None:
                got, took, cpu = meter.measure(lambda: list(
                    client.map(case.api, samples, batch_size=size)))
                row.wrong += sum(a != b for a, b in zip(got, answers, strict=False)) + abs(
                    len(got) - len(answers))
                into.add(len(samples), took, cpu)

            list(client.map(case.api, samples[:1000], batch_size=batch))  # warm both replicas
            list(client.map(case.api, samples[:200], batch_size=1))
            for _ in range(rounds):
                began = time.perf_counter()
                while True:
                    one_pass(batch, row.batched)
                    if time.perf_counter() - began >= min_seconds / rounds:
                        break
                one_pass(1, row.one)
    return row


def broker_url(home: Path) -> str:
    return json.loads((home / "stack.json").read_text())["broker_url"]


# -- (b) the gateway ---------------------------------------------------------------------------


@dataclass
class GatewayRow:
    setting: str  # "" (without server_side_batching) or "32/5ms"
    rate: float
    p99: float  # seconds
    errors: int
    generator: str
    cpu: dict[str, float]  # µs per request by role
    per_message: float  # requests per message the replicas took (about)


def parse_setting(text: str) -> tuple[int, str]:
    """``"32/5ms"`` -> (32, "5ms")."""
    size, _, interval = text.partition("/")
    if not size.strip().isdigit() or not re.fullmatch(r"\s*\d+(\.\d+)?(ms|s)\s*", interval):
        raise argparse.ArgumentTypeError(f"{text!r}: give MAX_BATCH_SIZE/INTERVAL, e.g. 32/5ms")
    return int(size), interval.strip()


def measure_gateway(workdir: Path, setting: str, seconds: float, python_load: bool
                    ) -> GatewayRow:
    batching = ""
    if setting:
        size, interval = parse_setting(setting)
        batching = (f"    server_side_batching: {{max_batch_size: {size}, "
                    f"batch_interval: {interval}}}\n")
    slug = "gw-" + (re.sub(r"[^a-z0-9]+", "-", setting.lower()).strip("-") or "off")
    case = Case("gateway", slug, PREDICTOR + PREDICT_BATCH, batching=batching)
    project = write_project(workdir, case)
    sample = make_samples(1)[0]
    expected = load_predictor(project / "predictor.py").predict(sample, {})
    run_dir = workdir / f"{slug}-run"
    run_dir.mkdir()
    with Processes(run_dir) as procs:
        served = start_inferq(procs, project, REPLICAS, api=case.api,
                              endpoint=f"/batching/{case.api}", sample=sample,
                              expected=expected)
        # every answer checked once, and the paths a request takes warmed up
        warm = load(served.port, served.path, sample, expected, clients=CLIENTS,
                    requests=4 * CLIENTS, warmup=CLIENTS)
        meter = CpuMeter(procs)
        if wrk_path() and not python_load:
            def run():
                return wrk(served.port, served.path, sample, clients=CLIENTS, seconds=seconds)
        else:
            def run():
                return load(served.port, served.path, sample, expected, clients=CLIENTS,
                            seconds=seconds, warmup=CLIENTS)
        taken = messages_taken(served.home)
        result, _, cpu = meter.measure(run)
        taken = messages_taken(served.home) - taken
    if result.generator == "python":  # this process's threads are the load generator
        cpu[LOADGEN] = cpu.pop(HERE)
    cpu = {role: used * 1e6 / max(result.count, 1) for role, used in cpu.items()}
    return GatewayRow(setting, result.rate, result.percentile(99),
                      result.errors + warm.errors, result.generator, cpu,
                      result.count / max(taken, 1))


def messages_taken(home: Path) -> int:
    """BLMOVE calls the stack's Redis has served so far: the messages replicas took, plus
    their polls that found the queue empty (about one a second each while idle)."""
    connection = redis.Redis.from_url(broker_url(home))
    try:
        stats = connection.info("commandstats").get("cmdstat_blmove", {})
    finally:
        connection.close()
    return int(stats.get("calls", 0))


# -- the report --------------------------------------------------------------------------------


def us(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def cpu_line(cpu: dict[str, float], wall_us: float) -> str:
    """``total T (role U, ...); wall W; cores busy: ...``, the busiest process first; W is
    the mean wall time per item, and U / W the cores a process kept busy: near 1 for one
    process, it is saturated (one interpreter runs its Python on one core at a time); near
    the machine's count in all, the machine is."""
    shown = sorted(((r, v) for r, v in cpu.items() if v >= 0.05), key=lambda i: -i[1])
    parts = ", ".join(f"{role} {us(used)}" for role, used in shown)
    busiest, most = shown[0] if shown else ("-", 0.0)
    return (f"total {us(sum(cpu.values()))} ({parts}); wall {us(wall_us)}; cores busy: "
            f"{sum(cpu.values()) / wall_us:.2f} in all, {most / wall_us:.2f} in {busiest}")


def report(maps: list[MapRow], gateway: list[GatewayRow], samples: int, batch: int) -> int:
    checks: list[tuple[str, float, str, bool]] = []
    if maps:
        print(f"\nClient.map, {REPLICAS} replicas, {samples:,} samples, {batch} per message and "
              f"1 per message; samples/s (the best of the rounds):\n")
        print(f"| predictor | in-process predict loop | in-process predict_batch loop "
              f"(batches of {batch}) | map, 1 per message | map, {batch} per message "
              f"| map {batch} / map 1 | map {batch} / in-process loop of what it calls |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row in maps:
            batch_loop = f"{row.loop_batch:,.0f}" if row.loop_batch else "-"
            what = "predict_batch" if row.loop_batch else "predict"
            print(f"| {row.case} | {row.loop:,.0f} | {batch_loop} | {row.one.best:,.0f} | "
                  f"{row.batched.best:,.0f} | {row.batched.best / row.one.best:.1f}x | "
                  f"{row.batched.best / row.batched_loop:.0%} ({what}) |")
        print("\nCPU microseconds per sample by process, over all passes (both replicas "
              "together; 'this process' is the Client), and the mean wall time per sample:\n")
        for row in maps:
            for size, measured in ((batch, row.batched), (1, row.one)):
                print(f"- {row.case}, map {size}: "
                      f"{cpu_line(measured.cpu_per_sample, measured.wall_per_sample)}")
        by_case = {row.case: row for row in maps}
        if IRIS in by_case:
            iris = by_case[IRIS]
            ratio = iris.batched.best / iris.loop_batch
            checks.append(("iris map with predict_batch / in-process predict_batch loop",
                           ratio, ">= 50%", ratio >= 0.5))
            ratio = iris.batched.best / iris.one.best
            checks.append(("iris map with predict_batch / map 1 per message (today's map)",
                           ratio, ">= 20x", ratio >= 20))
        for title in (IRIS_SINGLE, TRIVIAL_SINGLE):
            if title in by_case:
                row = by_case[title]
                ratio = row.batched.best / row.one.best
                name = f"{title.split(',')[0]} map without predict_batch / map 1 per message"
                checks.append((name, ratio, ">= 5x", ratio >= 5))
        if IRIS in by_case:
            print(f"\n(The issue's 'today's map', {TODAY} samples/s one per message before "
                  f"batches and the fast path: iris map {batch} per message is "
                  f"{by_case[IRIS].batched.best / TODAY:.0f}x that.)")
    if gateway:
        off = gateway[0]
        print(f"\nGateway, {CLIENTS} clients ({off.generator}), trivial predictor with "
              f"predict_batch, {REPLICAS} replicas:\n")
        print("| server_side_batching | req/s | p99 | req/s / without | p99 / without "
              "| requests per message |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in gateway:
            name = f"max_batch_size {row.setting.replace('/', ', batch_interval ')}" \
                if row.setting else "without"
            print(f"| {name} | {row.rate:,.0f} | {row.p99 * 1000:.1f} ms | "
                  f"{row.rate / off.rate:.2f}x | {row.p99 / off.p99:.2f}x | "
                  f"{row.per_message:.1f} |")
        print("\nCPU microseconds per request, by process (both replicas together):\n")
        for row in gateway:
            print(f"- {row.setting or 'without'}: {cpu_line(row.cpu, 1e6 / row.rate)}")
        for row in gateway[1:]:
            ratio = row.rate / off.rate
            checks.append((f"gateway req/s with {row.setting} / without", ratio, ">= 2x",
                           ratio >= 2))
            ratio = row.p99 / off.p99
            checks.append((f"gateway p99 with {row.setting} / without", ratio, "<= 1x",
                           ratio <= 1))
    if checks:
        print("\n| target | measured | wanted | |\n|---|---:|---:|---|")
        for name, value, wanted, met in checks:
            shown = f"{value:.0%}" if wanted.endswith("%") else f"{value:.2f}x"
            print(f"| {name} | {shown} | {wanted} | {'met' if met else 'missed'} |")
    failed = 0
    wrong = sum(row.wrong for row in maps)
    if wrong:
        print(f"\n{wrong} map answers differed from the in-process ones")
        failed = 1
    errors = sum(row.errors for row in gateway)
    if errors:
        print(f"\n{errors} HTTP requests failed")
        failed = 1
    return failed


# -- main --------------------------------------------------------------------------------------


class OutOfTime(Exception):
    pass


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops everything as Ctrl-C does


def _out_of_time(signum: int, frame: object) -> None:
    raise OutOfTime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=5000,
                        help="samples of each map (default 5000)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="samples per message of the batched map (default 64)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternated rounds of map batched / map 1 per message; the best "
                        "of each is kept (default 2)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="seconds of each gateway run (default 8)")
    parser.add_argument("--batching", action="append", type=str, metavar="SIZE/INTERVAL",
                        help="a server_side_batching setting of the gateway part, e.g. 32/5ms; "
                        "repeatable (default: 32/5ms and 64/2ms)")
    parser.add_argument("--only", choices=["map", "gateway"], help="run one part only")
    parser.add_argument("--python-load", action="store_true",
                        help="the Python load generator even when wrk is on PATH")
    parser.add_argument("--quick", action="store_true",
                        help="1,000 samples, 1 round, 3 s gateway runs, 32/5ms only")
    parser.add_argument("--max-seconds", type=float, default=900,
                        help="stop everything and give up after this long (default 900)")
    args = parser.parse_args(argv)
    settings = args.batching or (["32/5ms"] if args.quick else ["32/5ms", "64/2ms"])
    for setting in settings:
        try:
            parse_setting(setting)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--batching: {exc}")
    if args.quick:
        args.samples, args.rounds, args.seconds = 1000, 1, 3.0
    samples = make_samples(args.samples)
    min_seconds = 0.3 if args.quick else 1.0

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(max(1, round(args.max_seconds)))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start",
          file=sys.stderr, flush=True)
    maps: list[MapRow] = []
    gateway: list[GatewayRow] = []
    with tempfile.TemporaryDirectory(prefix="inferq-batching-") as folder:
        workdir = Path(folder)
        try:
            if args.only != "gateway":
                for case in CASES:
                    print(f"map, {case.title}: measuring", file=sys.stderr, flush=True)
                    maps.append(measure_map(workdir, case, samples, args.batch_size,
                                            args.rounds, min_seconds))
            if args.only != "map":
                for setting in ["", *settings]:
                    print(f"gateway, server_side_batching {setting or 'off'}: measuring",
                          file=sys.stderr, flush=True)
                    gateway.append(measure_gateway(workdir, setting, args.seconds,
                                                   args.python_load))
        except KeyboardInterrupt:
            print("interrupted; everything it started is stopped", file=sys.stderr)
            return 130
        except OutOfTime:
            print(f"over --max-seconds {args.max_seconds:g}; everything it started is stopped",
                  file=sys.stderr)
            return 2
        finally:
            signal.alarm(0)
    print(f"load average {os.getloadavg()[0]:.2f} at the end", file=sys.stderr)
    return report(maps, gateway, len(samples), args.batch_size)


if __name__ == "__main__":
    sys.exit(main())
