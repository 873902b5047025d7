"""What the HTTP benchmarks share: the load generators and the in-process baseline server.

- :func:`load`: the Python load generator (one keep-alive ``http.client`` connection per
  client thread), for a number of requests or a number of seconds; it can send a new sample
  per request, checks every answer, and counts every outcome (``bench/chaos.py`` reads them);
- :func:`wrk`: the same closed-loop measurement with ``wrk`` (C, epoll), when it is on PATH:
  it costs far less CPU per request than Python threads, so on a small machine the server,
  not the load generator, is what is measured;
- :func:`serve_baseline`: Cortex v0.11's way of serving, the predictor imported in the
  server and called in a Flask handler on waitress.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from inferq.processes import spawn, stop

BASELINE_ENDPOINT = "/predict"
PERCENTILES = (50, 90, 99, 99.9, 100)  # 100: the slowest (wrk gives only 50, 90, 99)
OK = "200"  # the outcome of a request answered 200 with the expected body

# observe(sample, began, took, outcome, answer): called for every request of the measured
# window, from the client's thread; ``began`` is its time.perf_counter() at sending.
Observer = Callable[[Any, float, float, str, Any], None]


@dataclass
class Run:
    """One load run: requests answered, wall seconds, failures, latency percentiles."""

    count: int
    seconds: float
    errors: int
    latency: dict[float, float]  # percentile -> seconds
    generator: str
    # outcome -> requests of the measured window (Python generator only): OK, "200 wrong
    # body", a status code ("503", or "503 without Retry-After"), or an exception's class name
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        return self.latency[p]

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())


def _percentiles(latencies: list[float]) -> dict[float, float]:
    ordered = sorted(latencies) or [float("nan")]
    return {p: ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
            for p in PERCENTILES}


def _parse(answer: bytes) -> Any:
    try:
        return json.loads(answer)
    except ValueError:
        return answer


def outcome_of(response: http.client.HTTPResponse | None, answer: Any, expected: Any,
               error: BaseException | None = None) -> str:
    """What became of one request: :data:`OK`, ``"200 wrong body"``, the status code (a 503
    or 429 without ``Retry-After`` says so), or the class name of the exception it raised."""
    if response is None:
        return type(error).__name__ if error is not None else "no answer"
    if response.status == 200:
        return OK if answer == expected else "200 wrong body"
    if response.status in (429, 503) and response.getheader("Retry-After") is None:
        return f"{response.status} without Retry-After"
    return str(response.status)


def load(port: int, path: str, sample: Any, expected: Any, *, clients: int = 1,
         requests: int | None = None, seconds: float | None = None, warmup: int = 50,
         samples: Callable[[], tuple[Any, Any]] | None = None,
         observe: Observer | None = None, timeout: float = 60.0) -> Run:
    """POST ``sample`` from ``clients`` threads, each on its own keep-alive connection, until
    ``requests`` were sent or for ``seconds``; an answer other than 200 ``expected`` is an
    error (a broken connection too: the client reconnects).

    ``samples``, when given, makes each request's (sample, expected) pair instead (it is
    called from the client threads); ``observe`` sees every request of the measured window;
    ``timeout`` is each request's socket timeout."""
    if (requests is None) == (seconds is None):
        raise ValueError("give requests or seconds")
    fixed = json.dumps(sample).encode()
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    errors = [0]
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    remaining = [requests or 0]
    window = {"began": 0.0, "deadline": 0.0}

    def open_window() -> None:  # runs once every client has warmed up
        window["began"] = time.perf_counter()
        window["deadline"] = window["began"] + (seconds or 0.0)

    start = threading.Barrier(clients + 1, action=open_window)

    def call(connection: http.client.HTTPConnection, measured: bool) -> float | None:
        if samples is None:
            body, want, sent = fixed, expected, sample
        else:
            sent, want = samples()
            body = json.dumps(sent).encode()
        began = time.perf_counter()
        error = None
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            answer = _parse(response.read())
        except (OSError, http.client.HTTPException) as exc:
            connection.close()  # the next request reconnects
            answer, response, error = None, None, exc
        took = time.perf_counter() - began
        outcome = outcome_of(response, answer, want, error)
        if measured:
            with lock:
                outcomes[outcome] += 1
            if observe is not None:
                observe(sent, began, took, outcome, answer)
        if outcome != OK:
            with lock:
                errors[0] += 1
            return None
        return took

    def more() -> bool:
        if seconds is not None:
            return time.perf_counter() < window["deadline"]
        with lock:
            remaining[0] -= 1
            return remaining[0] >= 0

    def client(warm: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            for _ in range(warm):
                call(connection, measured=False)
            start.wait()
            while more():
                took = call(connection, measured=True)
                if took is not None:
                    latencies.append(took)  # list.append is atomic
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(max(1, warmup // clients),))
               for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    for thread in threads:
        thread.join()
    return Run(len(latencies), time.perf_counter() - window["began"], errors[0],
               _percentiles(latencies), "python", outcomes)


# -- wrk ---------------------------------------------------------------------------------------

# wrk posts the body on every request and, when done, prints one line this module parses.
# Its latencies are microseconds; errors are per kind (a non-2xx answer is a "status" error).
_WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK-RESULT %d %d %d %.1f %.1f %.1f\\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk(port: int, path: str, sample: Any, *, clients: int, seconds: float,
        threads: int = 1) -> Run:
    """``clients`` keep-alive connections for ``seconds`` with wrk; answers are not parsed
    (check them before), only their status."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT.format(body=json.dumps(sample)))
    args = [wrk_path(), "-t", str(min(threads, clients)), "-c", str(clients),
            "-d", f"{max(1, round(seconds))}s", "--timeout", "30s", "-s", script.name,
            f"http://127.0.0.1:{port}{path}"]
    process = spawn(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=seconds + 60)
    finally:
        stop(process, timeout=2)  # only acts when communicate() was interrupted
        os.unlink(script.name)
    text = output.decode(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("WRK-RESULT ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {process.returncode}):\n{text[-2000:]}")
    count, micros, errors, p50, p90, p99 = line.split()[1:]
    latency = {50: float(p50) / 1e6, 90: float(p90) / 1e6, 99: float(p99) / 1e6}
    return Run(int(count), int(micros) / 1e6, int(errors), latency, "wrk")


# -- the baseline server -----------------------------------------------------------------------


def load_predictor(path: Path, model_path: str | None = None, *,
                   init: bool = True) -> ModuleType:
    """Import a Cortex ``predictor.py`` and (``init``) run its ``init(model_path, {})``."""
    spec = importlib.util.spec_from_file_location("predictor", path)
    predictor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predictor)
    if init and hasattr(predictor, "init"):
        predictor.init(model_path, {})
    return predictor


def serve_baseline(port: int, project: Path) -> None:
    """Cortex v0.11's way: the predictor imported in the server, called in a Flask handler,
    on waitress with its default 4 threads; ``GET /healthz`` answers once it serves."""
    from flask import Flask, jsonify, request
    from waitress import serve

    predictor = load_predictor(project / "predictor.py")
    app = Flask("baseline")

    @app.route(BASELINE_ENDPOINT, methods=["POST"])
    def predict():
        sample = request.get_json(force=True)
        return jsonify(predictor.predict(sample, {}))

    @app.route("/healthz")
    def healthz():
        return "ok"

    serve(app, host="127.0.0.1", port=port, threads=4, _quiet=True)
