"""A torch model through ``inferq up`` (``gpu: 1``): batched and per-sample throughput next
to the same predictor called in process.

The model is an MLP, 4 -> 512 -> 512 -> 3 (ReLU between), its weights made in ``init()``
from a fixed seed; ``predict`` puts one sample on the device and returns the argmax's label,
``predict_batch`` does the same for a whole batch in one forward pass. Samples are iris-like
objects (``{"sepal_length": 5.1, ...}``), drawn from a fixed seed. Printed, in samples/s:

1. an in-process loop calling ``predict`` per sample;
2. an in-process loop calling ``predict_batch`` on batches of ``--batch-size`` (64);
3. ``inferq.Client.predict`` in a loop, one sample at a time;
4. ``Client.map`` with ``batch_size=1`` (one message per sample, ``predict`` each);
5. ``Client.map`` with ``batch_size=64`` (``predict_batch`` once per message);

and the ratio 5 / 2, whose target on a GPU is >= 50% (issue 12, item 7). The in-process
loops run first, in a child process that exits before ``inferq up`` starts, so the replica
has the device (and the machine) to itself and the benchmark's own process never touches
CUDA. Every served answer is compared with the in-process answer of the same path.

    .venv/bin/python bench/gpu_batching.py --device cpu --quick    # smoke test, any host
    python3 bench/gpu_batching.py                                  # --device auto: cuda if any

``--device auto`` picks ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; ``cuda``
deploys the API with ``compute: gpu: 1`` (the scaler must see a GPU through NVML), ``cpu``
with ``gpu: 0``. Each measurement passes over ``--samples`` distinct samples (whole batches)
until ``--min-seconds`` have passed, and stops at ``--seconds`` even within a pass, so the
run's length is bounded. Everything runs on 127.0.0.1 and is stopped by PID, with the processes
it started, also on Ctrl-C, SIGTERM or an error. Exit status 1 when a prediction failed or
differed from the in-process one; a missed target is reported, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import load_predictor  # bench/
from peers import Processes, _terminate, inferq_env, run_command, start_inferq  # bench/

# inferq before bench/peers.py, which puts the repository's root first on sys.path: there
# inferq/ is only the top of the package (inferq.workers, .configs, ... are gateway/, workers/,
# configs/ mapped at install time), so only an editable install finds the rest through it.
# Imported first, the installed inferq is the one every later import gets: the GPU machine's
# (a wheel on PYTHONPATH) as well as an editable one.
from inferq import Client
from inferq.errors import InferqError

DEPLOYMENT = "gpu-batching"
API = "mlp"
ENDPOINT = f"/{DEPLOYMENT}/{API}"
SEED = 0
TARGET = 0.5  # Client.map with predict_batch / in-process predict_batch loop, on a GPU
IN_PROCESS_TIMEOUT = 300.0  # seconds the in-process child may take beyond its measurements

# Written into the project as predictor.py, with DEVICE filled in; the in-process loops
# import the very same file (harness.load_predictor), so both sides run identical code.
PREDICTOR = '''\
"""An MLP (4 -> 512 -> 512 -> 3) on {device!r}, with random weights from a fixed seed."""

import torch

DEVICE = {device!r}
SEED = {seed}
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
CLASSES = ("setosa", "versicolor", "virginica")
MEAN = (5.8, 3.0, 3.8, 1.2)  # centre and scale the inputs, so that every class comes out
STD = (0.8, 0.4, 1.8, 0.8)

device = None
model = None
mean = std = None


def init(model_path, metadata):
    global device, model, mean, std
    device = torch.device(DEVICE)
    torch.manual_seed(SEED)  # the same weights on every replica and in process
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 3),
    ).to(device).eval()
    mean = torch.tensor(MEAN, device=device)
    std = torch.tensor(STD, device=device)


def _labels(rows):
    x = torch.tensor(rows, dtype=torch.float32, device=device)
    with torch.inference_mode():
        return model((x - mean) / std).argmax(dim=1).tolist()  # .tolist() waits for the GPU


def predict(sample, metadata):
    return CLASSES[_labels([[float(sample[name]) for name in FEATURES]])[0]]


def predict_batch(samples, metadata):
    rows = [[float(sample[name]) for name in FEATURES] for sample in samples]
    return [CLASSES[i] for i in _labels(rows)]
'''

CORTEX_YAML = f"""\
- kind: deployment
  name: {DEPLOYMENT}

