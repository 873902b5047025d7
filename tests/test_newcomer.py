"""A newcomer's first hour, as the README leads them: stacks that do not collide, APIs that say
at once why they cannot serve, one-line errors, examples that work when copied."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import requests
from helpers import ROOT, copy_example, inferq_command, post, write_project

from inferq import ApiUnavailable, Client, PredictionError
from inferq.cli.tables import render_table
from inferq.deploy import deploy
from inferq.errors import BundleTooLarge, ConfigError
from inferq.processes import wait_until
from inferq.stack import free_port

SAMPLE = {"sepal_length": 5.2, "sepal_width": 3.6, "petal_length": 1.4, "petal_width": 0.3}


def inferq(*args: str, env: dict | None = None, cwd=None, timeout: float = 60):
    return subprocess.run(inferq_command(*args), env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The command failed with one line on stderr and no traceback; that line."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


# -- 1. a second stack on a port that is taken -------------------------------------------------


def test_a_second_stack_on_a_taken_port_is_refused_at_once_naming_the_first(run_up, up_env,
                                                                              tmp_path):
    port = free_port()
    first = run_up("--port", str(port))
    first.wait_for("inferq is up")
    other_home = tmp_path / "another-terminal"
    started = time.monotonic()
    second = inferq("up", str(copy_example("iris", tmp_path)), "--port", str(port),
                    env={**up_env, "INFERQ_HOME": str(other_home)})
    line = one_line_error(second)
    assert time.monotonic() - started < 15
    assert f"port {port} is taken by the inferq stack of INFERQ_HOME={up_env['INFERQ_HOME']}" \
        in line
    suggested = int(re.search(r"inferq up --port (\d+)", line).group(1))
    assert suggested != port
    # Nothing of the second stack ran: no Redis of its own, no stack file, no curl line.
    assert not (other_home / "redis").exists() and not (other_home / "stack.json").exists()
    assert "curl" not in second.stdout
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200


def test_a_port_another_program_listens_on_is_refused_in_one_line(run_up, up_env):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        line = one_line_error(inferq("up", "--port", str(port), env=up_env))
    assert f"port {port} on 127.0.0.1 is taken by another program" in line
    assert "inferq up --port" in line


def test_inferq_is_up_means_the_gateway_answers_and_a_restart_lists_the_endpoints(
        run_up, up_env, tmp_path):
    project = copy_example("iris", tmp_path)
    port = free_port()
    first = run_up(str(project), "--port", str(port))
    first.wait_for("inferq is up")
    # Sent the moment the line shows: the gateway takes it (and it waits for its replica).
    answer = requests.post(f"http://127.0.0.1:{port}/iris/classifier", json=SAMPLE, timeout=90)
    assert answer.status_code == 200 and answer.text == '"setosa"\n'  # a line of its own
    assert first.interrupt() == 0

    second = run_up("--port", str(port))  # no folder: the stack kept its deployment
    second.wait_for("inferq is up")
    assert f"http://127.0.0.1:{port}/iris/classifier" in second.output()
    assert f"curl http://127.0.0.1:{port}/iris/classifier -X POST" in second.output()


# -- 2. an API that cannot serve answers 503 at once -------------------------------------------

BROKEN = """
def init(model_path, metadata):
    raise RuntimeError("the model is broken on purpose")


def predict(sample, metadata):
    return sample
