"""`inferq get`, the tracker, `inferq logs` and /metrics, driven by real traffic."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import requests
from helpers import inferq_command, write_project
from prometheus_client.parser import text_string_to_metric_families

from inferq import Client
from inferq.deploy import deploy
from inferq.processes import wait_until
from inferq.registry.telemetry import TRACKER_CLASSES_KEPT

PREDICTOR = """
def predict(sample, metadata):
    if sample.get("fail"):
        raise ValueError("cannot predict that")
    if metadata.get("kind") == "regression":
        return {"price": sample["x"] * 1.5}
    return {"label": sample["label"], "score": 0.5} if "label" in sample else [1, 2]
"""


def project(tmp_path, tracker: str, kind: str):
    return write_project(
        tmp_path / kind,
        f"""
        - kind: deployment
          name: {kind}
        - kind: api
          name: {kind}
          predictor:
            path: predictor.py
            metadata: {{kind: {kind}}}
          tracker: {tracker}
        """,
        {"predictor.py": PREDICTOR},
    )


def inferq(*args: str, gateway=None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if gateway is not None:
        env["INFERQ_GATEWAY_URL"] = gateway.url
    return subprocess.run(inferq_command(*args), capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def live(registry, api):
    return wait_until(lambda: any(r.status == "live" for r in registry.replicas.of(api)), 60,
                      what=f"{api} live")


def test_get_counts_requests_by_class_and_shows_the_class_distribution(
        registry, scalers, gateway, tmp_path):
    deploy(project(tmp_path, "{model_type: classification, key: label}", "classify"), registry)
    scalers.start()
    live(registry, "classify")
    for label in ["cat", "cat", "dog", "cat"]:
        assert gateway.post("/classify/classify", {"label": label}).status_code == 200
    with Client(registry.url) as client:  # predictions made from Python count too
        assert client.predict("classify", {"label": "bird"})["label"] == "bird"
    assert gateway.post("/classify/classify", {"fail": True}).status_code == 500
    bad = requests.post(gateway.url + "/classify/classify", data=b"{not json",
                        headers={"Content-Type": "application/json"}, timeout=10)
    assert bad.status_code == 400
    # An untrackable prediction (a list, no "label") is served and only logged.
    assert gateway.post("/classify/classify", {}).json() == [1, 2]

    def counted():
        rows = json.loads(inferq("get", "--output", "json").stdout)
        return rows[0]["2xx"] == 5 and rows[0]["5xx"] == 1 and rows[0]["4xx"] == 1 and rows[0]

    row = wait_until(counted, 15, what="request counts recorded")
    assert row["avg_latency"] > 0 and row["status"] == "live"

    table = inferq("get").stdout.splitlines()
    header, line = table[0].split(), table[1].split()
    assert header[:2] == ["api", "status"] and "2XX" in header and "5XX" in header
    assert line[0] == "classify" and line[1] == "live"
    assert "ms" in table[1] and " 5 " in table[1]

    detail = inferq("get", "classify", gateway=gateway)
    assert detail.returncode == 0, detail.stderr
    text = detail.stdout
    assert f"endpoint: {gateway.url}/classify/classify" in text
    assert "tracker (classification):" in text
    assert re.search(r"replica host-a-\d+: live \(rss \d+Mi, cpu \d+m\)", text), text
    lines = {line.split()[0]: line.split() for line in text.splitlines()[1:] if line.strip()}
    assert lines["cat"][1:] == ["3", "75.0%"] or lines["cat"][1] == "3"
    assert lines["dog"][1] == "1" and lines["bird"][1] == "1"
    stats = json.loads(inferq("get", "classify", "--output", "json").stdout)[0]["tracker"]
    assert stats == {"classes": {"cat": 3, "bird": 1, "dog": 1}}


LABELLER = """
def predict(sample, metadata):
    return {"label": "x" * sample["size"] if "size" in sample else sample["label"]}
