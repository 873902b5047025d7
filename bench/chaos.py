"""Faults under load: is every request accepted a request answered? (issue 13, points 1-2)

Two runs, one after the other, each on its own ``inferq up`` stack in a temp folder, with an
API of exactly 2 replicas whose ``predict`` sleeps 20 ms and answers ``{"echo": id}`` for a
sample ``{"id": id}`` (every request has its own id, so a wrong answer is seen):

- **kills** (``--only kills``): ``inferq up PROJECT --port P`` with its embedded Redis; 16
  keep-alive HTTP clients for ``--seconds``; every 2 s one replica process is SIGKILLed,
  chosen at random between the supervisor (``replica_pid``) and the serving process
  (``pid``) of a live replica (``Registry.replicas``). Targets: 100% answered 200 with the
  right body; p99.9 <= predict time + 5 s.
- **broker** (``--only broker``): the same API on a redis-server this script starts
  (``appendonly yes``, ``appendfsync always``, a free loopback port, its own folder) and
  ``inferq up`` with ``INFERQ_BROKER_URL`` pointing to it; 8 clients for ``--seconds``; a
  few seconds in, the Redis is SIGKILLed and started again 2 s later on the same port with
  the same append-only file. Targets: every request answered; 503 with ``Retry-After`` only
  while the broker is down; 200 again within 5 s of its return.

For each run it prints the requests sent, how many were answered 200 with the right body,
every other outcome (status code or exception, counted), the latency p50/p99/p99.9/max of
the 200s and the targets. When a request failed it prints what is known of it: the
predictor's trace (which serving process started and finished its sample), the kills, and
the relevant lines of the stack's log (``inferq up``'s output: gateway, scaler, replicas).

    .venv/bin/python bench/chaos.py [--seconds 60] [--only kills|broker] [--quick]
                                    [--workdir DIR]  # keep the logs and traces there

Everything runs on 127.0.0.1 and is started by this script, which stops it by PID (the
stack with its descendants, then the Redis), also on Ctrl-C, SIGTERM or an error; its
children die with it even if it is SIGKILLed. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from harness import OK, Run, load  # bench/
from peers import Processes, Served, _terminate, start_inferq  # bench/

from inferq.registry import Registry
from inferq.stack import EmbeddedRedis, StackInfo

API = "echo"
ENDPOINT = "/chaos/echo"
PREDICT_SECONDS = 0.020
KILL_INTERVAL = 2.0
KILL_CLIENTS = 16
BROKER_CLIENTS = 8
BROKER_DOWN_SECONDS = 2.0
LATENCY_TARGET = PREDICT_SECONDS + 5.0  # p99.9 of the replica-kill run
BACK_TARGET = 5.0  # seconds from the broker's return to a 200
REQUEST_TIMEOUT = 90.0  # past the API's compute.timeout (60 s): a lost request is a 504
QUICK_SECONDS = 12.0

CORTEX_YAML = f"""\
- kind: deployment
  name: chaos

- kind: api
  name: {API}
  predictor:
    path: predictor.py
  compute:
    min_replicas: 2
    max_replicas: 2
