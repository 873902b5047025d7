"""``inferq export kubernetes``: manifests that Kubernetes 1.30 and KEDA 2.20 accept, that say
what schemas cannot check, and that run: their containers, started as local processes from
the rendered Deployments, serve the bundled example through the gateway and report what KEDA
would scale on.

Built-in kinds are validated with kubernetes-validate (Kubernetes' own OpenAPI schemas) in
strict mode; the ScaledObject against KEDA v2.20.2's CRD, kept in tests/fixtures with its
source (SOURCE.txt) and license.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import textwrap

import kubernetes_validate
import pytest
import requests
import yaml
from helpers import ROOT, Pods, copy_example, inferq_command, keda_errors, write_project

from inferq.cli.kubernetes import HEADER, api_object_name, manifests, render_stream
from inferq.configs import load_project
from inferq.processes import wait_until

KUBERNETES_VERSION = "1.30"
IMAGE = "registry.example.com/inferq:1.0"
PASSWORD = "s3cret-Pa55word"
BUILT_IN = {"Secret", "Service", "Deployment", "StatefulSet", "NetworkPolicy"}

GPU_PROJECT = """
- kind: deployment
  name: vision

- kind: api
  name: detector
  predictor:
    path: predictor.py
  compute:
    min_replicas: 0
    max_replicas: 4
    cpu: 2
    gpu: 2
    mem: 8Gi
    timeout: 300s
    target_cpu_utilization: 60
    downscale_stabilization_period: 2m
