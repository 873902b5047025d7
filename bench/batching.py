"""Batches: samples/s of many samples per message against one per message, in one run.

(a) ``Client.map`` over the same samples with ``batch_size`` 64 and with 1 (one sample per
message, as every request travelled before batches), for four predictors, each served by
``inferq up`` with 2 replicas and each next to an in-process loop of the same function on the
same data (``predict`` per sample; ``predict_batch`` over batches of 64):

- ``trivial``: an iris-like fixed linear model in pure Python (bench/peers.py's), whose
  ``predict_batch`` loops in Python;
- ``trivial, predict only``: the same without ``predict_batch`` (the replica loops);
- ``iris``: the bundled example (numpy), with its vectorised ``predict_batch``;
- ``iris, predict only``: the example without ``predict_batch``.

(b) The gateway at 64 concurrent clients (wrk when on PATH) for the trivial predictor with
``predict_batch``, without and with ``predictor.server_side_batching``.

Targets (issue 12): map of iris with predict_batch >= 50% of the in-process predict_batch loop
and >= 20x one sample per message; map without predict_batch >= 5x one sample per message;
the gateway with server_side_batching >= 2x the throughput without it, p99 no worse.

    .venv/bin/python bench/batching.py [--samples 5000] [--seconds 8] [--quick]

Every stack runs on 127.0.0.1, one at a time, stopped by PID (also on Ctrl-C or an error).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from harness import load, load_predictor, wrk, wrk_path  # noqa: E402  (bench/)
from peers import PREDICTOR, Processes, start_inferq  # noqa: E402

from inferq import Client  # noqa: E402

BATCH = 64
REPLICAS = 2
EXAMPLE = ROOT / "configs" / "examples" / "iris"

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
    return text if with_batch else text.split("\n\ndef predict_batch")[0] + "\n"


CASES = [
    Case("trivial (pure Python), predict_batch", "trivial", PREDICTOR + PREDICT_BATCH),
    Case("trivial (pure Python), predict only", "trivial-single", PREDICTOR),
    Case("iris example (numpy), predict_batch", "iris", iris_predictor(True), "model.json"),
    Case("iris example (numpy), predict only", "iris-single", iris_predictor(False),
         "model.json"),
]


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


def rate(count: int, run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return count / (time.perf_counter() - started)


def in_process(project: Path, case: Case, samples: list) -> tuple[float, float | None]:
    """Samples/s of ``predict`` per sample, and of ``predict_batch`` over batches."""
    predictor = load_predictor(project / "predictor.py")
    if case.model:
        predictor.init(str(project / case.model), {})
    per_sample = rate(len(samples), lambda: [predictor.predict(s, {}) for s in samples])
    if not hasattr(predictor, "predict_batch"):
        return per_sample, None
    batches = [samples[i:i + BATCH] for i in range(0, len(samples), BATCH)]
    return per_sample, rate(len(samples), lambda: [predictor.predict_batch(b, {})
                                                   for b in batches])


def broker_url(home: Path) -> str:
    return json.loads((home / "stack.json").read_text())["broker_url"]


def measure_map(workdir: Path, case: Case, samples: list, single: list) -> dict[str, Any]:
    project = write_project(workdir, case)
    per_sample, batched = in_process(project, case, samples)
    with Processes(workdir / f"{case.api}-run") as procs:
        (workdir / f"{case.api}-run").mkdir(exist_ok=True)
        served = start_inferq(procs, project, REPLICAS, api=case.api,
                              endpoint=f"/batching/{case.api}", sample=samples[0],
                              expected=in_process_answer(project, case, samples[0]))
        with Client(broker_url(served.home)) as client:
            list(client.map(case.api, samples[:500]))  # warm both replicas
            map64 = rate(len(samples), lambda: list(client.map(case.api, samples,
                                                               batch_size=BATCH)))
            map1 = rate(len(single), lambda: list(client.map(case.api, single, batch_size=1)))
    return {"case": case.title, "loop": per_sample, "loop_batch": batched,
            "map1": map1, "map64": map64}


def in_process_answer(project: Path, case: Case, sample: Any) -> Any:
    predictor = load_predictor(project / "predictor.py")
    if case.model:
        predictor.init(str(project / case.model), {})
    return predictor.predict(sample, {})


def measure_gateway(workdir: Path, batching: str, seconds: float) -> dict[str, Any]:
    case = Case("gateway", "gw" + ("-batched" if batching else ""), PREDICTOR + PREDICT_BATCH,
                batching=batching)
    project = write_project(workdir, case)
    sample = make_samples(1)[0]
    expected = in_process_answer(project, case, sample)
    run_dir = workdir / f"{case.api}-run"
    run_dir.mkdir()
    with Processes(run_dir) as procs:
        served = start_inferq(procs, project, REPLICAS, api=case.api,
                              endpoint=f"/batching/{case.api}", sample=sample,
                              expected=expected)
        if wrk_path():
            run = wrk(served.port, served.path, sample, clients=64, seconds=seconds)
        else:
            run = load(served.port, served.path, sample, expected, clients=64, seconds=seconds)
    return {"rate": run.rate, "p99": run.percentile(99), "errors": run.errors,
            "generator": run.generator}


def report(maps: list[dict[str, Any]], gateway: dict[str, dict[str, Any]], samples: int,
           single: int, batching: str) -> None:
    print(f"\nClient.map, {REPLICAS} replicas, {samples} samples in batches of {BATCH} "
          f"({single} one per message); samples/s:\n")
    print("| predictor | in-process predict loop | in-process predict_batch loop | "
          "map, 1 per message | map, 64 per message | map 64 / map 1 | map 64 / batch loop |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in maps:
        batch_loop = f"{row['loop_batch']:,.0f}" if row["loop_batch"] else "-"
        of_loop = f"{row['map64'] / row['loop_batch']:.0%}" if row["loop_batch"] else "-"
        print(f"| {row['case']} | {row['loop']:,.0f} | {batch_loop} | {row['map1']:,.0f} | "
              f"{row['map64']:,.0f} | {row['map64'] / row['map1']:.1f}x | {of_loop} |")
    off, on = gateway["off"], gateway["on"]
    print(f"\nGateway, 64 clients ({off['generator']}), trivial predictor with predict_batch, "
          f"{REPLICAS} replicas:\n")
    print("| | req/s | p99 |\n|---|---:|---:|")
    print(f"| without server_side_batching | {off['rate']:,.0f} | {off['p99'] * 1000:.1f} ms |")
    print(f"| server_side_batching {batching} | {on['rate']:,.0f} | "
          f"{on['p99'] * 1000:.1f} ms |")
    iris = next(r for r in maps if r["case"].startswith("iris example (numpy), predict_b"))
    iris_single = next(r for r in maps if r["case"].startswith("iris example (numpy), predict o"))
    checks = [
        ("iris map with predict_batch / in-process predict_batch loop",
         iris["map64"] / iris["loop_batch"], ">= 50%", iris["map64"] / iris["loop_batch"] >= 0.5),
        ("iris map with predict_batch / one sample per message",
         iris["map64"] / iris["map1"], ">= 20x", iris["map64"] / iris["map1"] >= 20),
        ("iris map without predict_batch / one sample per message",
         iris_single["map64"] / iris_single["map1"], ">= 5x",
         iris_single["map64"] / iris_single["map1"] >= 5),
        ("gateway throughput with / without server_side_batching", on["rate"] / off["rate"],
         ">= 2x", on["rate"] / off["rate"] >= 2),
        ("gateway p99 with / without server_side_batching", on["p99"] / off["p99"], "<= 1x",
         on["p99"] <= off["p99"]),
    ]
    print("\n| target | measured | wanted | |\n|---|---:|---:|---|")
    for name, value, wanted, met in checks:
        shown = f"{value:.0%}" if wanted.endswith("%") else f"{value:.2f}x"
        print(f"| {name} | {shown} | {wanted} | {'met' if met else 'missed'} |")
    errors = off["errors"] + on["errors"]
    if errors:
        print(f"\n{errors} HTTP requests failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=5000, help="samples per batched map")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per gateway run")
    parser.add_argument("--batching", default="{max_batch_size: 32, batch_interval: 5ms}",
                        help="the server_side_batching block of the gateway part")
    parser.add_argument("--quick", action="store_true", help="1,000 samples, 3 s runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.seconds = 1000, 3.0
    samples = make_samples(args.samples)
    single = samples[: max(500, args.samples // 5)]  # one per message is slow: fewer
    with tempfile.TemporaryDirectory(prefix="inferq-batching-") as folder:
        workdir = Path(folder)
        try:
            maps = []
            for case in CASES:
                print(f"{case.title}: measuring", file=sys.stderr, flush=True)
                maps.append(measure_map(workdir, case, samples, single))
            print("gateway: measuring", file=sys.stderr, flush=True)
            gateway = {
                "off": measure_gateway(workdir, "", args.seconds),
                "on": measure_gateway(workdir, f"    server_side_batching: {args.batching}\n",
                                      args.seconds),
            }
        except KeyboardInterrupt:
            print("interrupted; everything it started is stopped", file=sys.stderr)
            return 130
    report(maps, gateway, len(samples), len(single), args.batching)
    return 1 if gateway["off"]["errors"] + gateway["on"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