"""

# Each prediction appends "<time> start|end <pid> <id>" to a trace file (one O_APPEND write
# per line): which serving process took a sample, and whether it finished it.
PREDICTOR = '''\
import os
import time

TRACE = {trace!r}


def _trace(event, sample):
    line = f"{{time.time():.3f}} {{event}} {{os.getpid()}} {{sample['id']}}\\n".encode()
    fd = os.open(TRACE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def init(model_path, metadata):
    pass


def predict(sample, metadata):
    _trace("start", sample)
    time.sleep({seconds})
    _trace("end", sample)
    return {{"echo": sample["id"]}}
'''

# Lines of the stack's log worth reading after a failure: the scaler's and the supervisors'
# accounts of deaths and recoveries, the gateway's warnings and errors, the replicas'
# (re)connections to the broker. Celery logs a traceback line by line: its fragments are not.
RELEVANT = re.compile(
    r"died|put back|answered with an error|exited with code|restart|does not answer|"
    r"unreachable|Cannot connect|Connected to|Trying again|started replica|is live|"
    r"Warm shutdown|timed out|lost|\bERROR\b|\[(gateway|scaler)\] (WARNING|CRITICAL)",
)
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
RELEVANT_LINES = 150

_WALL = time.time() - time.perf_counter()  # perf_counter -> wall clock, for the logs


def wall(t: float) -> str:
    """A perf_counter time as the stack's log prints time (local, with milliseconds)."""
    at = _WALL + t
    return time.strftime("%H:%M:%S", time.localtime(at)) + f",{int(at % 1 * 1000):03d}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# -- what happened to each request -------------------------------------------------------------


@dataclass
class Request:
    id: int
    began: float  # perf_counter
    took: float
    outcome: str
    answer: Any

    @property
    def ended(self) -> float:
        return self.began + self.took


class Recorder:
    """Every request of a run (the load generator's ``observe``) and a fresh sample for each."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._ids = itertools.count(1)

    def sample(self) -> tuple[dict, dict]:
        n = next(self._ids)  # atomic under the GIL
        return {"id": n}, {"echo": n}

    def observe(self, sample: Any, began: float, took: float, outcome: str, answer: Any) -> None:
        self.requests.append(Request(sample["id"], began, took, outcome, answer))

    def failed(self) -> list[Request]:
        return [r for r in self.requests if r.outcome != OK]


class Load(threading.Thread):
    """harness.load in a thread (faults are made from the main thread: a child started from
    another thread would be SIGKILLed when that thread ends, by its parent-death signal)."""

    def __init__(self, served: Served, clients: int, seconds: float, recorder: Recorder) -> None:
        super().__init__(daemon=True, name="chaos-load")
        self.args = (served, clients, seconds, recorder)
        self.run_result: Run | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        served, clients, seconds, recorder = self.args
        try:
            self.run_result = load(served.port, served.path, None, None, clients=clients,
                                   seconds=seconds, warmup=clients, samples=recorder.sample,
                                   observe=recorder.observe, timeout=REQUEST_TIMEOUT)
        except BaseException as exc:
            self.error = exc

    def result(self) -> Run:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.run_result is not None
        return self.run_result


def write_project(folder: Path) -> tuple[Path, Path]:
    """The chaos project and its predictor's trace file."""
    project = folder / "project"
    project.mkdir(parents=True, exist_ok=True)
    trace = folder / "trace.log"
    (project / "cortex.yaml").write_text(CORTEX_YAML)
    (project / "predictor.py").write_text(PREDICTOR.format(trace=str(trace),
                                                           seconds=PREDICT_SECONDS))
    return project, trace


def start_stack(procs: Processes, project: Path, broker_url: str | None = None) -> Served:
    return start_inferq(procs, project, 2, api=API, endpoint=ENDPOINT, sample={"id": 0},
                        expected={"echo": 0}, broker_url=broker_url)


def read_trace(path: Path) -> dict[int, list[tuple[float, str, int]]]:
    """sample id -> [(wall time, "start"|"end", serving pid)]."""
    events: dict[int, list[tuple[float, str, int]]] = defaultdict(list)
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return events
    for line in lines:
        parts = line.split()
        if len(parts) == 4:
            events[int(parts[3])].append((float(parts[0]), parts[1], int(parts[2])))
    return events


# -- the report --------------------------------------------------------------------------------


def latency_line(run: Run) -> str:
    if not run.count:
        return "latency of the 200s: none answered"
    return ("latency of the 200s: " + ", ".join(
        f"{name} {ms(run.percentile(p))}"
        for name, p in (("p50", 50), ("p99", 99), ("p99.9", 99.9), ("max", 100))))


