"""The cortex.yaml spec: parsing, defaults, validation and Kubernetes quantities.

This package depends on nothing else of inferq but :mod:`inferq.errors` (a leaf module).
"""

from inferq.configs.fields import redact_url
from inferq.configs.loader import Problem, load_project
from inferq.configs.quantities import format_cpu, format_mem, parse_cpu, parse_duration, parse_mem
from inferq.configs.render import api_yaml, to_yaml
from inferq.configs.spec import (
    Api,
    Compute,
    Deployment,
    Onnx,
    Predictor,
    ServerSideBatching,
    Stream,
    Tracker,
)

__all__ = [
    "Api",
    "Compute",
    "Deployment",
    "Onnx",
    "Predictor",
    "Problem",
    "ServerSideBatching",
    "Stream",
    "Tracker",
    "api_yaml",
    "format_cpu",
    "format_mem",
    "load_project",
    "parse_cpu",
    "parse_duration",
    "parse_mem",
    "redact_url",
    "to_yaml",
]