"""


def test_a_free_text_classifier_keeps_100_short_classes_and_a_readable_inferq_get(
        registry, replicas, tmp_path):
    deploy(write_project(tmp_path / "labels", """
    - kind: deployment
      name: labels
    - kind: api
      name: labels
      predictor: {path: predictor.py}
      tracker: {model_type: classification, key: label}
    """, {"predictor.py": LABELLER}), registry)
    replicas.start("labels")
    with Client(registry.url) as client:
        assert len(client.predict("labels", {"size": 20_000_000})["label"]) == 20_000_000
        samples = [{"label": f"class-{n}"} for n in range(150)] + [{"label": "class-7"}] * 5
        assert len(list(client.map("labels", samples))) == 155

    # The 20 MB label is one class, cut to 64 characters; 99 short ones join it and the
    # 51 labels after the first 100 classes are counted together as "other".
    stats = json.loads(inferq("get", "labels", "--output", "json").stdout)[0]["tracker"]
    assert len(stats["classes"]) == TRACKER_CLASSES_KEPT and stats["other"] == 51
    assert stats["classes"]["x" * 63 + "…"] == 1
    assert next(iter(stats["classes"].items())) == ("class-7", 6)  # most frequent first
    assert sum(stats["classes"].values()) + stats["other"] == 156

    shown = inferq("get", "labels")
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout) < 10_000  # it printed all 20 MB
    after = shown.stdout.split("tracker (classification):\n")[1].splitlines()
    tracker = list(itertools.takewhile(lambda line: line.startswith("  "), after))
    assert len(tracker) == 1 + 20 + 2  # header, the top 20, the rest, "other"
    assert max(len(line) for line in tracker) < 80  # not padded to the longest label
    assert tracker[1].split() == ["class-7", "6", "3.8%"]
    assert tracker[-2].split()[-2:] == ["80", "51.3%"] and "(80 more classes)" in tracker[-2]
    assert "(other: past the first 100 classes)" in tracker[-1] and " 51 " in tracker[-1]


def test_replicas_tracking_at_once_never_keep_more_than_100_classes(registry):
    def track(replica: int) -> None:
        for n in range(60):
            registry.telemetry.track_class("busy", f"replica-{replica}-label-{n}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(track, range(8)))
    stats = registry.telemetry.tracker_stats("busy")
    assert len(stats.classes) == TRACKER_CLASSES_KEPT
    assert sum(stats.classes.values()) + stats.other == 8 * 60


def test_regression_tracker_keeps_count_min_max_and_mean(registry, scalers, tmp_path):
    deploy(project(tmp_path, "{model_type: regression, key: price}", "regression"), registry)
    scalers.start()
    live(registry, "regression")
    with Client(registry.url) as client:
        for x in (1, 2, 6):
            client.predict("regression", {"x": x})
    stats = json.loads(inferq("get", "regression", "--output", "json").stdout)[0]["tracker"]
    assert stats == {"count": 3, "min": 1.5, "max": 9.0, "mean": 4.5}
    assert "count 3  min 1.5  max 9  avg 4.5" in inferq("get", "regression").stdout


def test_logs_show_a_debug_requests_sample_and_prediction(registry, scalers, gateway, tmp_path):
    deploy(project(tmp_path, "{model_type: classification, key: label}", "classify"), registry)
    scalers.start()
    live(registry, "classify")
    follower = subprocess.Popen(inferq_command("logs", "classify"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        response = requests.post(gateway.url + "/classify/classify?debug=true",
                                 json={"label": "zebra-42"}, timeout=30)
        assert response.status_code == 200
        seen = []
        wait_until(lambda: _read_until(follower, seen, '"score": 0.5'), 30,
                   what="the debug prediction in `inferq logs`")
    finally:
        follower.terminate()
        follower.wait(10)
    text = "".join(seen)
    assert 'debug: sample: {"label": "zebra-42"}' in text
    assert "debug: prediction:" in text
    assert "[host-a-" in text  # each line names its replica
    history = inferq("logs", "classify", "--no-follow").stdout
    assert "zebra-42" in history


def test_a_20_mb_log_line_is_kept_cut_to_10000_characters(registry, scalers, tmp_path):
    deploy(write_project(tmp_path / "shouter", """
    - kind: deployment
      name: shouter
    - kind: api
      name: shouter
      predictor: {path: predictor.py}
    """, {"predictor.py": """
    def predict(sample, metadata):
        print("y" * sample["shout"], flush=True)
        return "done"
    """}), registry)
    scalers.start()
    live(registry, "shouter")
    with Client(registry.url) as client:
        assert client.predict("shouter", {"shout": 20_000_000}) == "done"

    def shipped():
        text = inferq("logs", "shouter", "--no-follow").stdout
        return "more characters)" in text and text

    text = wait_until(shipped, 30, what="the long line in `inferq logs`")
    assert len(text) < 50_000
    long_line = next(line for line in text.splitlines() if "more characters)" in line)
    assert re.search(r"y{9000,}… \(19,99\d,\d{3} more characters\)$", long_line), long_line[-80:]
    assert len(long_line) < 10_100  # the replica's prefix, 10,000 characters, the marker


WRITERS = """
import logging, sys, threading
from inferq.workers.output import whole_lines
if sys.argv[1] == "whole":
    whole_lines()
