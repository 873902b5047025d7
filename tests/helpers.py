"""What the tests share: project folders, commands, real processes and HTTP checks.

Fixtures live in ``conftest.py`` (Redis, replicas, ``inferq up``), ``services.py`` (scalers,
gateways) and ``s3server.py`` (a local S3 server); the helpers they and the tests use live
here, in one module.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import requests

from inferq.processes import pid_alive, spawn, stop, wait_until
from inferq.registry import Registry
from inferq.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "configs" / "examples"
S3_PART_MIN_BYTES = 64 * 1024  # the local S3 server's smallest multipart part (s3server.py)

# Cortex v0.11's ONNX request handler for the iris example, verbatim.
ONNX_IRIS_HANDLER = """
import numpy as np

labels = ["iris-setosa", "iris-versicolor", "iris-virginica"]


def pre_inference(sample, signature, metadata):
    return {
        signature[0].name: [
            sample["sepal_length"],
            sample["sepal_width"],
            sample["petal_length"],
            sample["petal_width"],
        ]
    }


def post_inference(prediction, signature, metadata):
    predicted_class_id = prediction[0][0]
    return labels[predicted_class_id]
"""


def write_project(folder: Path, cortex_yaml: str, files: dict[str, str] | None = None) -> Path:
    """A project folder with ``cortex.yaml`` and the given files (dedented)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cortex.yaml").write_text(textwrap.dedent(cortex_yaml))
    for name, text in (files or {}).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return folder