def outcomes_lines(run: Run, recorder: Recorder) -> list[str]:
    sent = run.sent
    ok = run.outcomes.get(OK, 0)
    lines = [f"requests sent: {sent}",
             f"answered 200 with the right body: {ok} ({100 * ok / sent if sent else 0:.2f}%)"]
    others = sorted((n, o) for o, n in run.outcomes.items() if o != OK)
    lines.append("other outcomes: " + (", ".join(f"{o}: {n}" for n, o in reversed(others))
                                       or "none"))
    warm = run.errors - (sent - ok)
    if warm:
        lines.append(f"warm-up requests (one per client, before the window) that failed: {warm}")
    lines.append(latency_line(run))
    return lines


def trace_lines(events: list[tuple[float, str, int]]) -> list[str]:
    return [f"      predictor {event} in pid {pid} at {wall(at - _WALL)}"
            for at, event, pid in events] or ["      never reached predict()"]


def predictions(trace: dict[int, list[tuple[float, str, int]]],
                recorder: Recorder) -> list[str]:
    """What the trace says of samples predicted more than once: served again after an
    attempt that a fault cut short (at-least-once, expected), or predicted to the end more
    than once (a duplicate: some copy of the message was served while another was), with the
    traces of the first duplicates; then the slowest requests and their traces."""
    again, duplicates = [], []
    for sample, events in sorted(trace.items()):
        starts = sum(1 for _, e, _ in events if e == "start")
        ends = sum(1 for _, e, _ in events if e == "end")
        if ends > 1:
            duplicates.append(sample)
        elif starts > 1:
            again.append(sample)
    lines = [f"samples served again after a fault cut their prediction short: {len(again)}",
             f"samples predicted to the end more than once (duplicates): {len(duplicates)}"]
    for sample in duplicates[:5]:
        lines.append(f"  id {sample}:")
        lines += trace_lines(trace[sample])
    slowest = sorted((r for r in recorder.requests if r.outcome == OK),
                     key=lambda r: r.took, reverse=True)[:3]
    if slowest:
        lines.append("slowest 200s:")
        for request in slowest:
            lines.append(f"  id {request.id}: sent {wall(request.began)}, answered after "
                         f"{ms(request.took)}")
            lines += trace_lines(trace.get(request.id, []))
    return lines


def describe_failures(failed: list[Request], trace: dict, log_path: Path,
                      limit: int = 20) -> list[str]:
    """Each failed request (up to ``limit``) with its predictor trace, then the stack log's
    relevant lines."""
    if not failed:
        return []
    lines = [f"failed requests ({len(failed)}; the first {min(limit, len(failed))}):"]
    for request in failed[:limit]:
        answer = repr(request.answer)
        answer = answer if len(answer) <= 200 else answer[:200] + "..."
        lines.append(f"  id {request.id}: sent {wall(request.began)}, {request.outcome} after "
                     f"{ms(request.took)}: {answer}")
        lines += trace_lines(trace.get(request.id, []))
    try:
        log = log_path.read_text(errors="replace").splitlines()
    except OSError:
        log = []
    relevant = relevant_lines(log)
    lines.append(f"relevant lines of the stack's log ({log_path}: {len(log)} lines; "
                 f"the last {min(RELEVANT_LINES, len(relevant))} of {len(relevant)} shown):")
    lines += [f"  {line}" for line in relevant[-RELEVANT_LINES:]]
    return lines


def relevant_lines(log: list[str]) -> list[str]:
    """The lines :data:`RELEVANT` picks, cut to 300 characters; a run of lines that differ
    only by their time stamps is one line and a count."""
    picked: list[str] = []
    previous, repeats = None, 0
    for line in log:
        if not RELEVANT.search(line):
            continue
        key = _TIMESTAMP.sub("", line)
        if key == previous:
            repeats += 1
            continue
        if repeats:
            picked[-1] += f"  (and {repeats} more like it)"
        picked.append(line[:300])
        previous, repeats = key, 0
    if repeats:
        picked[-1] += f"  (and {repeats} more like it)"
    return picked


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# -- run 1: replica kills ----------------------------------------------------------------------