"""


def bodies(deployment=None, **options) -> list[dict]:
    options.setdefault("image", IMAGE)
    return [m.body for m in manifests(deployment, **options)]


@pytest.fixture(scope="module")
def iris():
    return load_project(ROOT / "configs" / "examples" / "iris")


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    folder = write_project(tmp_path_factory.mktemp("vision"), GPU_PROJECT,
                           {"predictor.py": "def predict(sample, metadata):\n    return 1\n"})
    return load_project(folder)


@pytest.fixture(scope="module")
def renderings(iris, gpu):
    """Every variant: the example, a GPU API, the stack alone, and each with a broker URL."""
    url = f"redis://:{PASSWORD}@redis.example.com:6379/0"
    return {
        "iris": bodies(iris),
        "gpu": bodies(gpu, namespace="ml"),
        "stack": bodies(None),
        "iris, broker url": bodies(iris, broker_url=url),
        "gpu, broker url": bodies(gpu, namespace="ml", broker_url=url),
    }


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def container(deployment: dict) -> dict:
    (found,) = deployment["spec"]["template"]["spec"]["containers"]
    return found


# -- what the schemas say -----------------------------------------------------------------------

def test_every_built_in_object_is_valid_for_kubernetes_strictly(renderings):
    for variant, objects in renderings.items():
        kinds = {o["kind"] for o in objects}
        assert kinds - {"ScaledObject"} <= BUILT_IN, variant
        for body in objects:
            if body["kind"] in BUILT_IN:
                try:
                    kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    raise AssertionError(f"{variant}: {body['kind']} {body['metadata']['name']}: "
                                         f"{'.'.join(map(str, exc.path))}: {exc.message}") from None


def test_strict_validation_refuses_a_misspelt_field(iris):
    """The validators bite: a misspelt field or a number where KEDA wants a string fails."""
    deployment = one(bodies(iris), "Deployment", "inferq-gateway")
    container(deployment)["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    scaled = one(bodies(iris), "ScaledObject", "inferq-api-classifier")
    scaled["spec"]["triggers"][0]["metadata"]["targetValue"] = 1
    scaled["spec"]["maxReplicas"] = 3
    errors = keda_errors(scaled)
    assert any("targetValue" in e and "string" in e for e in errors), errors
    assert any("maxReplicas" in e for e in errors), errors


def test_every_scaled_object_is_valid_for_keda_2_20(renderings):
    for variant, objects in renderings.items():
        for body in of_kind(objects, "ScaledObject"):
            assert keda_errors(body) == [], (variant, body["metadata"]["name"])


# -- what the schemas cannot see ----------------------------------------------------------------

def test_each_api_scales_between_its_bounds_on_queued_and_in_flight_requests_and_cpu(iris, gpu):
    for deployment, namespace in ((iris, "default"), (gpu, "ml")):
        objects = bodies(deployment, namespace=namespace)
        for api in deployment.apis:
            name = api_object_name(api.name)
            spec = one(objects, "ScaledObject", name)["spec"]
            assert spec["scaleTargetRef"] == {"name": name}
            one(objects, "Deployment", name)  # the target is rendered beside it
            compute = api.compute
            assert spec["minReplicaCount"] == compute.min_replicas
            assert spec["maxReplicaCount"] == compute.max_replicas
            assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
            queue, cpu = spec["triggers"]
            assert queue["type"] == "metrics-api"
            assert queue["metadata"] == {
                "url": f"http://inferq-controller.{namespace}.svc:8080/scaling/{api.name}",
                "format": "json", "valueLocation": "value", "targetValue": "1"}
            assert cpu == {"type": "cpu", "name": "cpu", "metricType": "Utilization",
                           "metadata": {"value": str(compute.target_cpu_utilization)}}
            behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            assert behavior["scaleDown"]["stabilizationWindowSeconds"] == \
                compute.downscale_stabilization_period
            # KEDA reads pollingInterval and cooldownPeriod only for scaling to and from zero
            assert ("cooldownPeriod" in spec) == (compute.min_replicas == 0)
    scale_to_zero = one(bodies(gpu), "ScaledObject", "inferq-api-detector")["spec"]
    assert scale_to_zero["minReplicaCount"] == 0 and scale_to_zero["cooldownPeriod"] == 120


def test_replicas_request_cpu_and_mem_and_take_gpus_as_limits(iris, gpu):
    classifier = container(one(bodies(iris), "Deployment", "inferq-api-classifier"))
    assert classifier["args"] == ["worker", "classifier", "--wait-for-deploy"]
    assert classifier["resources"] == {"requests": {"cpu": "200m"}}  # no mem: no memory request
    detector = one(bodies(gpu), "Deployment", "inferq-api-detector")
    resources = container(detector)["resources"]
    assert resources == {"requests": {"cpu": "2", "memory": "8Gi"},
                         "limits": {"memory": "8Gi", "nvidia.com/gpu": 2}}
    assert not any("CUDA_VISIBLE_DEVICES" in json.dumps(o) for o in bodies(gpu))
    pod = detector["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(detector)["volumeMounts"]


def test_a_replica_is_given_longer_than_its_timeout_to_finish_its_request(iris, gpu):
    for deployment in (iris, gpu):
        for api in deployment.apis:
            pod = one(bodies(deployment), "Deployment", api_object_name(api.name))
            grace = pod["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace > api.compute.timeout, api.name
    assert one(bodies(gpu), "Deployment", "inferq-api-detector")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"] == 330
    # KEDA owns the replica count: apply must not reset it
    assert "replicas" not in one(bodies(iris), "Deployment", "inferq-api-classifier")["spec"]


def test_the_password_is_in_the_secret_alone_and_every_pod_reads_the_url_there(renderings):
    encoded = base64.b64encode(PASSWORD.encode()).decode()
    for variant, objects in renderings.items():
        secret = one(objects, "Secret", "inferq-broker")
        for body in objects:
            if body is not secret:
                text = yaml.safe_dump(body)
                assert PASSWORD not in text and encoded not in text, (variant, body["kind"])
        for deployment in of_kind(objects, "Deployment"):
            env = container(deployment)["env"]
            assert {"name": "INFERQ_BROKER_URL", "valueFrom": {"secretKeyRef": {
                "name": "inferq-broker", "key": "url"}}} in env, deployment["metadata"]["name"]
            assert not any("value" in item for item in env)
        if "broker url" in variant:
            assert PASSWORD in secret["stringData"]["url"]
            assert not of_kind(objects, "StatefulSet")


def test_without_a_broker_url_redis_keeps_an_append_only_file_on_a_volume(renderings):
    objects = renderings["iris"]
    redis = one(objects, "StatefulSet", "inferq-redis")
    args = container(redis)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert {"name": "data", "mountPath": "/data"} in container(redis)["volumeMounts"]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert one(objects, "Service", "inferq-redis")["spec"]["ports"][0]["port"] == 6379
    url = one(objects, "Secret", "inferq-broker")["stringData"]["url"]
    assert url == "redis://inferq-redis.default.svc:6379/0"
    policy = one(objects, "NetworkPolicy", "inferq-redis")["spec"]
    assert policy["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "inferq"}}}]


def test_the_stack_alone_has_redis_the_gateway_and_the_controller_and_no_api(renderings):
    names = {(o["kind"], o["metadata"]["name"]) for o in renderings["stack"]}
    assert names == {
        ("Secret", "inferq-broker"), ("NetworkPolicy", "inferq-redis"),
        ("Service", "inferq-redis"), ("StatefulSet", "inferq-redis"),
        ("Service", "inferq-controller"), ("Deployment", "inferq-controller"),
        ("Service", "inferq-gateway"), ("Deployment", "inferq-gateway"),
    }


def test_the_gateway_is_ready_on_healthz_and_alive_while_it_listens(renderings):
    gateway = container(one(renderings["stack"], "Deployment", "inferq-gateway"))
    assert gateway["args"] == ["gateway", "--host", "0.0.0.0", "--port", "8888"]
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # not /healthz: it fails while the broker is away, and a restart would drop waiting requests
    assert gateway["livenessProbe"]["tcpSocket"] == {"port": "http"}
    controller = container(one(renderings["stack"], "Deployment", "inferq-controller"))
    assert controller["args"][0] == "controller"
    assert controller["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_every_object_and_pod_is_labelled_and_named_within_limits(renderings, tmp_path):
    for objects in renderings.values():
        for body in objects:
            labels = body["metadata"]["labels"]
            assert labels["app.kubernetes.io/part-of"] == "inferq"
            assert labels["app.kubernetes.io/name"] == body["metadata"]["name"]
            assert labels["app.kubernetes.io/component"]
            assert len(body["metadata"]["name"]) <= 63
            template = body.get("spec", {}).get("template")
            if template is not None:
                assert template["metadata"]["labels"] == labels
                spec = template["spec"]
                assert body["kind"] == "StatefulSet" or spec["securityContext"]["runAsNonRoot"]
    long_name = "a" * 63
    assert len(api_object_name(long_name)) == 63
    assert api_object_name(long_name) != api_object_name("a" * 62 + "b")


def test_the_order_applies_a_deployment_before_its_scaled_object(iris, gpu):
    objects = manifests(iris, image=IMAGE)
    names = [m.file_name for m in objects]
    assert names == sorted(names)  # kubectl apply -f DIR reads files in name order
    kinds = [m.kind for m in objects]
    assert kinds.index("Deployment") < kinds.index("ScaledObject")
    assert names.index("1-secret-inferq-broker.yaml") < names.index(
        "2-deployment-inferq-gateway.yaml")
    assert "3-deployment-inferq-api-classifier.yaml" in names
    assert names[-1] == "4-scaledobject-inferq-api-classifier.yaml"


def test_rendering_twice_gives_the_same_bytes(iris, gpu):
    for deployment in (iris, gpu, None):
        first = render_stream(manifests(deployment, image=IMAGE, namespace="ml"))
        again = render_stream(manifests(deployment, image=IMAGE, namespace="ml"))
        assert first == again
        assert "&id" not in first and "*id" not in first  # plain YAML: no anchors
        assert [d for d in yaml.safe_load_all(first)] == bodies(deployment, namespace="ml")


# -- the command ---------------------------------------------------------------------------------

def export(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "INFERQ_BROKER_URL"}
    return subprocess.run(inferq_command("export", "kubernetes", *args), capture_output=True,
                          text=True, timeout=60, env=env, cwd=cwd, check=False)


def test_the_command_writes_one_file_per_object_and_the_same_bytes_again(tmp_path):
    project = copy_example("iris", tmp_path)
    out = tmp_path / "manifests"
    url = f"redis://:{PASSWORD}@redis.example.com:6379/0"
    first = export(str(project), "--image", IMAGE, "--broker-url", url, "--output", str(out))
    assert first.returncode == 0, first.stderr
    assert f"kubectl apply -f {out}" in first.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(m.file_name for m in manifests(
        load_project(project), image=IMAGE, broker_url=url))
    contents = {name: (out / name).read_bytes() for name in files}
    assert all(c.startswith(HEADER.encode()) for c in contents.values())
    assert stat.S_IMODE((out / "1-secret-inferq-broker.yaml").stat().st_mode) == 0o600
    again = export(str(project), "--image", IMAGE, "--broker-url", url, "--output", str(out))
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == contents
    # printed as one stream, the same objects
    stream = export(str(project), "--image", IMAGE, "--broker-url", url)
    assert stream.returncode == 0, stream.stderr
    assert list(yaml.safe_load_all(stream.stdout)) == [
        yaml.safe_load(contents[name]) for name in files]


def test_re_exporting_without_an_api_removes_its_files_and_says_how_to_delete_it(tmp_path):
    project = copy_example("iris", tmp_path)
    out = tmp_path / "manifests"
    (out / "notes").mkdir(parents=True)
    (out / "2-deployment-mine.yaml").write_text("kind: Deployment\n")  # not ours: kept
    assert export(str(project), "--image", IMAGE, "--output", str(out)).returncode == 0
    stack = export("--image", IMAGE, "--output", str(out))
    assert stack.returncode == 0, stack.stderr
    assert "kubectl delete -n default deployment/inferq-api-classifier" in stack.stdout
    assert "kubectl delete -n default scaledobject/inferq-api-classifier" in stack.stdout
    left = {p.name for p in out.iterdir()}
    assert "3-deployment-inferq-api-classifier.yaml" not in left
    assert {"2-deployment-mine.yaml", "notes", "2-deployment-inferq-gateway.yaml"} <= left


@pytest.mark.parametrize(("args", "says"), [
    (["--image", IMAGE, "--namespace", "Not_A_Name"], "--namespace"),
    (["--image", IMAGE, "--broker-url", "http://redis:6379"], "--broker-url"),
    (["--image", "two words"], "--image"),
])
def test_bad_arguments_are_refused_in_one_line(args, says):
    result = export(*args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


def test_the_image_runs_inferq_as_its_entrypoint_as_the_manifests_expect():
    """The manifests give only ``args``: the image's ENTRYPOINT must be ``inferq``, and its user
    the uid the pods run as (a name could not be checked against runAsNonRoot)."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.split(None, 1) for line in text.splitlines() if line and line[0].isupper()]
    assert json.loads(next(rest for word, rest in lines if word == "ENTRYPOINT")) == ["inferq"]
    user = [rest for word, rest in lines if word == "USER"][-1].strip()
    assert user.split(":")[0] == "10001"