"""


def _broken_and_gpu(tmp_path):
    return write_project(tmp_path / "shop", """\
        - kind: deployment
          name: shop
        - kind: api
          name: broken
          predictor: {path: predictor.py}
        - kind: api
          name: gpu
          predictor: {path: echo.py}
          compute: {gpu: 1}
        - kind: api
          name: idle
          predictor: {path: echo.py}
          compute: {min_replicas: 0}
        """, {"predictor.py": BROKEN, "echo.py": "def predict(sample, metadata):\n"
                                                 "    return sample\n"})


def test_an_api_that_cannot_serve_answers_503_at_once_with_its_status(registry, scalers,
                                                                      gateway, tmp_path):
    deploy(_broken_and_gpu(tmp_path), registry)
    scalers.start(gpus=0)
    for api, status in (("broken", "error"), ("gpu", "compute unavailable")):
        wait_until(lambda api=api, status=status: (s := registry.replicas.status(api))
                   and s.status == status, 60, what=f"{api} is {status}")
        started = time.monotonic()
        answer = post(f"{gateway.url}/shop/{api}", {"n": 1}, timeout=30)
        assert time.monotonic() - started < 1.0
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "5"
        body = answer.json()
        assert body["status"] == status and body["api"] == api
        assert f'api "{api}" cannot serve now: its status is {status}' in body["error"]
    assert "the model is broken on purpose" in body_of(gateway, "broken")["reason"]
    assert "needs gpu 1, host has 0" in body_of(gateway, "gpu")["reason"]
    # Async requests are still queued, and an API scaled to zero still waits for its replica.
    assert post(f"{gateway.url}/shop/broken?async=true", {"n": 2}).status_code == 202
    woken = post(f"{gateway.url}/shop/idle", {"n": 3}, timeout=90)
    assert woken.status_code == 200 and woken.json() == {"n": 3}
    # From Python, predict says the same at once.
    with Client(registry.url) as client, pytest.raises(ApiUnavailable) as caught:
        client.predict("broken", {"n": 4})
    assert caught.value.status == "error"


def body_of(gateway, api: str) -> dict:
    return post(f"{gateway.url}/shop/{api}", {"n": 0}).json()


def test_an_api_with_no_replica_and_no_scaler_answers_503(registry, gateway, tmp_path):
    deploy(_broken_and_gpu(tmp_path), registry)
    answer = post(f"{gateway.url}/shop/idle", {"n": 1})
    assert answer.status_code == 503
    assert "no scaler runs to start one" in answer.json()["error"]


# -- 3. one-line errors -------------------------------------------------------------------------


def test_logs_and_get_watch_end_in_one_line_when_the_stack_stops(run_up, up_env, tmp_path):
    up = run_up(str(copy_example("iris", tmp_path)), "--port", str(free_port()))
    up.wait_for("inferq is up")
    port = int(re.search(r"127\.0\.0\.1:(\d+)/iris", up.output()).group(1))
    answer = requests.post(f"http://127.0.0.1:{port}/iris/classifier", json=SAMPLE, timeout=90)
    assert answer.status_code == 200  # the replica is live: its log has lines
    outputs = [tmp_path / "logs.out", tmp_path / "watch.out"]
    followers = []
    for args, output in zip((("logs", "classifier"), ("get", "--watch")), outputs, strict=True):
        with open(output, "w") as handle:
            followers.append(subprocess.Popen(inferq_command(*args), env=up_env, stdout=handle,
                                              stderr=subprocess.PIPE, text=True))
    try:
        for output in outputs:  # each is connected once it printed something
            wait_until(lambda o=output: o.stat().st_size > 0, 30, what=f"{output.name} printed")
        assert up.interrupt() == 0
        for follower in followers:
            _, stderr = follower.communicate(timeout=60)
            done = subprocess.CompletedProcess(follower.args, follower.returncode, "", stderr)
            assert "the broker stopped answering" in one_line_error(done)
    finally:
        for follower in followers:
            if follower.poll() is None:
                follower.kill()
                follower.wait()


def test_predict_with_a_sample_file_that_does_not_exist_is_one_line(registry, tmp_path):
    deploy(copy_example("iris", tmp_path), registry)
    line = one_line_error(inferq("predict", "classifier", str(tmp_path / "nope.json")))
    assert line == f"error: {tmp_path / 'nope.json'}: cannot read it (No such file or directory)"


def test_debug_shows_the_traceback(tmp_path):
    done = inferq("--debug", "deploy", "--dry-run", str(tmp_path / "nowhere"))
    assert done.returncode == 1 and "Traceback" in done.stderr


def test_a_bare_delete_outside_a_project_says_what_to_name(tmp_path, redis_url):
    line = one_line_error(inferq("delete", cwd=tmp_path))
    assert "name the deployment to delete" in line and "nothing was deployed" not in line


# -- 4. the Plain Celery example works as copied ------------------------------------------------


def _readme_blocks(section: str, language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(section)
    end = text.index("\n#", start + len(section))
    return re.findall(rf"```{language}\n(.*?)```", text[start:end], flags=re.S)


def test_the_plain_celery_example_of_the_readme_works_as_copied(run_up, up_env, tmp_path):
    up = run_up(str(copy_example("iris", tmp_path)), "--port", str(free_port()))
    up.wait_for("inferq is up")
    (export,) = _readme_blocks("### Plain Celery", "bash")
    assert export.strip() == "export INFERQ_BROKER_URL=$(inferq broker-url)"
    bin_dir = os.path.dirname(sys.executable)
    script = tmp_path / "plain_celery.py"
    script.write_text("\n".join(_readme_blocks("### Plain Celery", "python")))
    shell = f"{export.strip()}\n{sys.executable} {script}\n"
    done = subprocess.run(["bash", "-c", shell], env={**up_env, "PATH": f"{bin_dir}:"
                                                       f"{up_env.get('PATH', '')}"},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    single, batch = done.stdout.strip().splitlines()
    assert single == "setosa"
    assert batch.startswith("[{'result': 'setosa'}, {'error': ") and "'index': 1}]" in batch


# -- 5. deploy and --dry-run check the same, syntax included -------------------------------------


def test_a_syntax_error_is_refused_by_dry_run_and_deploy_naming_file_and_line(tmp_path,
                                                                               registry):
    project = copy_example("iris", tmp_path)
    source = (project / "predictor.py").read_text().splitlines()
    broken = len(source) + 2
    (project / "predictor.py").write_text("\n".join(source) + "\n\ndef oops(:\n    pass\n")
    done = inferq("deploy", "--dry-run", str(project))
    assert done.returncode == 1
    assert f"{project / 'predictor.py'}: line {broken}, column 10: SyntaxError: " \
           "invalid syntax" in done.stderr
    assert "error: 1 problem; nothing was deployed" in done.stderr
    with pytest.raises(ConfigError, match=f"predictor.py: line {broken}"):
        deploy(project, registry)
    assert registry.deployments.apis() == []


def test_dry_run_applies_the_bundle_limits_of_deploy(tmp_path, monkeypatch):
    project = copy_example("iris", tmp_path)
    for n in range(20):
        (project / f"data-{n}.txt").write_text("x")
    done = inferq("deploy", "--dry-run", str(project),
                  env={**os.environ, "INFERQ_MAX_BUNDLE_FILES": "10"})
    assert done.returncode == 1
    assert "more than 10 files, the bundle limit" in done.stderr
    monkeypatch.setattr("inferq.bundle.MAX_BUNDLE_FILES", 10)
    with pytest.raises(BundleTooLarge):
        deploy(project, None)  # refused before the registry is touched


def test_dry_run_says_a_satisfied_requirements_txt_installs_nothing():
    done = inferq("deploy", "--dry-run", str(ROOT / "configs" / "examples" / "iris"))
    assert done.returncode == 0, done.stderr
    assert "# requirements.txt: nothing to install, inferq's own packages satisfy it" \
        in done.stdout


# -- 6, 7. the project's folder: working directory, and the name in tracebacks ------------------

RELATIVE = """
import json

