"""``inferq export kubernetes``: the manifests that run inferq on a cluster with KEDA 2.x.

Plain YAML, the same bytes for the same input, in the order ``kubectl apply`` needs them
(the files' names sort in that order; a ScaledObject comes after its Deployment, which KEDA's
admission webhook reads):

1. the broker URL's Secret, the Services of the controller and the gateway, and without
   ``--broker-url`` a Redis: a StatefulSet with an append-only file on a
   PersistentVolumeClaim, its Service and a NetworkPolicy;
2. the Deployments of the controller (``inferq controller``, which serves what KEDA reads)
   and of the gateway;
3. per API of the project, a Deployment of replicas (``inferq worker API``);
4. per API, its KEDA ScaledObject: queued + in-flight requests (the controller's
   ``/scaling/<api>``), and CPU utilisation of the ``cpu`` request.

The image is generic: a project reaches the cluster with ``inferq deploy`` against its Redis,
as everywhere. See the README, "Kubernetes".
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from inferq.configs import Api, Deployment, format_cpu, format_mem, load_project
from inferq.errors import InferqError
from inferq.gateway.server import STOP_GRACE_SECONDS as GATEWAY_STOP_GRACE
from inferq.scaler.scaler import STOP_GRACE_SECONDS

BROKER_SECRET = "inferq-broker"
BROKER_KEY = "url"
REDIS = "inferq-redis"
GATEWAY = "inferq-gateway"
CONTROLLER = "inferq-controller"
GATEWAY_PORT = 8888
CONTROLLER_PORT = 8080
REDIS_PORT = 6379
REDIS_IMAGE = "redis:7-alpine"
REDIS_STORAGE = "8Gi"
HOME = "/var/lib/inferq"  # INFERQ_HOME in the image (the Dockerfile)
UID = 10001  # the image's user (the Dockerfile)
GPU_RESOURCE = "nvidia.com/gpu"
HEADER = "# Written by `inferq export kubernetes`: export again rather than edit."
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class Manifest:
    """One object and its stage in the apply order (see the module doc)."""

    stage: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def file_name(self) -> str:
        """``<stage>-<kind>-<name>.yaml``: ``kubectl apply -f DIR`` reads them in this order."""
        return f"{self.stage}-{self.kind.lower()}-{self.name}.yaml"

    def to_yaml(self) -> str:
        return HEADER + "\n" + yaml.dump(self.body, Dumper=_Dumper, sort_keys=False,
                                         default_flow_style=False, width=100)


class _Dumper(yaml.SafeDumper):
    """Plain YAML: a value written twice is written twice, never as an anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def api_object_name(api: str) -> str:
    """The name of an API's Deployment and ScaledObject: ``inferq-api-<api>``, shortened with
    a hash to the 63 characters of a label value."""
    name = f"inferq-api-{api}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(api.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def manifests(deployment: Deployment | None, *, image: str, namespace: str = "default",
              broker_url: str | None = None) -> list[Manifest]:
    """Every object, in apply order; without ``deployment``, the stack alone."""
    _check(image, namespace, broker_url)
    url = broker_url or f"redis://{REDIS}.{namespace}.svc:{REDIS_PORT}/0"
    found = [Manifest(1, _broker_secret(namespace, url)),
             Manifest(1, _service(CONTROLLER, "controller", namespace, CONTROLLER_PORT)),
             Manifest(1, _service(GATEWAY, "gateway", namespace, GATEWAY_PORT)),
             Manifest(2, _controller(namespace, image)),
             Manifest(2, _gateway(namespace, image))]
    if broker_url is None:
        found += [Manifest(1, body) for body in _redis(namespace)]
    for api in deployment.apis if deployment is not None else ():
        found += [Manifest(3, _replicas(api, namespace, image)),
                  Manifest(4, _scaled_object(api, namespace))]
    return sorted(found, key=lambda m: m.file_name)


def render_stream(objects: list[Manifest]) -> str:
    """One YAML stream (``kubectl apply -f -``)."""
    return "".join("---\n" + m.to_yaml() for m in objects)


def export(project_dir: str | None, *, image: str, namespace: str, broker_url: str | None,
           output: str) -> int:
    """The command: print the stream (``-``) or write one file per object into a folder."""
    deployment = load_project(project_dir) if project_dir is not None else None
    objects = manifests(deployment, image=image, namespace=namespace, broker_url=broker_url)
    if output == "-":
        sys.stdout.write(render_stream(objects))
        return 0
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise InferqError(f"{output}: not a folder (give a folder, or - to print the stream)")
    folder.mkdir(parents=True, exist_ok=True)
    stale = _ours(folder) - {m.file_name for m in objects}
    for manifest in objects:
        path = folder / manifest.file_name
        path.write_text(manifest.to_yaml())
        if manifest.kind == "Secret":  # the broker's password, if it has one
            path.chmod(0o600)
    for name in sorted(stale):
        gone = yaml.safe_load((folder / name).read_text()) or {}
        (folder / name).unlink()
        print(f"removed {folder / name} (no longer exported); remove it from the cluster with: "
              f"kubectl delete -n {gone.get('metadata', {}).get('namespace', namespace)} "
              f"{str(gone.get('kind', '')).lower()}/{gone.get('metadata', {}).get('name')}")
    apis = ", ".join(a.name for a in deployment.apis) if deployment is not None else "none yet"
    print(f"wrote {len(objects)} objects to {folder} (namespace {namespace}, APIs: {apis})")
    print(f"apply them with: kubectl apply -f {folder}")
    return 0