- kind: api
  name: {API}
  predictor:
    path: predictor.py
  compute:
    min_replicas: 1
    max_replicas: 1
    gpu: {{gpu}}
"""

PATHS = {  # key -> label, in the order measured and printed
    "local_predict": "in-process loop, `predict` per sample",
    "local_batch": "in-process loop, `predict_batch` on batches of {batch}",
    "client_predict": "`Client.predict` in a loop (1 replica)",
    "map_1": "`Client.map`, batch_size=1 (`predict` per message)",
    "map_batch": "`Client.map`, batch_size={batch} (`predict_batch` per message)",
}
SAME_ANSWERS = {  # a served path -> the in-process path whose answers it must give
    "client_predict": "local_predict",
    "map_1": "local_predict",
    "map_batch": "local_batch",
}


def make_samples(count: int) -> list[dict[str, float]]:
    """``count`` iris-like samples (centimetres, one decimal), the same for every run."""
    rng = random.Random(SEED)
    ranges = {"sepal_length": (4.3, 7.9), "sepal_width": (2.0, 4.4),
              "petal_length": (1.0, 6.9), "petal_width": (0.1, 2.5)}
    return [{name: round(rng.uniform(low, high), 1) for name, (low, high) in ranges.items()}
            for _ in range(count)]


@dataclass
class Budget:
    """How long one measurement runs: passes over the samples until ``min_seconds`` have
    passed (at least one pass), stopping at ``seconds`` even within a pass."""

    batch_size: int
    min_seconds: float
    seconds: float


def batches(samples: list[Any], budget: Budget) -> Iterator[list[Any]]:
    """``samples`` in consecutive batches of ``budget.batch_size``, pass after pass, within
    ``budget``; every pass is cut the same way, so each path sees the same batches."""
    began = time.perf_counter()
    floor, deadline = began + budget.min_seconds, began + budget.seconds
    while True:
        for start in range(0, len(samples), budget.batch_size):
            if time.perf_counter() >= deadline:
                return
            yield samples[start:start + budget.batch_size]
        if time.perf_counter() >= floor:
            return


def timed(answers: Callable[[Iterator[list[Any]]], list[Any]], samples: list[Any],
          budget: Budget) -> dict[str, Any]:
    """Run ``answers(batches)`` over ``samples`` within ``budget``: how many answers it gave
    in how many seconds, and the answers of the first pass (to compare)."""
    began = time.perf_counter()
    got = answers(batches(samples, budget))
    took = time.perf_counter() - began
    return {"samples": len(got), "seconds": took, "answers": got[:len(samples)]}


# -- the in-process loops (a child process) ----------------------------------------------------


def resolve_device(wanted: str) -> str:
    if wanted == "cpu":
        return wanted
    import torch  # no CUDA context: is_available() only counts devices

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    return wanted


def run_in_process(workdir: Path) -> int:
    """The child: measure the two in-process loops as ``workdir/job.json`` says, with the
    project's predictor.py; write ``workdir/in_process.json``."""
    import torch

    job = json.loads((workdir / "job.json").read_text())
    samples, budget = job["samples"], Budget(**job["budget"])
    batch = budget.batch_size
    predictor = load_predictor(Path(job["project"]) / "predictor.py")

    for sample in samples[:20]:  # warm-up: CUDA context, cuBLAS handles, kernels
        predictor.predict(sample, {})
    for _ in range(3):
        predictor.predict_batch(samples[:batch], {})

    def per_sample(chunks: Iterator[list[Any]]) -> list[Any]:
        return [predictor.predict(sample, {}) for chunk in chunks for sample in chunk]

    def per_batch(chunks: Iterator[list[Any]]) -> list[Any]:
        return [answer for chunk in chunks for answer in predictor.predict_batch(chunk, {})]

    results = {"local_predict": timed(per_sample, samples, budget),
               "local_batch": timed(per_batch, samples, budget)}
    device = predictor.device
    info = {"torch": torch.__version__, "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else f"CPU, {torch.get_num_threads()} torch threads")}
    (workdir / "in_process.json").write_text(json.dumps({"info": info, "results": results}))
    return 0


def measure_in_process(procs: Processes, workdir: Path, budget: Budget) -> dict[str, Any]:
    name = "in-process"
    process = procs.start(name, [sys.executable, __file__, "--in-process", str(workdir)])
    try:
        process.wait(timeout=2 * budget.seconds + IN_PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the in-process loops took too long:\n{procs.log(name)}") from None
    if process.returncode != 0:
        raise RuntimeError(f"the in-process loops failed (exit {process.returncode}):\n"
                           f"{procs.log(name)}")
    return json.loads((workdir / "in_process.json").read_text())


# -- the served paths --------------------------------------------------------------------------


def measure_served(home: Path, samples: list[Any], budget: Budget,
                   window: int) -> dict[str, Any]:
    """Client.predict in a loop, Client.map with batch_size 1 and ``budget.batch_size``, on
    the stack whose INFERQ_HOME is ``home``."""
    batch = budget.batch_size
    broker_url = json.loads((home / "stack.json").read_text())["broker_url"]
    with Client(broker_url) as client:
        for sample in samples[:20]:  # warm-up: connections, the replica's first messages
            client.predict(API, sample)
        list(client.map(API, samples[:4 * batch], batch_size=batch, window=window))
        list(client.map(API, samples[:64], batch_size=1, window=window))

        def predict_loop(chunks: Iterator[list[Any]]) -> list[Any]:
            return [client.predict(API, sample) for chunk in chunks for sample in chunk]

        def mapped(size: int) -> Callable[[Iterator[list[Any]]], list[Any]]:
            def run(chunks: Iterator[list[Any]]) -> list[Any]:
                # a pass is whole batches (--samples is a multiple of the batch size), so map
                # cuts the flat stream as batches() did: each message holds the samples of
                # one in-process predict_batch call
                flat = (sample for chunk in chunks for sample in chunk)
                return list(client.map(API, flat, batch_size=size, window=window))
            return run

        results = {}
        for key, answers in (("client_predict", predict_loop), ("map_1", mapped(1)),
                             ("map_batch", mapped(batch))):
            print(f"measuring {key}", file=sys.stderr, flush=True)
            results[key] = timed(answers, samples, budget)
        return results


def diagnose(procs: Processes, workdir: Path) -> None:
    """On a failure with the stack up (one shot on a lent GPU machine): what ``inferq get``
    says of the API (its status, a replica's error) and the end of ``inferq up``'s log."""
    try:
        print(run_command([sys.executable, "-m", "inferq", "get", API],
                          inferq_env(workdir / "home-1")), file=sys.stderr)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"inferq get {API}: {exc}", file=sys.stderr)
    print(f"inferq up's log ends:\n{procs.log('inferq-up-1')}", file=sys.stderr)


# -- the report --------------------------------------------------------------------------------


def rate(result: dict[str, Any]) -> float:
    return result["samples"] / result["seconds"] if result["seconds"] else 0.0


def differing(results: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Per served path, how many answers differ from its in-process path's (common prefix)."""
    counts = {}
    for served, local in SAME_ANSWERS.items():
        if served in results and local in results:
            pairs = zip(results[served]["answers"], results[local]["answers"], strict=True)
            counts[served] = sum(a != b for a, b in pairs)
    return counts


def report(info: dict[str, Any], results: dict[str, dict[str, Any]], wrong: dict[str, int],
           args: argparse.Namespace, gpu: int) -> dict[str, Any]:
    batch = args.batch_size
    print(f"\nMLP 4 -> 512 -> 512 -> 3 on {info['device']} ({info['device_name']}), torch "
          f"{info['torch']}; {os.cpu_count()} CPUs; inferq up, 1 replica, gpu: {gpu}; "
          f"{args.samples} distinct samples; each row passes over them until "
          f"{args.min_seconds:g} s (at most {args.seconds:g} s); map window {args.window}.\n")
    print("| path | samples | seconds | samples/s |\n|---|---:|---:|---:|")
    for key, label in PATHS.items():
        if key in results:
            r = results[key]
            print(f"| {label.format(batch=batch)} | {r['samples']} | {r['seconds']:.2f} "
                  f"| {rate(r):,.0f} |")
    ratio = rate(results["map_batch"]) / rate(results["local_batch"])
    on_gpu = info["device"].startswith("cuda")
    verdict = ("met" if ratio >= TARGET else "missed") if on_gpu else "applies on a GPU"
    print("\n| ratio | measured | target |\n|---|---:|---|")
    print(f"| `Client.map` batch_size={batch} / in-process `predict_batch` loop "
          f"| {ratio:.1%} | >= {TARGET:.0%} on a GPU: {verdict} |")
    print(f"| `Client.map` batch_size={batch} / batch_size=1 "
          f"| {rate(results['map_batch']) / rate(results['map_1']):.1f}x | |")
    print(f"| in-process `predict_batch` / `predict` loop "
          f"| {rate(results['local_batch']) / rate(results['local_predict']):.1f}x | |")
    for key, count in wrong.items():
        if count:
            print(f"\n{PATHS[key].format(batch=batch)}: {count} answers differ from the "
                  f"in-process ones")
    return {"info": info, "gpu": gpu, "samples": args.samples,
            "min_seconds": args.min_seconds, "seconds": args.seconds,
            "batch_size": batch, "window": args.window, "cpus": os.cpu_count(),
            "samples_per_second": {k: rate(r) for k, r in results.items()},
            "counts": {k: r["samples"] for k, r in results.items()},
            "ratio_map_batch_to_local_batch": ratio, "target": TARGET,
            "target_met": ratio >= TARGET if on_gpu else None, "differing": wrong}


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="where the model runs (default auto: cuda if torch sees one)")
    parser.add_argument("--samples", type=int, default=None,
                        help="distinct samples, rounded down to whole batches (default 5120; "
                             "--quick 1024)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="each measurement repeats its pass over the samples until this "
                             "long (default 3; --quick 1)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="each measurement stops after this long, even within a pass "
                             "(default 20; --quick 5)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: fewer, shorter")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="samples per predict_batch call and per map message (default 64)")
    parser.add_argument("--window", type=int, default=512,
                        help="Client.map's samples in flight (default 512)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--in-process", type=Path, metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process:
        return run_in_process(args.in_process)

    args.samples = args.samples or (1024 if args.quick else 5120)
    args.min_seconds = args.min_seconds if args.min_seconds is not None else (
        1.0 if args.quick else 3.0)
    args.seconds = args.seconds or (5.0 if args.quick else 20.0)
    if not 1 <= args.batch_size <= 1024 or args.window < args.batch_size:
        parser.error("--batch-size must be 1 to 1024 and --window at least --batch-size")
    if not args.batch_size <= args.samples <= 1_000_000 or args.seconds <= 0:
        parser.error("--samples must be --batch-size to 1,000,000, --seconds above 0")
    args.samples -= args.samples % args.batch_size  # whole batches: see measure_served
    budget = Budget(args.batch_size, min(args.min_seconds, args.seconds), args.seconds)

    signal.signal(signal.SIGTERM, _terminate)
    samples = make_samples(args.samples)
    with tempfile.TemporaryDirectory(prefix="inferq-gpu-batching-") as folder:
        workdir = Path(folder)
        try:
            device = resolve_device(args.device)
            gpu = 1 if device == "cuda" else 0
            project = workdir / "project"
            project.mkdir()
            (project / "cortex.yaml").write_text(CORTEX_YAML.format(gpu=gpu))
            (project / "predictor.py").write_text(PREDICTOR.format(device=device, seed=SEED))
            (workdir / "job.json").write_text(json.dumps({
                "project": str(project), "samples": samples, "budget": asdict(budget)}))

            with Processes(workdir) as procs:
                print(f"in-process loops on {device}: measuring", file=sys.stderr, flush=True)
                local = measure_in_process(procs, workdir, budget)
            results = dict(local["results"])
            expected = results["local_predict"]["answers"][0]
            with Processes(workdir) as procs:
                print(f"inferq up (gpu: {gpu}): starting", file=sys.stderr, flush=True)
                try:
                    served = start_inferq(procs, project, 1, api=API, endpoint=ENDPOINT,
                                          sample=samples[0], expected=expected)
                    results.update(measure_served(served.home, samples, budget,
                                                  args.window))
                except (InferqError, RuntimeError, TimeoutError):
                    diagnose(procs, workdir)
                    raise
        except KeyboardInterrupt:
            print("interrupted; everything it started is stopped", file=sys.stderr)
            return 130
        except (InferqError, RuntimeError, TimeoutError) as exc:
            print(f"failed: {type(exc).__name__}: {exc}\neverything it started is stopped",
                  file=sys.stderr)
            return 1
    wrong = differing(results)
    figures = report(local["info"], results, wrong, args, gpu)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if any(wrong.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