weights = None


def init(model_path, metadata):
    global weights
    with open("weights.json") as handle:  # relative to the project, as the README promises
        weights = json.load(handle)


def predict(sample, metadata):
    if sample.get("fail"):
        return 1 / 0
    return weights["scale"] * sample["x"]
"""


def test_a_replica_works_in_its_project_folder_and_names_its_files_as_the_project_does(
        registry, scalers, tmp_path):
    project = write_project(tmp_path / "rel", """\
        - kind: deployment
          name: rel
        - kind: api
          name: rel
          predictor: {path: predictor.py}
        """, {"predictor.py": RELATIVE, "weights.json": '{"scale": 3}'})
    deploy(project, registry)
    scalers.start()
    wait_until(lambda: (s := registry.replicas.status("rel")) and s.status == "live", 60,
               what="rel live")
    with Client(registry.url) as client:
        assert client.predict("rel", {"x": 2}) == 6
        with pytest.raises(PredictionError, match="division by zero"):
            client.predict("rel", {"fail": True})
    logs = wait_until(lambda: "ZeroDivisionError" in (text := _logs("rel")) and text, 30,
                      what="the traceback in the logs")
    assert 'File "predictor.py", line 15, in predict' in logs
    assert "cache/bundles" not in logs


def test_an_init_error_names_the_project_file_not_the_bundle_cache(registry, scalers,
                                                                   tmp_path):
    deploy(_broken_and_gpu(tmp_path), registry)
    scalers.start()
    state = wait_until(lambda: (s := registry.replicas.status("broken"))
                       and s.status == "error" and s, 60, what="broken is error")
    assert 'File "predictor.py", line 3, in init' in state.reason
    assert "cache/bundles" not in state.reason


def _logs(api: str) -> str:
    return inferq("logs", api, "--no-follow", "--tail", "200").stdout


# -- 8. counts that agree and say what they count -----------------------------------------------


def test_get_counts_predictions_of_every_way_and_a_delete_resets_the_counts(
        registry, scalers, gateway, tmp_path):
    project = copy_example("iris", tmp_path)
    deploy(project, registry)
    scalers.start()
    with Client(registry.url) as client:
        assert client.predict("classifier", SAMPLE) == "setosa"
        assert list(client.map("classifier", [SAMPLE] * 9)) == ["setosa"] * 9
    assert post(f"{gateway.url}/iris/classifier", SAMPLE).status_code == 200
    wait_until(lambda: registry.telemetry.request_stats("classifier").ok == 1, 10,
               what="the gateway's count")
    row = json.loads(inferq("get", "classifier", "--output", "json").stdout)[0]
    assert (row["predictions"], row["prediction_errors"], row["2xx"]) == (11, 0, 1)
    shown = inferq("get", "classifier").stdout
    assert "predictions: 11 by every way (HTTP, Python, plain Celery, jobs), 0 failed" in shown

    registry.deployments.delete("iris")
    deploy(project, registry)
    row = json.loads(inferq("get", "classifier", "--output", "json").stdout)[0]
    assert (row["predictions"], row["2xx"], row["avg_latency"]) == (0, 0, None)


def test_wait_exits_1_for_a_job_completed_with_failures(registry, scalers, tmp_path):
    deploy(copy_example("iris", tmp_path), registry)
    scalers.start()
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps(SAMPLE) + "\nnot json\n")
    done = inferq("batch", "submit", "classifier", str(samples), "--wait", timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "completed with failures" in done.stdout
    assert (tmp_path / "samples.predictions.jsonl").is_file()
    assert (tmp_path / "samples.predictions.failed.jsonl").is_file()  # as the README names it


# -- 9. the small ones --------------------------------------------------------------------------


def test_the_get_table_fits_an_80_column_terminal():
    row = {"api": "text-classifier", "status": "compute unavailable", "up_to_date": 0,
           "requested": 2, "last_update": time.time() - 90, "avg_latency": 0.0123,
           "2xx": 12345, "4xx": 12, "5xx": 3, "hosts": {"gpu-host-1": 1}}
    assert max(len(line) for line in render_table([row]).splitlines()) > 80  # all columns
    fitted = render_table([row], width=80)
    assert max(len(line) for line in fitted.splitlines()) <= 80
    assert "hosts" not in fitted and "status" in fitted and "5XX" in fitted


def test_a_replica_start_prints_no_warning_about_root(registry, replicas, tmp_path):
    deploy(copy_example("iris", tmp_path), registry)
    process = replicas.start("classifier")
    log = replicas.log(process)
    assert "root" not in log.lower(), log  # (the scaler says it once, for all its replicas)