def _ours(folder: Path) -> set[str]:
    """Files of the folder that an earlier export wrote."""
    found = set()
    for path in folder.glob("[1-4]-*.yaml"):
        with open(path, encoding="utf-8", errors="replace") as handle:
            if handle.readline().rstrip("\n") == HEADER:
                found.add(path.name)
    return found


def _check(image: str, namespace: str, broker_url: str | None) -> None:
    if not image or any(c.isspace() for c in image):
        raise InferqError(f"--image {image!r} is not an image reference (e.g. "
                          "registry.example.com/inferq:1.0)")
    if len(namespace) > 63 or not _LABEL.fullmatch(namespace):
        raise InferqError(f"--namespace {namespace!r} is not a Kubernetes namespace name "
                          "(lowercase letters, digits and -, at most 63)")
    if broker_url is not None and urlsplit(broker_url).scheme not in ("redis", "rediss"):
        raise InferqError("--broker-url must be a Redis URL the cluster reaches "
                          "(redis://:password@host:6379/0 or rediss://...)")


# -- the objects ---------------------------------------------------------------------------------

def _labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "inferq"}


def _metadata(name: str, component: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": _labels(name, component)}


def _selector(name: str, component: str) -> dict[str, Any]:
    return {"matchLabels": {"app.kubernetes.io/name": name,
                            "app.kubernetes.io/component": component}}


def _broker_secret(namespace: str, url: str) -> dict[str, Any]:
    """The broker URL (and so its password) lives here alone; every pod reads it from here."""
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": _metadata(BROKER_SECRET, "broker", namespace),
            "type": "Opaque", "stringData": {BROKER_KEY: url}}


def _broker_env() -> list[dict[str, Any]]:
    return [{"name": "INFERQ_BROKER_URL",
             "valueFrom": {"secretKeyRef": {"name": BROKER_SECRET, "key": BROKER_KEY}}}]


def _service(name: str, component: str, namespace: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(name, component, namespace),
            "spec": {"selector": _selector(name, component)["matchLabels"],
                     "ports": [{"name": "http" if port != REDIS_PORT else "redis",
                                "port": port, "targetPort": port, "protocol": "TCP"}]}}