# -- the manifests, run ---------------------------------------------------------------------------

SLOW_API = """
- kind: api
  name: slow
  predictor:
    path: slow.py
    metadata:
      gate: {gate}
  compute:
    min_replicas: 0
    max_replicas: 2
    cpu: 100m
"""
SLOW_PREDICTOR = """
import os
import time


def predict(sample, metadata):
    # Answers once the test opens the gate: the request stays in flight until then.
    while not os.path.exists(metadata["gate"]):
        time.sleep(0.01)
    return sample
"""


@pytest.fixture
def pods(tmp_path):
    started: list[Pods] = []

    def start(objects: list[dict]) -> Pods:
        pods = Pods(objects, tmp_path / "pods")
        started.append(pods)
        return pods

    yield start
    for pods in started:
        pods.stop_all()


def test_the_manifests_run_the_example_and_report_what_keda_scales_on(redis_url, pods, tmp_path):
    project = copy_example("iris", tmp_path)
    gate = tmp_path / "gate"
    with open(project / "cortex.yaml", "a") as config:
        config.write(textwrap.dedent(SLOW_API.format(gate=gate)))
    (project / "slow.py").write_text(textwrap.dedent(SLOW_PREDICTOR))
    objects = bodies(load_project(project), broker_url=redis_url)
    cluster = pods(objects)
    for name in ("inferq-controller", "inferq-gateway", "inferq-api-classifier"):
        cluster.start(name)  # before the deploy: the replica waits for its API

    deployed = subprocess.run(inferq_command("deploy", str(project)), capture_output=True,
                              text=True, timeout=60, env={**os.environ,
                              "INFERQ_BROKER_URL": redis_url}, check=False)
    assert deployed.returncode == 0, deployed.stderr
    gateway = cluster.local_url("http://inferq-gateway.default.svc:8888")

    def answers():
        for process in cluster.processes:
            assert process.poll() is None, cluster.log(process)
        try:
            response = requests.post(gateway + "/iris/classifier", timeout=30,
                                     data=(project / "sample.json").read_bytes())
        except requests.ConnectionError:
            return None
        return response if response.status_code == 200 else None

    response = wait_until(answers, 90, interval=0.2, what="an answer through the gateway")
    assert response.json() == "setosa"

    def scaling(api: str) -> dict:
        (so,) = [o for o in objects if o["kind"] == "ScaledObject"
                 and o["metadata"]["name"] == api_object_name(api)]
        trigger = so["spec"]["triggers"][0]
        answer = requests.get(cluster.local_url(trigger["metadata"]["url"]), timeout=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body[trigger["metadata"]["valueLocation"]] == body["queued"] + body["in_flight"]
        return body

    assert scaling("classifier")["value"] == 0
    # "slow" has no replica (min_replicas 0): a request waits in its queue, and KEDA reads 1
    first = requests.post(gateway + "/iris/slow?async=true", json={"n": 1}, timeout=10)
    assert first.status_code == 202, first.text
    assert scaling("slow") == {"api": "slow", "deployed": True, "value": 1, "queued": 1,
                               "in_flight": 0, "live": 0}
    cluster.start(api_object_name("slow"))  # what KEDA does with a 1 from zero
    wait_until(lambda: scaling("slow")["in_flight"] == 1, 60, what="the request in flight")
    assert scaling("slow")["value"] == 1  # the queue reads 0 now, and one replica is wanted
    second = requests.post(gateway + "/iris/slow?async=true", json={"n": 2}, timeout=10)
    assert second.status_code == 202
    assert scaling("slow")["value"] == 2
    gate.touch()

    def completed(request_id: str) -> bool:
        state = requests.get(f"{gateway}/iris/slow/{request_id}", timeout=10).json()
        return state["status"] == "completed"

    for request in (first, second):
        wait_until(lambda r=request: completed(r.json()["id"]), 60, what="the slow answers")
    assert scaling("slow")["value"] == 0