logging.basicConfig(format="%(message)s")
done = threading.Event()

def logger():
    n = 0
    while not done.is_set():
        logging.warning("log record %d of another thread", n)
        n += 1

thread = threading.Thread(target=logger)
thread.start()
for _ in range(3):
    print("y" * 2_000_000)
done.set()
thread.join()
"""


def test_a_replicas_long_print_and_its_log_records_never_cut_each_others_lines():
    # The replica's stdout and stderr share one pipe, as they do under the scaler; the
    # reader is slow, as the scaler's is while it ships a long line.
    done = subprocess.run([sys.executable, "-c", WRITERS, "whole"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60, check=True)
    lines = done.stdout.decode().splitlines()
    assert lines.count("y" * 2_000_000) == 3
    others = [line for line in lines if line != "y" * 2_000_000]
    assert others and all(re.fullmatch(r"log record \d+ of another thread", line)
                          for line in others), {line[:60] for line in others}


def test_a_20_mb_init_error_keeps_inferq_get_readable(registry, scalers, tmp_path):
    deploy(write_project(tmp_path / "loud", """
    - kind: deployment
      name: loud
    - kind: api
      name: loud
      predictor: {path: predictor.py}
    """, {"predictor.py": """
    def init(model_path, metadata):
        raise ValueError("z" * 20_000_000)


    def predict(sample, metadata):
        return None
    """}), registry)
    scalers.start()

    def failed():
        rows = json.loads(inferq("get", "loud", "--output", "json").stdout)
        return rows[0]["status"] == "error" and rows[0]["reason"] and rows[0]

    row = wait_until(failed, 60, what="the API in error")
    assert len(json.dumps(row)) < 40_000  # the error is kept as its start and its end
    shown = inferq("get", "loud")
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout) < 10_000
    assert "ValueError: zzzz" in shown.stdout and "more characters)" in shown.stdout
    assert max(len(line) for line in shown.stdout.splitlines()) < 400


def _read_until(process, seen: list, marker: str) -> bool:
    line = process.stdout.readline()
    seen.append(line)
    return marker in line


def test_metrics_are_prometheus_text(registry, scalers, gateway, tmp_path):
    deploy(project(tmp_path, "{model_type: classification, key: label}", "classify"), registry)
    scalers.start()
    live(registry, "classify")
    assert gateway.post("/classify/classify", {"label": "x"}).status_code == 200
    assert gateway.post("/classify/classify", {"fail": 1}).status_code == 500
    text = requests.get(gateway.url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests_total = {
        (s.labels["api"], s.labels["code"]): s.value
        for s in families["inferq_requests"].samples if s.name == "inferq_requests_total"
    }
    assert requests_total[("classify", "2xx")] == 1 and requests_total[("classify", "5xx")] == 1
    assert families["inferq_request_duration_seconds"].type == "histogram"
    assert "inferq_queue_depth" in families
    replicas = {
        s.labels["status"]: s.value for s in families["inferq_replicas"].samples
        if s.labels["api"] == "classify"
    }
    assert replicas["live"] == 1
