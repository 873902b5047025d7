"""docker-compose.gpu.yml, checked with the real `docker-compose config` (no Docker engine needed).

`config` validates the file against the compose schema, interpolates the environment and prints
the resolved model, which is what these tests read. Debian's docker-compose (v1, what .ci/run
installs) and a Compose v2 `docker-compose` binary are both understood; without one installed
these tests are skipped. The Dockerfile and .dockerignore are checked as text (building the
image needs an engine and the network).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.gpu.yml"

# Variables the compose file interpolates, and others that change how compose reads it:
# the tests start from none of them, whatever the calling shell has.
_COMPOSE_ENV = re.compile(r"^(INFERQ_|COMPOSE_|DOCKER_)")


def _compose_binary() -> str | None:
    return shutil.which("docker-compose")


needs_compose = pytest.mark.skipif(
    _compose_binary() is None,
    reason="docker-compose is not installed (.ci/run installs Debian's: "
           "apt-get install docker-compose); docker-compose.gpu.yml was not validated",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _COMPOSE_ENV.match(k)}
    env.update(extra)
    return env


def compose(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`docker-compose --env-file <empty> -f docker-compose.gpu.yml ARGS`, from the repo root."""
    empty_env_file = tmp_path / "empty.env"  # so a developer's .env does not change the result
    empty_env_file.touch()
    return subprocess.run(
        [_compose_binary(), "--env-file", str(empty_env_file), "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=60, check=False,
    )


def config(tmp_path: Path, **env: str) -> dict:
    result = compose(tmp_path, "config", **env)
    assert result.returncode == 0, (
        f"docker-compose rejects {COMPOSE_FILE.name}:\n{result.stdout}\n{result.stderr}"
    )
    return yaml.safe_load(result.stdout)


def compose_major_version() -> int:
    out = subprocess.run([_compose_binary(), "version"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    match = re.search(r"version v?(\d+)\.", out)
    assert match, out
    return int(match.group(1))


def published_ports(service: dict) -> set[tuple[str, int, int]]:
    """(host ip, published port, container port) of a service, from v1's or v2's output."""
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, str):  # v1 short form: [IP:]PUBLISHED:TARGET[/PROTO]
            parts = port.split("/")[0].split(":")
            host_ip = parts[0] if len(parts) == 3 else ""
            ports.add((host_ip, int(parts[-2]), int(parts[-1])))
        else:  # long form
            ports.add((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
    return ports


def volume_mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's named volumes, from v1's or v2's output."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        mounts[target] = source
    return mounts


def depends_on(service: dict) -> set[str]:
    deps = service.get("depends_on") or {}
    return set(deps) if isinstance(deps, (dict, list)) else set()


def healthcheck_command(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


@needs_compose
def test_the_file_is_valid_and_has_the_three_services(tmp_path):
    model = config(tmp_path)
    assert set(model["services"]) == {"redis", "gateway", "scaler"}
    for name in ("gateway", "scaler"):
        service = model["services"][name]
        assert service["image"].startswith("inferq"), service
        assert Path(service["build"]["context"]) == ROOT, service["build"]
        assert service["restart"] == "unless-stopped"
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"^version\s*:", text, re.MULTILINE), (
        "no top-level version: compose v2 warns that it is obsolete and v1 (>= 1.27) needs none"
    )


@needs_compose
def test_the_scaler_reserves_every_nvidia_gpu(tmp_path):
    scaler = config(tmp_path)["services"]["scaler"]
    devices = scaler["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device["count"] in ("all", -1)  # v1 prints "all", v2 its -1


@needs_compose
def test_redis_persists_with_appendonly_on_a_named_volume(tmp_path):
    model = config(tmp_path)
    redis = model["services"]["redis"]
    command = redis["command"]
    command = " ".join(command) if isinstance(command, list) else command
    assert "redis-server" in command and "--appendonly yes" in command
    assert volume_mounts(redis) == {"/data": "redis-data"}
    assert "redis-data" in model["volumes"]
    # published for `inferq deploy` on this host only, unless INFERQ_REDIS_BIND says otherwise
    assert published_ports(redis) == {("127.0.0.1", 6379, 6379)}
    exposed = config(tmp_path, INFERQ_REDIS_BIND="0.0.0.0")["services"]["redis"]
    assert published_ports(exposed) == {("0.0.0.0", 6379, 6379)}


@needs_compose
def test_redis_takes_an_optional_password(tmp_path):
    redis = config(tmp_path, INFERQ_REDIS_PASSWORD="s3cret")["services"]["redis"]
    assert redis["environment"]["INFERQ_REDIS_PASSWORD"] == "s3cret"
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == "s3cret"
    # the healthcheck's shell gives redis-cli the password only when there is one
    assert "INFERQ_REDIS_PASSWORD" in healthcheck_command(redis)
    unset = config(tmp_path)["services"]["redis"]["command"]
    assert unset[unset.index("--requirepass") + 1] == ""  # Redis: no password


@needs_compose
def test_the_gateway_listens_on_all_interfaces_and_is_published_on_8888(tmp_path):
    gateway = config(tmp_path)["services"]["gateway"]
    command = [str(part) for part in gateway["command"]]
    assert command[0] == "gateway"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8888"
    assert published_ports(gateway) in ({("", 8888, 8888)}, {("0.0.0.0", 8888, 8888)})
    assert gateway["environment"]["INFERQ_BROKER_URL"] == "redis://redis:6379/0"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"


@needs_compose
def test_every_service_has_a_healthcheck(tmp_path):
    services = config(tmp_path)["services"]
    assert "ping" in healthcheck_command(services["redis"])
    gateway_check = healthcheck_command(services["gateway"])
    assert "python" in gateway_check and "http://127.0.0.1:8888/healthz" in gateway_check
    scaler_check = healthcheck_command(services["scaler"])
    assert "python" in scaler_check and "INFERQ_BROKER_URL" in scaler_check
    assert ".ping()" in scaler_check
    for name, service in services.items():
        assert service["healthcheck"].get("disable") is not True, name
        assert service["healthcheck"]["interval"], name


@needs_compose
def test_a_second_host_runs_the_scaler_alone_against_the_first_hosts_redis(tmp_path):
    model = config(tmp_path, INFERQ_BROKER_URL="redis://first-host:6379/0",
                   INFERQ_HOST_NAME="gpu-2")
    scaler = model["services"]["scaler"]
    assert scaler["environment"]["INFERQ_BROKER_URL"] == "redis://first-host:6379/0"
    assert scaler["environment"]["INFERQ_HOST_NAME"] == "gpu-2"
    # `up scaler` would also start whatever the scaler depends on: it must depend on nothing
    assert depends_on(scaler) == set()
    assert "profiles" not in scaler  # plain `docker compose up` on the first host starts it
    assert volume_mounts(scaler) == {"/var/lib/inferq": "inferq-home"}
    # without the variables: this file's redis, and the container's hostname as host name
    default = config(tmp_path)["services"]["scaler"]
    assert default["environment"]["INFERQ_BROKER_URL"] == "redis://redis:6379/0"
    assert default["environment"]["INFERQ_HOST_NAME"] == ""


@needs_compose
def test_compose_v2_resolves_up_scaler_to_the_scaler_alone(tmp_path):
    if compose_major_version() < 2:
        pytest.skip("docker-compose v1's `config` takes no service names; "
                    "the scaler's empty depends_on is checked above")
    result = compose(tmp_path, "config", "scaler", INFERQ_BROKER_URL="redis://first-host:6379/0")
    assert result.returncode == 0, result.stderr
    assert set(yaml.safe_load(result.stdout)["services"]) == {"scaler"}


def test_the_dockerfile_installs_inferq_with_onnx_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines()
                    if line and not line.startswith((" ", "#"))]
    first = instructions[0]
    assert first == ["FROM", "python:3.11-slim"], first
    assert re.search(r'pip install "?/\S+\[onnx\]"?', text)
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    assert any(keyword == "HEALTHCHECK" for keyword, _ in instructions)
    assert re.search(r"^ENV INFERQ_HOME=/var/lib/inferq$", text, re.MULTILINE)
    # compose mounts the INFERQ_HOME volume there
    compose_text = COMPOSE_FILE.read_text()
    assert "inferq-home:/var/lib/inferq" in compose_text


def test_the_build_context_leaves_out_the_venv_git_and_caches():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for entry in (".venv", ".git", "**/__pycache__", ".pytest_cache", ".env"):
        assert entry in ignored, entry
    # what `pip install .` needs stays in the context
    for needed in ("pyproject.toml", "README.md", "inferq", "configs"):
        assert needed not in ignored, needed
