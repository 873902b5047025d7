"""The resolved spec written back as a cortex.yaml (what ``inferq deploy --dry-run`` prints)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import yaml

from inferq.configs.fields import redact_url
from inferq.configs.quantities import format_cpu, format_duration, format_mem
from inferq.configs.spec import Api, Compute, Deployment, Predictor

_DURATIONS = ("timeout", "upscale_stabilization_period", "downscale_stabilization_period",
              "async_retention")


def to_yaml(deployment: Deployment) -> str:
    """A cortex.yaml with every default filled in; loading it again gives an equal spec (but
    for a stream URL's password, shown as ``***``)."""
    resources: list[dict[str, Any]] = [{"kind": "deployment", "name": deployment.name}]
    resources += [_api(api) for api in deployment.apis]
    return yaml.safe_dump(resources, sort_keys=False, default_flow_style=False,
                          allow_unicode=True)


def api_yaml(api: Api) -> str:
    """One API as its resolved cortex.yaml resource (what ``inferq get API_NAME`` shows)."""
    return yaml.safe_dump(_api(api), sort_keys=False, default_flow_style=False,
                          allow_unicode=True)


def _api(api: Api) -> dict[str, Any]:
    # Key order follows the v0.11 docs, not the alphabet: kind, name, endpoint, then sections.
    data: dict[str, Any] = {"kind": "api", "name": api.name, "endpoint": api.endpoint}
    if api.predictor is not None:
        data["predictor"] = _predictor(api.predictor)
    if api.onnx is not None:
        data["onnx"] = asdict(api.onnx)
    data["tracker"] = asdict(api.tracker) if api.tracker is not None else None
    data["compute"] = _compute(api.compute)
    if api.stream is not None:  # an extension: shown only when set
        data["stream"] = asdict(api.stream)
        if api.stream.url is not None:
            data["stream"]["url"] = redact_url(api.stream.url)  # never print a password
    return data


def _predictor(predictor: Predictor) -> dict[str, Any]:
    data = asdict(predictor)  # server_side_batching: null when unset, like every default
    if predictor.server_side_batching is not None:
        interval = predictor.server_side_batching.batch_interval
        data["server_side_batching"]["batch_interval"] = format_duration(interval)
    return data


def _compute(compute: Compute) -> dict[str, Any]:
    data = asdict(compute)
    data["cpu"] = format_cpu(compute.cpu)
    data["mem"] = format_mem(compute.mem) if compute.mem is not None else None
    for key in _DURATIONS:
        data[key] = format_duration(data[key])
    return data
