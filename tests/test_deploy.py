"""Deploy, redeploy, delete, bundles and the CLI's deploy commands, on a real Redis."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from helpers import EXAMPLES, copy_example, inferq_command, write_project

from inferq import Client, keys
from inferq.bundle import pack, unpack
from inferq.deploy import deploy
from inferq.errors import BundleTooLarge, ConfigError, DeployError
from inferq.processes import wait_until
from inferq.registry import Registry
from inferq.stack import EmbeddedRedis, free_port

TWO_APIS = """
- kind: deployment
  name: shop

- kind: api
  name: ranker
  predictor:
    path: predictor.py

- kind: api
  name: tagger
  endpoint: /tags
  predictor:
    path: predictor.py
"""

PREDICTOR = """
def predict(sample, metadata):
    return sample
"""


def test_bundle_is_deterministic_and_skips_dot_files_caches_and_pyc(tmp_path):
    project = write_project(tmp_path / "p", TWO_APIS, {
        "predictor.py": PREDICTOR,
        "lib/util.py": "X = 1\n",
        ".env": "SECRET=1\n",
        ".git/config": "[core]\n",
        "__pycache__/predictor.cpython-311.pyc": "junk",
        "lib/old.pyc": "junk",
    })
    first = pack(project)
    (project / "predictor.py").touch()  # a new mtime changes nothing
    second = pack(project)
    assert first.digest == second.digest
    assert first.files == ("cortex.yaml", "lib/util.py", "predictor.py")
    unpacked = unpack(first.data, first.digest, tmp_path / "cache")
    assert (unpacked / "lib" / "util.py").read_text() == "X = 1\n"
    assert not (unpacked / ".env").exists()


def test_bundle_over_the_limit_is_refused_naming_the_largest_file(tmp_path):
    project = write_project(tmp_path / "p", TWO_APIS, {"predictor.py": PREDICTOR})
    (project / "weights.bin").write_bytes(b"\0" * 5000)
    with pytest.raises(BundleTooLarge) as caught:
        pack(project, limit=4096)
    assert "weights.bin" in str(caught.value)
    assert "s3://" in str(caught.value)


def test_a_project_of_more_than_10000_files_is_refused_naming_where_they_are(registry,
                                                                           tmp_path):
    project = write_project(tmp_path / "p", TWO_APIS, {"predictor.py": PREDICTOR})
    packages = project / "venv" / "lib"
    packages.mkdir(parents=True)
    for n in range(10_000):
        (packages / f"module_{n}.py").touch()
    done = subprocess.run(inferq_command("deploy", str(project)),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert (f"{project}: the project has more than 10,000 files, the bundle limit "
            "(most in: venv/ (9,999), the project's top folder (2)); ") in done.stderr
    assert "INFERQ_MAX_BUNDLE_FILES" in done.stderr and "Traceback" not in done.stderr
    assert registry.deployments.apis() == []  # nothing deployed
    # In a dot-folder (as a virtualenv usually is) the same files are not part of the bundle.
    packages.parent.rename(project / ".venv")
    assert pack(project).files == ("cortex.yaml", "predictor.py")


def test_unpack_refuses_a_corrupt_bundle(tmp_path):
    project = write_project(tmp_path / "p", TWO_APIS, {"predictor.py": PREDICTOR})
    bundle = pack(project)
    with pytest.raises(ValueError, match="corrupt"):
        unpack(bundle.data[:-1] + b"x", bundle.digest, tmp_path / "cache")


def test_redeploy_unchanged_keeps_versions_and_a_change_makes_new_ones(registry, tmp_path):
    project = write_project(tmp_path / "p", TWO_APIS, {"predictor.py": PREDICTOR})
    _, first = deploy(project, registry)
    assert first.changes == {"ranker": "created", "tagger": "created"}
    versions = {a.name: (a.version, a.updated_at) for a in registry.deployments.apis()}

    _, again = deploy(project, registry)
    assert not again.changed
    assert {a.name: (a.version, a.updated_at) for a in registry.deployments.apis()} == versions

    (project / "predictor.py").write_text(PREDICTOR + "\n# tuned\n")
    _, changed = deploy(project, registry)
    assert changed.changes == {"ranker": "updated", "tagger": "updated"}
    new_versions = {a.name: a.version for a in registry.deployments.apis()}
    assert all(new_versions[n] != versions[n][0] for n in new_versions)
    new_bundle = registry.deployments.api("ranker").bundle
    assert registry.deployments.get_bundle(new_bundle) is not None


def test_changing_one_apis_compute_updates_only_that_api(registry, tmp_path):
    project = write_project(tmp_path / "p", TWO_APIS, {"predictor.py": PREDICTOR})
    deploy(project, registry)
    before = {a.name: a.version for a in registry.deployments.apis()}
    text = (project / "cortex.yaml").read_text().replace(
        "  endpoint: /tags\n", "  endpoint: /tags\n  compute:\n    max_replicas: 3\n"
    )
    (project / "cortex.yaml").write_text(text)
    _, result = deploy(project, registry)
    # the file changed, so the bundle (and both versions) changed: replicas run the new files
    assert result.changes["tagger"] == "updated"
    assert registry.deployments.api("tagger").api.compute.max_replicas == 3
    assert registry.deployments.api("ranker").version != before["ranker"]


def test_removing_an_api_from_the_file_removes_it_from_the_deployment(registry, tmp_path):
    project = write_project(tmp_path / "p", TWO_APIS, {"predictor.py": PREDICTOR})
    deploy(project, registry)
    text = (project / "cortex.yaml").read_text()
    (project / "cortex.yaml").write_text(text[: text.index("- kind: api\n  name: tagger")])
    _, result = deploy(project, registry)
    assert result.removed == ("tagger",)
    assert [a.name for a in registry.deployments.apis()] == ["ranker"]


def test_an_invalid_project_changes_nothing_already_deployed(registry, tmp_path):
    project = write_project(tmp_path / "p", TWO_APIS, {"predictor.py": PREDICTOR})
    deploy(project, registry)
    before = registry.deployments.apis()
    (project / "cortex.yaml").write_text(TWO_APIS.replace("path: predictor.py", "path: gone.py"))
    with pytest.raises(ConfigError):
        deploy(project, registry)
    assert registry.deployments.apis() == before


def test_api_names_and_endpoints_belong_to_one_deployment(registry, tmp_path):
    deploy(write_project(tmp_path / "a", TWO_APIS, {"predictor.py": PREDICTOR}), registry)
    other = TWO_APIS.replace("name: shop", "name: other")
    with pytest.raises(DeployError, match='taken by deployment "shop"'):
        deploy(write_project(tmp_path / "b", other, {"predictor.py": PREDICTOR}), registry)
    endpoint_clash = """
    - kind: deployment
      name: other
    - kind: api
      name: labels
      endpoint: /tags
      predictor:
        path: predictor.py
    """
    with pytest.raises(DeployError, match="endpoint /tags is taken"):
        deploy(write_project(tmp_path / "c", endpoint_clash, {"predictor.py": PREDICTOR}),
               registry)
    assert {a.api.deployment for a in registry.deployments.apis()} == {"shop"}


def test_delete_removes_the_deployment_and_its_apis(registry, tmp_path):
    deploy(write_project(tmp_path / "p", TWO_APIS, {"predictor.py": PREDICTOR}), registry)
    assert sorted(registry.deployments.delete("shop")) == ["ranker", "tagger"]
    assert registry.deployments.apis() == []
    assert registry.deployments.names() == []
    with pytest.raises(DeployError, match='no deployment named "shop"'):
        registry.deployments.delete("shop")


def test_dry_run_prints_every_default_without_a_stack(tmp_path, monkeypatch):
    monkeypatch.delenv("INFERQ_BROKER_URL", raising=False)
    monkeypatch.setenv("INFERQ_HOME", str(tmp_path / "nothing-runs-here"))
    done = subprocess.run(
        inferq_command("deploy", "--dry-run", str(EXAMPLES / "iris")),
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    resources = yaml.safe_load(done.stdout)
    api = next(r for r in resources if r["kind"] == "api")
    assert api["endpoint"] == "/iris/classifier"
    compute = api["compute"]
    for key in ("min_replicas", "max_replicas", "init_replicas", "target_cpu_utilization",
                "cpu", "gpu", "mem", "timeout", "max_queue_length"):
        assert key in compute
    assert compute["init_replicas"] == compute["min_replicas"]
    assert api["predictor"]["python_path"] == "."


def test_dry_run_lists_every_problem_and_exits_non_zero(tmp_path):
    project = write_project(tmp_path / "p", """
    - kind: deployment
      name: shop
    - kind: api
      name: ranker
      predictor:
        path: missing.py
      compute:
        cpu: 2x
        min_replicas: 3
        max_replicas: 2
    """)
    done = subprocess.run(inferq_command("deploy", "--dry-run", str(project)),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith(str(project))]
    assert len(lines) >= 3, done.stderr
    assert any('api "ranker": compute.cpu' in line for line in lines)
    assert any('api "ranker": predictor.path' in line for line in lines)
    assert any('api "ranker": compute' in line and "max_replicas" in line for line in lines)


def test_cli_deploy_then_redeploy_reports_versions(redis_url, tmp_path):
    project = copy_example("iris", tmp_path)
    first = subprocess.run(inferq_command("deploy", str(project)),
                           capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    assert 'api "classifier": created' in first.stdout
    again = subprocess.run(inferq_command("deploy", str(project)),
                           capture_output=True, text=True, timeout=60, check=False)
    assert 'is up to date' in again.stdout
    listed = subprocess.run(inferq_command("get"), capture_output=True, text=True, timeout=60,
                            check=False)
    assert "classifier" in listed.stdout


def test_commands_without_a_stack_say_how_to_start_one(tmp_path, monkeypatch):
    monkeypatch.delenv("INFERQ_BROKER_URL", raising=False)
    monkeypatch.setenv("INFERQ_HOME", str(tmp_path / "empty"))
    for command in (["get"], ["deploy", str(EXAMPLES / "iris")], ["delete", "iris"]):
        done = subprocess.run(inferq_command(*command), capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 1
        assert "inferq up" in done.stderr and "INFERQ_BROKER_URL" in done.stderr


def test_queued_requests_survive_a_restart_of_the_embedded_redis(tmp_path, replicas):
    """celery #1789: without persistence a Redis restart loses what was queued."""
    data = tmp_path / "persisted"
    port = free_port()
    server = EmbeddedRedis(data, port=port)
    server.start()
    try:
        registry = Registry(server.url)
        deploy(copy_example("iris", tmp_path), registry)
        with Client(server.url) as client:
            client.submit("classifier", {"sepal_length": 5.1, "sepal_width": 3.5,
                                         "petal_length": 1.4, "petal_width": 0.2})
            reply_to = keys.reply(client.id)
        assert registry.queues.length("inferq.classifier") == 1
        registry.close()
    finally:
        server.stop()

    server = EmbeddedRedis(data, port=port)
    server.start()
    try:
        registry = Registry(server.url)
        assert registry.queues.length("inferq.classifier") == 1  # still queued
        replicas.registry, replicas.redis_url = registry, server.url
        replicas.start("classifier")
        reply = wait_until(lambda: registry.queues.pop_replies(reply_to, timeout=1), 30,
                           what="the queued request answered after the restart")
        assert reply[0]["result"] == "setosa"
        replicas.stop_all()
        registry.close()
    finally:
        server.stop()