@dataclass
class Kill:
    at: float  # perf_counter
    role: str  # "supervisor" or "serving process"
    replica: str
    pid: int
    serving_pid: int  # the process that held the request, whichever was killed
    held: list[str] = field(default_factory=list)  # task ids in its taken list just before


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``pid`` runs under ``ancestor`` (never signal a process that is not ours)."""
    try:
        return any(p.pid == ancestor for p in psutil.Process(pid).parents())
    except psutil.Error:
        return False


def kill_one(registry: Registry, stack_pid: int, rng: random.Random) -> Kill | None:
    """SIGKILL the supervisor or the serving process of a live replica, at random."""
    live = [r for r in registry.replicas.of(API)
            if r.status == "live" and r.pid and r.replica_pid]
    rng.shuffle(live)
    for record in live:
        role = rng.choice(("supervisor", "serving process"))
        pid = record.replica_pid if role == "supervisor" else record.pid
        if not descends_from(pid, stack_pid):
            continue  # gone already, or a stale record
        held = registry.queues.in_flight(API, [record.id]).get(record.id, [])
        at = time.perf_counter()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        return Kill(at, role, record.id, pid, record.pid, held)
    return None


def run_kills(workdir: Path, seconds: float, seed: int | None) -> bool:
    folder = workdir / "kills"
    folder.mkdir(parents=True)
    project, trace_path = write_project(folder)
    rng = random.Random(seed)
    print(f"\n== replica kills: {API} with 2 replicas (predict {ms(PREDICT_SECONDS)}), "
          f"{KILL_CLIENTS} clients for {seconds:g} s, a SIGKILL every {KILL_INTERVAL:g} s ==",
          flush=True)
    recorder = Recorder()
    kills: list[Kill] = []
    skipped = 0
    with Processes(folder) as procs:
        print("starting inferq up (embedded Redis)", file=sys.stderr, flush=True)
        served = start_stack(procs, project)
        stack_pid = procs.started[-1][1].pid
        info = StackInfo(**json.loads((served.home / "stack.json").read_text()))
        registry = Registry(info.broker_url)
        print("measuring", file=sys.stderr, flush=True)
        loader = Load(served, KILL_CLIENTS, seconds, recorder)
        began = time.perf_counter()
        loader.start()
        for k in itertools.count(1):
            at = began + k * KILL_INTERVAL
            if at >= began + seconds:
                break
            time.sleep(max(0.0, at - time.perf_counter()))
            if not loader.is_alive():
                break
            kill = kill_one(registry, stack_pid, rng)
            if kill is None:
                skipped += 1
            else:
                kills.append(kill)
        run = loader.result()
        time.sleep(1.0)  # the trace's last lines
        trace = read_trace(trace_path)
        log_path = procs.log_path("inferq-up-2")
        failures = describe_failures(recorder.failed(), trace, log_path)
        registry.close()
    roles = Counter(k.role for k in kills)
    lines = [f"kills: {len(kills)} ({roles['supervisor']} supervisors, "
             f"{roles['serving process']} serving processes)"
             + (f"; {skipped} skipped (no live replica at that moment)" if skipped else "")]
    lines += outcomes_lines(run, recorder)
    lines += predictions(trace, recorder)
    all_ok = run.sent > 0 and run.outcomes.get(OK, 0) == run.sent and run.errors == 0
    fast = run.count > 0 and run.percentile(99.9) <= LATENCY_TARGET
    lines.append(f"target: 100% answered 200 with the right body: {verdict(all_ok)}")
    lines.append(f"target: p99.9 <= {ms(LATENCY_TARGET)}: {verdict(fast)}")
    if failures:
        lines.append("kills (time, role, pid, replica, task ids it held just before):")
        lines += [f"  {wall(k.at)} {k.role} {k.pid} of {k.replica} (serving pid "
                  f"{k.serving_pid}) held {k.held or 'nothing'}" for k in kills]
        lines += failures
    print("\n".join(lines), flush=True)
    return all_ok and fast


# -- run 2: broker restart ---------------------------------------------------------------------


class DurableRedis(EmbeddedRedis):
    """inferq's embedded Redis command line, with every write fsynced (``appendfsync
    always``): a SIGKILL loses nothing the broker acknowledged."""

    def command(self) -> list[str]:
        args = super().command()
        args[args.index("--appendfsync") + 1] = "always"
        return args


def timeline(recorder: Recorder, start: float, end: float, origin: float) -> list[str]:
    """Per second from ``start`` to ``end``: the requests answered then, by outcome."""
    lines = []
    t = start
    while t < end:
        counts = Counter(r.outcome for r in recorder.requests if t <= r.ended < t + 1)
        text = ", ".join(f"{o}: {n}" for o, n in counts.most_common()) or "nothing answered"
        lines.append(f"  {t - origin:+5.1f} s .. {t + 1 - origin:+5.1f} s: {text}")
        t += 1
    return lines


def run_broker(workdir: Path, seconds: float, down: float, seed: int | None) -> bool:
    folder = workdir / "broker"
    folder.mkdir(parents=True)
    project, trace_path = write_project(folder)
    # a few seconds in, at a random phase of the clients' request cycle
    kill_after = max(2.0, min(5.0, seconds / 3)) + random.Random(seed).random()
    print(f"\n== broker restart: {API} with 2 replicas (predict {ms(PREDICT_SECONDS)}) on a "
          f"redis-server with appendfsync always, {BROKER_CLIENTS} clients for {seconds:g} s; "
          f"the Redis SIGKILLed after {kill_after:.1f} s, started again {down:g} s "
          f"later ==", flush=True)
    recorder = Recorder()
    broker = DurableRedis(folder / "redis")
    try:
        broker.start()
        with Processes(folder) as procs:
            print(f"starting inferq up on {broker.url}", file=sys.stderr, flush=True)
            served = start_stack(procs, project, broker_url=broker.url)
            print("measuring", file=sys.stderr, flush=True)
            loader = Load(served, BROKER_CLIENTS, seconds, recorder)
            began = time.perf_counter()
            loader.start()
            time.sleep(kill_after)
            killed_at = time.perf_counter()
            killed_pid = broker.process.pid
            broker.process.kill()
            broker.process.wait()
            time.sleep(down)
            restarted_at = time.perf_counter()
            broker.start()  # same port, same folder: the append-only file is replayed
            back_at = time.perf_counter()
            run = loader.result()
            time.sleep(1.0)
            trace = read_trace(trace_path)
            log_path = procs.log_path("inferq-up-2")
    finally:
        broker.stop()

    lines = [f"Redis (pid {killed_pid}) SIGKILLed at {wall(killed_at)} "
             f"(+{killed_at - began:.1f} s), started again at {wall(restarted_at)}, "
             f"answering from its append-only file at {wall(back_at)} "
             f"(down {back_at - killed_at:.2f} s)"]
    lines += outcomes_lines(run, recorder)

    unavailable = [r for r in recorder.requests if r.outcome.startswith("503")]
    if not unavailable:
        lines.append("503s: none (the gateway held what was sent during the outage)")
    else:
        lines.append(f"503s: {len(unavailable)}, answered from "
                     f"{min(r.ended for r in unavailable) - killed_at:+.2f} s to "
                     f"{max(r.ended for r in unavailable) - killed_at:+.2f} s after the kill "
                     f"(the broker answered again at +{back_at - killed_at:.2f} s)")
    # Allowed: a 503 to a request sent before the broker answered again, answered after the
    # kill; with Retry-After.
    stray = [r for r in unavailable
             if r.outcome != "503" or r.ended < killed_at or r.began > back_at]
    if stray:
        lines.append(f"503s outside the outage or without Retry-After: {len(stray)} (first: "
                     f"id {stray[0].id} sent {stray[0].began - killed_at:+.2f} s after the kill, "
                     f"{stray[0].outcome})")
    other = [r for r in recorder.requests if r.outcome not in (OK,) and not
             r.outcome.startswith("503")]
    if other:
        when = Counter(f"{r.outcome} at {r.ended - killed_at:+.0f} s" for r in other)
        lines.append("other failures, answered (seconds after the kill): "
                     + ", ".join(f"{w}: {n}" for w, n in sorted(when.items())))
    after_any = [r for r in recorder.requests if r.outcome == OK and r.ended >= back_at]
    after_new = [r for r in after_any if r.began >= back_at]
    first_any = min((r.ended for r in after_any), default=None)
    first_new = min((r.ended for r in after_new), default=None)
    lines.append("first 200 after the return: "
                 + (f"{first_any - back_at:.2f} s after (any request)" if first_any else "none")
                 + "; to a request sent after the return: "
                 + (f"{first_new - back_at:.2f} s after" if first_new else "none"))
    held = [r for r in recorder.requests if r.outcome == OK and r.began < killed_at < r.ended]
    if held:
        lines.append(f"requests in flight at the kill and answered 200 after it: {len(held)} "
                     f"(slowest {ms(max(r.took for r in held))})")
    lines.append("timeline around the outage (answered per second, relative to the kill):")
    lines += timeline(recorder, killed_at - 2, min(back_at + 7, began + seconds + 5), killed_at)
    lines += predictions(trace, recorder)

    answered = run.sent > 0 and not other and not stray
    back = first_new is not None and first_new - back_at <= BACK_TARGET
    lines.append(f"target: every request answered (200, or 503 with Retry-After during the "
                 f"outage), right bodies: {verdict(answered)}")
    lines.append(f"target: 503 with Retry-After only while the broker is down: "
                 f"{verdict(not stray)}")
    lines.append(f"target: 200 again within {BACK_TARGET:g} s of its return: {verdict(back)}")
    # 503s during the outage are expected: only the others are described
    lines += describe_failures(sorted(stray + other, key=lambda r: r.began), trace, log_path)
    print("\n".join(lines), flush=True)
    return answered and back


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="seconds of load in each run (default 60)")
    parser.add_argument("--only", choices=["kills", "broker"], help="run only this one")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SECONDS:g} s runs (smoke test)")
    parser.add_argument("--seed", type=int,
                        help="seed of the random choices (which process to kill, when to "
                             "kill the Redis)")
    parser.add_argument("--broker-down", type=float, default=BROKER_DOWN_SECONDS,
                        help=f"seconds between the Redis's kill and its restart "
                             f"(default {BROKER_DOWN_SECONDS:g})")
    parser.add_argument("--workdir", type=Path,
                        help="keep the stacks' logs and the predictor traces in this new folder")
    args = parser.parse_args(argv)
    seconds = QUICK_SECONDS if args.quick else args.seconds
    if seconds < 4:
        parser.error("--seconds: at least 4")
    if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir: {args.workdir} is not empty")

    signal.signal(signal.SIGTERM, _terminate)
    results = []
    with tempfile.TemporaryDirectory(prefix="inferq-chaos-") as temp:
        workdir = args.workdir or Path(temp)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            if args.only in (None, "kills"):
                results.append(run_kills(workdir, seconds, args.seed))
            if args.only in (None, "broker"):
                results.append(run_broker(workdir, seconds, args.broker_down, args.seed))
        except KeyboardInterrupt:
            print("interrupted; everything it started is stopped", file=sys.stderr)
            return 130
    if args.workdir:
        print(f"\nlogs and traces: {args.workdir}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