def _pod(containers: list[dict[str, Any]], volumes: list[dict[str, Any]], *,
         grace: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An inferq pod: the image's non-root user, and a shared process namespace so that
    inferq is not PID 1 (the pause container reaps orphans, and SIGTERM's default applies)."""
    spec: dict[str, Any] = {"shareProcessNamespace": True}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    spec["securityContext"] = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                               "fsGroup": UID}
    spec.update(extra or {})
    spec["containers"] = containers
    spec["volumes"] = [{"name": "inferq-home", "emptyDir": {}}, *volumes]
    return spec


def _container(name: str, image: str, args: list[str], resources: dict[str, Any],
               **more: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": image, "args": args,
                                 "env": _broker_env(), **more}
    container["resources"] = resources
    container["securityContext"] = {"allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}}
    mounts = [{"name": "inferq-home", "mountPath": HOME}, *container.pop("volumeMounts", [])]
    container["volumeMounts"] = mounts
    return container


def _deployment(name: str, component: str, namespace: str, pod: dict[str, Any],
                replicas: int | None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if replicas is not None:  # an API's replica count is KEDA's: apply must not reset it
        spec["replicas"] = replicas
    spec["selector"] = _selector(name, component)
    spec["template"] = {"metadata": {"labels": _labels(name, component)}, "spec": pod}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(name, component, namespace), "spec": spec}


def _http_probe(path: str, period: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": 3}


def _gateway(namespace: str, image: str) -> dict[str, Any]:
    # Liveness is the port, not /healthz: /healthz fails while the broker is away, and a
    # restarted gateway would drop the requests that wait through the outage.
    container = _container(
        "gateway", image, ["gateway", "--host", "0.0.0.0", "--port", str(GATEWAY_PORT)],
        {"requests": {"cpu": "250m", "memory": "256Mi"}},
        ports=[{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        readinessProbe=_http_probe("/healthz", 5),
        livenessProbe={"tcpSocket": {"port": "http"}, "periodSeconds": 10,
                       "timeoutSeconds": 5, "failureThreshold": 6},
    )
    # Stopped, it answers the requests it holds first (up to GATEWAY_STOP_GRACE seconds).
    pod = _pod([container], [], grace=GATEWAY_STOP_GRACE + 5)
    return _deployment(GATEWAY, "gateway", namespace, pod, 2)


def _controller(namespace: str, image: str) -> dict[str, Any]:
    container = _container(
        "controller", image,
        ["controller", "--host", "0.0.0.0", "--port", str(CONTROLLER_PORT)],
        {"requests": {"cpu": "200m", "memory": "256Mi"}},
        ports=[{"name": "http", "containerPort": CONTROLLER_PORT, "protocol": "TCP"}],
        readinessProbe=_http_probe("/healthz", 5),
        livenessProbe=_http_probe("/healthz", 10),
    )
    return _deployment(CONTROLLER, "controller", namespace, _pod([container], []), 1)


def _replicas(api: Api, namespace: str, image: str) -> dict[str, Any]:
    """An API's replicas: ``cpu`` and ``mem`` requested, ``mem`` and ``gpu`` as limits (the
    device plugin pins the GPUs), and a grace period past the API's timeout, since a replica
    stops warm on SIGTERM: it finishes the request it runs."""
    compute = api.compute
    requests: dict[str, str] = {"cpu": format_cpu(compute.cpu)}
    limits: dict[str, Any] = {}
    if compute.mem:
        requests["memory"] = limits["memory"] = format_mem(compute.mem)
    if compute.gpu:
        limits[GPU_RESOURCE] = compute.gpu
    resources: dict[str, Any] = {"requests": requests}
    if limits:
        resources["limits"] = limits
    name = api_object_name(api.name)
    more: dict[str, Any] = {}
    volumes: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if compute.gpu:  # PyTorch and NCCL outgrow a container's 64 MB /dev/shm
        more["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}})
        extra["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists",
                                 "effect": "NoSchedule"}]
    container = _container("replica", image, ["worker", api.name, "--wait-for-deploy"],
                           resources, **more)
    grace = math.ceil(compute.timeout + STOP_GRACE_SECONDS)
    pod = _pod([container], volumes, grace=grace, extra=extra)
    return _deployment(name, "replica", namespace, pod, None)


def _seconds(value: float) -> int:
    return min(3600, math.ceil(value))  # the HPA's stabilization window is at most an hour


def _scaled_object(api: Api, namespace: str) -> dict[str, Any]:
    """KEDA scales the API's Deployment on queued + in-flight requests (what inferq's scaler
    acts on; the queue's length alone reads 0 while every request runs), and on CPU."""
    compute = api.compute
    name = api_object_name(api.name)
    spec: dict[str, Any] = {"scaleTargetRef": {"name": name},
                            "minReplicaCount": compute.min_replicas,
                            "maxReplicaCount": compute.max_replicas}
    if compute.min_replicas == 0:  # KEDA reads these only for scaling to and from zero
        spec["pollingInterval"] = 5
        spec["cooldownPeriod"] = _seconds(compute.downscale_stabilization_period)
    spec["advanced"] = {"horizontalPodAutoscalerConfig": {"behavior": {
        "scaleUp": {"stabilizationWindowSeconds": _seconds(compute.upscale_stabilization_period)},
        "scaleDown": {"stabilizationWindowSeconds":
                      _seconds(compute.downscale_stabilization_period)},
    }}}
    url = (f"http://{CONTROLLER}.{namespace}.svc:{CONTROLLER_PORT}/scaling/{api.name}")
    spec["triggers"] = [
        {"type": "metrics-api", "name": "queued-and-in-flight", "metricType": "AverageValue",
         "metadata": {"url": url, "format": "json", "valueLocation": "value",
                      "targetValue": "1"}},
        # Needs the cpu request (set on every replica); alone it could not scale from zero
        # (keda #4269): the trigger above does.
        {"type": "cpu", "name": "cpu", "metricType": "Utilization",
         "metadata": {"value": str(compute.target_cpu_utilization)}},
    ]
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": _metadata(name, "replica", namespace), "spec": spec}


def _redis(namespace: str) -> list[dict[str, Any]]:
    """A Redis with an append-only file on a PersistentVolumeClaim, its Service, and a
    NetworkPolicy that lets only inferq's pods in (``kubectl port-forward`` still works)."""
    labels = _labels(REDIS, "broker")
    policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _metadata(REDIS, "broker", namespace),
        "spec": {"podSelector": _selector(REDIS, "broker"), "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {
                     "app.kubernetes.io/part-of": "inferq"}}}],
                     "ports": [{"protocol": "TCP", "port": REDIS_PORT}]}]},
    }
    container = {
        "name": "redis", "image": REDIS_IMAGE,
        "args": ["redis-server", "--appendonly", "yes", "--dir", "/data",
                 "--protected-mode", "no"],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 10,
                          "failureThreshold": 6},
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    stateful = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": _metadata(REDIS, "broker", namespace),
        "spec": {
            "serviceName": REDIS, "replicas": 1, "selector": _selector(REDIS, "broker"),
            "template": {"metadata": {"labels": labels},
                         "spec": {"terminationGracePeriodSeconds": 60,
                                  "containers": [container]}},
            "volumeClaimTemplates": [{
                "metadata": {"name": "data", "labels": labels},
                "spec": {"accessModes": ["ReadWriteOnce"],
                         "resources": {"requests": {"storage": REDIS_STORAGE}}},
            }],
        },
    }
    return [policy, _service(REDIS, "broker", namespace, REDIS_PORT), stateful]