def copy_example(name: str, into: Path) -> Path:
    target = into / name
    shutil.copytree(EXAMPLES / name, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def inferq_command(*args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "inferq", *args]


class Replicas:
    """Starts real ``inferq worker`` processes and stops them all at teardown."""

    def __init__(self, redis_url: str, registry: Registry, logs: Path) -> None:
        self.redis_url = redis_url
        self.registry = registry
        self.logs = logs
        self.processes: list[subprocess.Popen] = []

    def start(self, api: str, *, wait_live: bool = True, env: dict | None = None,
              timeout: float = 60) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{api}-{len(self.processes)}.log"
        with open(log_path, "wb") as log:  # the replica writes to its own copy of the file
            process = spawn(
                inferq_command("worker", api),
                env={**os.environ, "INFERQ_BROKER_URL": self.redis_url, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process.log_path = log_path
        self.processes.append(process)
        if wait_live:
            self.wait_live(api, process, timeout=timeout)
        return process

    def wait_live(self, api: str, process: subprocess.Popen, timeout: float = 60) -> dict:
        def live():
            if process.poll() is not None:
                raise AssertionError(
                    f"replica exited with {process.returncode}:\n{self.log(process)}"
                )
            for record in self.registry.replicas.of(api):
                if record.id.endswith(f"-{process.pid}") and record.status == "live":
                    return record
            return None

        return wait_until(live, timeout, what=f"replica of {api} live")

    @staticmethod
    def log(process: subprocess.Popen) -> str:
        return process.log_path.read_text(errors="replace")[-5000:]

    def stop_all(self) -> None:
        """SIGTERM every replica at once (a warm shutdown takes seconds), then wait for each;
        SIGKILL what is still running after 15 s."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


class Scalers:
    """Starts scalers (one per declared host) and stops them all at teardown."""

    def __init__(self, redis_url: str, registry: Registry, logs: Path) -> None:
        self.redis_url = redis_url
        self.registry = registry
        self.logs = logs
        self.processes: dict[str, subprocess.Popen] = {}
        self.descendants: set[int] = set()

    def start(self, host: str = "host-a", *, cpu: str | None = None, mem: str | None = None,
              gpus: int | None = 0, wait: bool = True) -> subprocess.Popen:
        """Start the scaler of ``host``; with ``wait``, return once it beats (it may lead)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        args = inferq_command("scaler", "--host-name", host)
        for flag, value in (("--cpu", cpu), ("--mem", mem), ("--gpus", gpus)):
            if value is not None:
                args += [flag, str(value)]
        log_path = self.logs / f"scaler-{host}.log"
        with open(log_path, "ab") as log:
            process = spawn(args, env={**os.environ, "INFERQ_BROKER_URL": self.redis_url},
                            stdout=log, stderr=subprocess.STDOUT)
        process.log_path = log_path
        self.processes[host] = process
        if wait:
            def beats() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"the scaler exited:\n{self.log(host)}")
                return host in self.registry.hosts.all()

            wait_until(beats, 60, what=f"the scaler of {host} beating")
        return process

    def log(self, host: str = "host-a") -> str:
        return self.processes[host].log_path.read_text(errors="replace")

    def kill(self, host: str) -> None:
        """SIGKILL a scaler, as a host that vanishes."""
        process = self.processes.pop(host)
        self._remember_children(process)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self, host: str) -> int:
        process = self.processes.pop(host)
        self._remember_children(process)
        return stop(process, timeout=60)

    def stop_all(self) -> None:
        for host in list(self.processes):
            self.stop(host)
        # Every replica died with its scaler: nothing of ours is left running.
        wait_until(lambda: not any(pid_alive(p) for p in self.descendants), 20,
                   what="replicas gone with their scaler")

    def _remember_children(self, process: subprocess.Popen) -> None:
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        self.descendants.update(child.pid for child in children)


class Gateway:
    """``inferq gateway`` on a free loopback port; its output goes to a log file."""

    def __init__(self, broker_url: str, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        with open(log, "wb") as output:
            self.process = spawn(
                inferq_command("gateway", "--port", str(self.port), *args),
                env={**os.environ, "INFERQ_BROKER_URL": broker_url},
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def wait_answering(self, timeout: float = 30) -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the gateway exited:\n{self.log()}")
            try:
                return requests.get(self.url + "/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(answers, timeout, what="the gateway answering /healthz")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def tree(self) -> list[psutil.Process]:
        """The gateway's processes: uWSGI's master (the process started) and its workers."""
        master = psutil.Process(self.process.pid)
        return [master, *master.children(recursive=True)]

    def rss(self) -> int:
        """Resident memory of the gateway's processes together, in bytes."""
        return sum(process.memory_info().rss for process in self.tree())

    def cpu_seconds(self) -> float:
        """CPU time the gateway's processes used so far (user and system)."""
        return sum(sum(process.cpu_times()[:2]) for process in self.tree())

    def post(self, endpoint: str, sample, timeout: float = 30) -> requests.Response:
        return requests.post(self.url + endpoint, json=sample, timeout=timeout)

    def stop(self) -> None:
        stop(self.process, timeout=15)


class UpProcess:
    """``inferq up`` in the background, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], *, command: list[str] | None = None,
                 cwd: str | None = None) -> None:
        self.process = spawn(command or inferq_command("up", *args), env=env, cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        def seen():
            if text in self.output():
                return True
            if self.process.poll() is not None:
                raise AssertionError(f"inferq up exited:\n{self.output()}")
            return False

        wait_until(seen, timeout, what=f"{text!r} in inferq up's output")

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        return code


def post(url: str, payload, **kwargs) -> requests.Response:
    return requests.post(url, data=json.dumps(payload), timeout=kwargs.pop("timeout", 30),
                         headers={"Content-Type": "application/json"}, **kwargs)


def assert_json(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    return response.json()




# -- Kubernetes: the manifests checked against schemas, and run without a cluster ---------------

KEDA_CRD = ROOT / "tests" / "fixtures" / "keda-v2.20.2" / "keda.sh_scaledobjects.yaml"


def _structural(node):
    """An OpenAPI v3 structural schema (a CRD's) as JSON Schema read strictly: an object node
    with properties accepts no others (the API server prunes them, or refuses them with
    kubectl's strict field validation); ``nullable`` allows null."""
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _structural(value) for key, value in node.items()}
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def keda_errors(body: dict) -> list[str]:
    """What KEDA v2.20.2's ScaledObject CRD (``tests/fixtures``) refuses in ``body``: its
    schema, int32 ranges, and its CEL rule minReplicaCount <= maxReplicaCount."""
    import jsonschema
    import yaml

    crd = yaml.safe_load(KEDA_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema = _structural(version["schema"]["openAPIV3Schema"])
    checker = jsonschema.FormatChecker()
    checker.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
    validator = jsonschema.Draft4Validator(schema, format_checker=checker)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in validator.iter_errors(body)]
    if body.get("apiVersion") != "keda.sh/v1alpha1" or body.get("kind") != "ScaledObject":
        errors.append("not a keda.sh/v1alpha1 ScaledObject")
    spec = body.get("spec", {})
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        errors.append("spec: minReplicaCount must be less than or equal to maxReplicaCount")
    return errors


class Pods:
    """The containers of rendered Deployments, run as local processes against a local Redis:
    each container's args and environment as rendered (the image's entrypoint is ``inferq``;
    Secrets are resolved from the rendered ones), as a pod of its own (its own INFERQ_HOME
    and host name). Servers listen on 127.0.0.1 and on free ports instead of their container
    ports, and a Service's URL maps to them (:meth:`local_url`)."""

    def __init__(self, objects: list[dict], logs: Path) -> None:
        self.objects = objects
        self.logs = logs
        self.ports: dict[int, int] = {}  # container port -> the local port serving it
        self.processes: list[subprocess.Popen] = []

    def find(self, kind: str, name: str) -> dict:
        return next(o for o in self.objects
                    if o["kind"] == kind and o["metadata"]["name"] == name)

    def start(self, deployment: str) -> subprocess.Popen:
        """One pod of ``deployment``'s template (its only container)."""
        pod = self.find("Deployment", deployment)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = list(container["args"])
        for flag, value in itertools.pairwise(args):
            if flag == "--port":
                self.ports.setdefault(int(value), free_port())
        args = [self._local(flag, value) for flag, value in itertools.pairwise(["", *args])]
        name = f"{deployment}-{sum(1 for p in self.processes if p.deployment == deployment)}"
        env = {**os.environ, "INFERQ_HOST_NAME": name,
               "INFERQ_HOME": str(self.logs / name / "home")}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.find("Secret", ref["name"])["stringData"][ref["key"]]
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "wb") as log:
            process = spawn(inferq_command(*args), env=env, stdout=log,
                            stderr=subprocess.STDOUT)
        process.pod = name
        process.deployment = deployment
        process.log_path = self.logs / f"{name}.log"
        self.processes.append(process)
        return process

    def _local(self, flag: str, value: str) -> str:
        if flag == "--host":
            return "127.0.0.1"
        if flag == "--port":
            return str(self.ports[int(value)])
        return value

    def local_url(self, url: str) -> str:
        """``http://<service>.<namespace>.svc:<port>/path`` as served here."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        service = self.find("Service", parts.hostname.split(".")[0])
        port = next(p for p in service["spec"]["ports"] if p["port"] == parts.port)
        return f"http://127.0.0.1:{self.ports[int(port['targetPort'])]}{parts.path}"

    def log(self, process: subprocess.Popen) -> str:
        return process.log_path.read_text(errors="replace")[-5000:]

    def stop_all(self) -> None:
        """SIGTERM every pod at once, as Kubernetes does; SIGKILL what outlives 30 s."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Controller:
    """``inferq controller`` on a free loopback port; its output goes to a log file."""

    def __init__(self, broker_url: str, log: Path, name: str = "controller-a") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        with open(log, "wb") as output:
            self.process = spawn(
                inferq_command("controller", "--port", str(self.port), "--host-name", name),
                env={**os.environ, "INFERQ_BROKER_URL": broker_url},
                stdout=output, stderr=subprocess.STDOUT,
            )

    def scaling(self, api: str) -> dict:
        response = requests.get(f"{self.url}/scaling/{api}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_answering(self, timeout: float = 30) -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the controller exited:\n{self.log()}")
            try:
                return requests.get(self.url + "/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(answers, timeout, what="the controller answering /healthz")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def stop(self) -> int:
        return stop(self.process, timeout=30)
