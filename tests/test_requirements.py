"""requirements.txt: real installs (uv) from wheel folders the tests make, no network.

The tests point the installer at their wheels with uv's own environment variables
(``UV_FIND_LINKS``, ``UV_OFFLINE``), which replicas pass through to it, or with option lines
in requirements.txt itself (``--no-index``, ``--find-links URL``).
"""

from __future__ import annotations

import http.server
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from helpers import inferq_command, write_project
from wheels import make_testpkg

from inferq import Client
from inferq.deploy import deploy
from inferq.processes import wait_until
from inferq.registry import Failure, FailureKind, ReplicaRecord, ReplicaStatus
from inferq.scaler.status import judge
from inferq.workers import requirements

PREDICTOR = """
import inferq_testpkg

def predict(sample, metadata):
    return {"testpkg": inferq_testpkg.VERSION, "file": inferq_testpkg.__file__,
            "tag": metadata.get("tag")}
"""


def project(folder: Path, deployment: str, api: str, requirements_txt: str,
            tag: str = "v1") -> Path:
    return write_project(folder, f"""
        - kind: deployment
          name: {deployment}
        - kind: api
          name: {api}
          predictor:
            path: predictor.py
            metadata: {{tag: {tag}}}
          compute:
            min_replicas: 1
        """, {"predictor.py": PREDICTOR, "requirements.txt": requirements_txt})


@pytest.fixture
def wheelhouse(tmp_path, monkeypatch):
    """inferq-testpkg 1.0 and 2.0 in a folder the installer finds, with no index at all."""
    folder = tmp_path / "wheels"
    make_testpkg(folder, "1.0")
    make_testpkg(folder, "2.0")
    monkeypatch.setenv("UV_FIND_LINKS", str(folder))
    monkeypatch.setenv("UV_OFFLINE", "1")
    return folder


@pytest.fixture
def client(redis_url):
    with Client(redis_url) as c:
        yield c


def environments(home: Path) -> list[Path]:
    root = home / "cache" / "requirements"
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def installs(log: str) -> int:
    return log.count("installing requirements.txt")


def wait_status(registry, api: str, status: str, timeout: float = 60) -> dict:
    return wait_until(
        lambda: (s := registry.replicas.status(api)) and s.status == status and s,
        timeout, what=f'{api} is "{status}" (now {registry.replicas.status(api)})',
    )


# -- without processes ------------------------------------------------------------------------


def test_listed_drops_comments_and_blanks(tmp_path):
    (tmp_path / "requirements.txt").write_text(
        "# models\nnumpy>=1.26  # arrays\n\n--find-links ./wheels\ninferq-testpkg==1.0\n")
    assert requirements.listed(tmp_path) == [
        "numpy>=1.26", "--find-links ./wheels", "inferq-testpkg==1.0"]
    assert requirements.listed(tmp_path / "nowhere") == []


