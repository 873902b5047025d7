"""A sample's cost in a batch message: Cortex v0.11's PyTorch iris classifier, one replica.

Cortex v0.11 shipped a PyTorch iris example: a small fully connected net (4 -> 100 -> 100 ->
3, ReLU, softmax) trained with SGD (lr 0.01, 1,000 full-batch epochs) on a fifth of scikit-learn's
iris set (``train_test_split(test_size=0.8, random_state=42)``), and a predictor with no
``predict_batch`` whose ``predict`` turns one sample into a 1x4 tensor, runs the net and
names the class. This script trains the same net the same way (torch, CPU), writes a project
with such a predictor, and measures, on one replica:

- **in-process**: ``predict`` called in a loop over the samples, in this process;
- **Client.map**: the same samples through ``inferq up`` (embedded Redis, 1 replica), 64 to
  a message (``--batch-size``), answers checked against the in-process ones.

Target (issue 23): map >= 0.6x the in-process loop. For each, the CPU microseconds every
process spent per sample: the replica's share above its ``predict`` is what a sample costs
inferq (decode, tracking, reply, bookkeeping).

    .venv/bin/python bench/torch_iris.py [--samples 5000] [--seconds 6]

Needs torch (``pip install torch==2.13.0`` takes a local CPU build here) and scikit-learn
(in the ``test`` extra). Every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from batching import CpuMeter, Measured, best_rate, broker_url, cpu_line, make_samples, us
from harness import load_predictor
from peers import Processes, start_inferq

from inferq import Client

API = "iris-torch"
TARGET = 0.6
LABELS = ["setosa", "versicolor", "virginica"]

CORTEX_YAML = f"""\
- kind: deployment
  name: torch
- kind: api
  name: {API}
  predictor:
    path: predictor.py
    model: model.pt
  compute:
    min_replicas: 1
    max_replicas: 1
"""

# The Cortex v0.11 way: one sample in, one 1x4 tensor through the net, the class's name out.
PREDICTOR = f'''\
import torch
from torch import nn

LABELS = {LABELS!r}
model = None


class IrisNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 100)
        self.fc2 = nn.Linear(100, 100)
        self.fc3 = nn.Linear(100, 3)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return torch.softmax(self.fc3(x), dim=1)


def init(model_path, metadata):
    global model
    model = IrisNet()
    model.load_state_dict(torch.load(model_path, weights_only=True))
    model.eval()


def predict(sample, metadata):
    features = torch.FloatTensor([[sample["sepal_length"], sample["sepal_width"],
                                   sample["petal_length"], sample["petal_width"]]])
    output = model(features)
    return LABELS[int(torch.argmax(output, dim=1))]
'''


def train(project: Path) -> float:
    """Train the net as the example did; save its weights in ``project``; return the
    accuracy on the held-out four fifths."""
    import torch
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    predictor = load_predictor(project / "predictor.py", init=False)
    iris = load_iris()
    x_train, x_test, y_train, y_test = train_test_split(iris.data, iris.target, test_size=0.8,
                                                        random_state=42)
    torch.manual_seed(0)
    net = predictor.IrisNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    loss = torch.nn.CrossEntropyLoss()
    features, labels = torch.FloatTensor(x_train), torch.LongTensor(y_train)
    for _ in range(1000):
        optimizer.zero_grad()
        loss(net(features), labels).backward()  # as the example: softmax, then the loss
        optimizer.step()
    torch.save(net.state_dict(), project / "model.pt")
    with torch.no_grad():
        guessed = torch.argmax(net(torch.FloatTensor(x_test)), dim=1)
    return float((guessed == torch.LongTensor(y_test)).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="least time each way is measured for")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    samples = make_samples(args.samples)
    with tempfile.TemporaryDirectory(prefix="inferq-torch-iris-") as folder:
        workdir = Path(folder)
        project = workdir / "project"
        project.mkdir()
        (project / "predictor.py").write_text(PREDICTOR)
        (project / "cortex.yaml").write_text(CORTEX_YAML)
        accuracy = train(project)
        predictor = load_predictor(project / "predictor.py", str(project / "model.pt"))
        answers = [predictor.predict(sample, {}) for sample in samples]
        loop = best_rate(len(samples), lambda: [predictor.predict(s, {}) for s in samples],
                         args.seconds)
        mapped, wrong = Measured(), 0
        with Processes(workdir) as procs:
            served = start_inferq(procs, project, 1, api=API, endpoint=f"/torch/{API}",
                                  sample=samples[0], expected=answers[0])
            meter = CpuMeter(procs)
            with Client(broker_url(served.home)) as client:
                list(client.map(API, samples[:1000], batch_size=args.batch_size))  # warm
                began = time.perf_counter()
                while time.perf_counter() - began < args.seconds or mapped.samples == 0:
                    got, took, cpu = meter.measure(lambda: list(
                        client.map(API, samples, batch_size=args.batch_size)))
                    wrong += sum(a != b for a, b in zip(got, answers, strict=True))
                    mapped.add(len(samples), took, cpu)

    ratio = mapped.best / loop
    print(f"PyTorch iris (Cortex v0.11's example, retrained: {accuracy:.0%} on the held-out "
          f"samples), {args.samples} samples, one replica, {args.batch_size} per message\n")
    print("| way | samples/s | per sample |")
    print("|---|---:|---:|")
    print(f"| in-process `predict` loop | {loop:,.0f} | {us(1e6 / loop)} |")
    print(f"| `Client.map` | {mapped.best:,.0f} | {us(mapped.wall_per_sample)} wall |")
    print(f"\nCPU per sample of Client.map, by process: "
          f"{cpu_line(mapped.cpu_per_sample, mapped.wall_per_sample)}")
    verdict = "met" if ratio >= TARGET else "missed"
    print(f"\nmap / in-process: {ratio:.2f}x (target >= {TARGET}x: {verdict})")
    if wrong:
        print(f"WRONG: {wrong} answers differ from the in-process ones")
    return 1 if wrong or ratio < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