def test_requirements_inferq_already_satisfies_need_no_install(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERQ_HOME", str(tmp_path / "home"))
    (tmp_path / "requirements.txt").write_text("numpy\nredis>=5\nsix; python_version < '3'\n")
    assert requirements.prepare(tmp_path, api="iris") is None  # no index was needed
    assert not (tmp_path / "home" / "cache" / "requirements").exists()
    assert not requirements.satisfied(["numpy<1"])
    assert not requirements.satisfied(["inferq-testpkg"])
    assert not requirements.satisfied(["--index-url https://example.org/simple", "numpy"])


def test_an_environment_is_installed_once_and_layered_over_inferqs(tmp_path, monkeypatch,
                                                                 wheelhouse):
    monkeypatch.setenv("INFERQ_HOME", str(tmp_path / "home"))
    (tmp_path / "requirements.txt").write_text("inferq-testpkg==2.0\n")
    calls = []
    folder = requirements.prepare(tmp_path, api="x", on_install=lambda: calls.append(1))
    assert (folder / "inferq_testpkg" / "__init__.py").read_text() == 'VERSION = "2.0"\n'
    assert calls == [1]
    assert requirements.prepare(tmp_path, api="x", on_install=lambda: calls.append(1)) == folder
    assert calls == [1]  # the second time: nothing installed, nothing announced
    assert importlib.util.find_spec("inferq_testpkg") is None  # inferq's environment untouched


def test_concurrent_installs_on_one_host_install_once(tmp_path, wheelhouse):
    (tmp_path / "requirements.txt").write_text("inferq-testpkg==1.0\n")
    script = (
        "import logging, sys; from pathlib import Path;"
        "logging.basicConfig(level='INFO', stream=sys.stdout);"
        "from inferq.workers import requirements;"
        f"print('folder', requirements.prepare(Path({str(tmp_path)!r}), api='x'))"
    )
    env = {**os.environ, "INFERQ_HOME": str(tmp_path / "home")}
    processes = [subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for _ in range(4)]
    outputs = [p.communicate(timeout=60)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert sum(installs(out) for out in outputs) == 1, outputs
    assert len({line for out in outputs for line in out.splitlines()
                if line.startswith("folder ")}) == 1
    assert len(environments(tmp_path / "home")) == 1


def test_an_installer_failure_keeps_its_last_lines(tmp_path, monkeypatch, wheelhouse):
    monkeypatch.setenv("INFERQ_HOME", str(tmp_path / "home"))
    (tmp_path / "requirements.txt").write_text("inferq-testpkg==3.0\n")
    with pytest.raises(requirements.RequirementsError, match=r"inferq-testpkg==3\.0") as caught:
        requirements.prepare(tmp_path, api="x")
    assert caught.value.kind == "requirements"
    assert str(caught.value).startswith('api "x": requirements.txt could not be installed')
    assert environments(tmp_path / "home") == []  # nothing that looks installed


def test_a_requirement_against_a_package_the_replica_runs_on_fails_and_says_why(
        tmp_path, monkeypatch, wheelhouse):
    import redis  # loaded here, as in every replica: it cannot change under a predictor

    monkeypatch.setenv("INFERQ_HOME", str(tmp_path / "home"))
    (tmp_path / "requirements.txt").write_text("redis<5\n")
    with pytest.raises(requirements.RequirementsError) as caught:
        requirements.prepare(tmp_path, api="x")
    assert f"the replica itself runs on redis=={redis.__version__}" in str(caught.value)


def test_judge_says_installing_and_error_requirements():
    creating = ReplicaRecord("h-1", ReplicaStatus.CREATING, version="v1",
                             detail=requirements.INSTALLING)
    assert judge("v1", 1, None, [creating], []) == ("creating", "installing requirements")
    failure = Failure(FailureKind.REQUIREMENTS, "could not be installed\nno version", 1, "h")
    assert judge("v1", 1, None, [creating], [failure]) == (
        "error (requirements)", "could not be installed\nno version")


def test_dry_run_lists_the_requirements_as_comments(tmp_path, monkeypatch):
    monkeypatch.delenv("INFERQ_BROKER_URL", raising=False)
    monkeypatch.setenv("INFERQ_HOME", str(tmp_path / "nothing-runs-here"))
    folder = project(tmp_path / "p", "shop", "ranker", "inferq-testpkg==1.0  # ours\nnumpy\n")
    done = subprocess.run(inferq_command("deploy", "--dry-run", str(folder)),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-3:] == [
        "# requirements.txt: installed on each replica's host before the predictor is imported",
        "#   inferq-testpkg==1.0",
        "#   numpy",
    ]
    assert yaml.safe_load(done.stdout)[1]["name"] == "ranker"  # still a cortex.yaml


# -- real replicas ----------------------------------------------------------------------------


class GatedWheels(http.server.ThreadingHTTPServer):
    """Serves a wheel folder over HTTP, holding every request until ``open`` is set."""

    def handle_error(self, request, client_address):  # a client that gave up: not news
        pass

    def __init__(self, folder: Path) -> None:
        self.open = threading.Event()
        gate = self.open

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                gate.wait(60)
                super().do_GET()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_predictor_importing_a_package_only_its_requirements_name_is_served(
        registry, scalers, client, tmp_path, monkeypatch, wheelhouse):
    monkeypatch.delenv("UV_OFFLINE")
    monkeypatch.delenv("UV_FIND_LINKS")
    server = GatedWheels(wheelhouse)
    try:
        deploy(project(tmp_path / "p", "shop", "ranker",
                       f"--no-index\n--find-links {server.url}\ninferq-testpkg==1.0\n"), registry)
        scalers.start()
        wait_until(lambda: (s := registry.replicas.status("ranker")) and s.reason
                   == "installing requirements", 60, what="installing requirements")
        assert registry.replicas.status("ranker").status == "creating"
        get = subprocess.run(inferq_command("get", "ranker"), capture_output=True, text=True,
                             timeout=30, check=False)
        assert "creating (installing requirements)" in get.stdout, get.stdout + get.stderr
        server.open.set()
        wait_status(registry, "ranker", "live")
    finally:
        server.open.set()
        server.shutdown()
    prediction = client.predict("ranker", {}, timeout=30)
    assert prediction["testpkg"] == "1.0"
    home = Path(os.environ["INFERQ_HOME"])
    assert prediction["file"].startswith(str(home / "cache" / "requirements"))


def test_two_projects_needing_conflicting_versions_run_side_by_side_on_one_host(
        registry, replicas, client, tmp_path, wheelhouse):
    deploy(project(tmp_path / "a", "old", "legacy", "inferq-testpkg==1.0\n"), registry)
    deploy(project(tmp_path / "b", "new", "modern", "inferq-testpkg==2.0\n"), registry)
    replicas.start("legacy")
    replicas.start("modern")
    assert client.predict("legacy", {}, timeout=30)["testpkg"] == "1.0"
    assert client.predict("modern", {}, timeout=30)["testpkg"] == "2.0"
    assert len(environments(Path(os.environ["INFERQ_HOME"]))) == 2


def test_replicas_and_redeploys_with_an_unchanged_file_install_nothing(
        registry, replicas, client, tmp_path, wheelhouse):
    folder = project(tmp_path / "p", "shop", "ranker", "inferq-testpkg==2.0\n")
    deploy(folder, registry)
    first = replicas.start("ranker", wait_live=False)
    second = replicas.start("ranker", wait_live=False)
    replicas.wait_live("ranker", first)
    replicas.wait_live("ranker", second)
    assert installs(replicas.log(first)) + installs(replicas.log(second)) == 1
    # A new version of the project (another predictor setting), the same requirements.txt:
    project(folder, "shop", "ranker", "inferq-testpkg==2.0\n", tag="v2")
    _, result = deploy(folder, registry)
    assert result.changed
    third = replicas.start("ranker")
    assert installs(replicas.log(third)) == 0
    assert "uv:" not in replicas.log(third)
    assert len(environments(Path(os.environ["INFERQ_HOME"]))) == 1
    assert client.predict("ranker", {}, timeout=30)["testpkg"] == "2.0"


def test_an_uninstallable_requirement_is_error_requirements_until_the_file_is_fixed(
        registry, scalers, client, tmp_path, wheelhouse, redis_url):
    folder = project(tmp_path / "p", "shop", "ranker", "inferq-testpkg==3.0\n")
    deploy(folder, registry)
    scalers.start()
    status = wait_status(registry, "ranker", "error (requirements)")
    assert "inferq-testpkg==3.0" in status.reason, status
    env = {**os.environ, "INFERQ_BROKER_URL": redis_url}
    get = subprocess.run(inferq_command("get", "ranker"), capture_output=True, text=True,
                         env=env, timeout=30, check=False)
    assert "error (requirements)" in get.stdout and "inferq-testpkg==3.0" in get.stdout, get.stdout
    wait_until(lambda: any("uv:" in line and "inferq-testpkg==3.0" in line
                           for *_, line in registry.telemetry.last_logs("ranker", 200)),
               10, what="the installer's lines in the API's logs")
    logs = subprocess.run(inferq_command("logs", "ranker", "--no-follow"), capture_output=True,
                          text=True, env=env, timeout=30, check=False)
    assert "inferq-testpkg==3.0" in logs.stdout, logs.stdout + logs.stderr
    # Restarts back off (1 s, 2 s, 4 s ...) and the status keeps its reason meanwhile.
    wait_until(lambda: scalers.log().count("started replica") >= 3, 30, what="3 attempts")
    assert registry.replicas.status("ranker").status == "error (requirements)"
    (folder / "requirements.txt").write_text("inferq-testpkg==2.0\n")
    deploy(folder, registry)
    wait_status(registry, "ranker", "live", timeout=30)
    assert client.predict("ranker", {}, timeout=30)["testpkg"] == "2.0"
