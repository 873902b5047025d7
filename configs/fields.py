"""The cortex.yaml schema as tables: each key's converter, and which keys are required.

A converter takes a YAML value and the project folder and returns the resolved value, or
raises ``ValueError`` with a message that finishes ``cortex.yaml: api "x": key: ...``.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from inferq.configs.quantities import (
    describe,
    format_duration,
    parse_cpu,
    parse_duration,
    parse_mem,
)

Convert = Callable[[Any, Path], Any]
BAD = type("Bad", (), {"__repr__": lambda self: "BAD"})()  # marks a value with a problem
RESERVED_ENDPOINTS = ("/healthz", "/metrics")
# server_side_batching: a batch is one message and one predict_batch call, so it must fit a
# replica's memory; a caller waits out the interval before its request even leaves.
MAX_BATCH_SIZE = 1024
MAX_BATCH_INTERVAL = 60.0  # seconds

_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_ENDPOINT = re.compile(r"/[A-Za-z0-9._~/-]*")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class Invalid(ValueError):
    """A value that breaks the schema; its message finishes the problem's line."""


@dataclass(frozen=True)
class Schema:
    """The keys of one mapping: a converter or a nested schema each."""

    keys: dict[str, Convert | Schema]
    required: tuple[str, ...] = ()
    hints: dict[str, str] = field(default_factory=dict)  # what a missing required key holds
    ignored: tuple[str, ...] = ()  # keys checked elsewhere


# -- plain values -------------------------------------------------------------------------------


def integer(low: int, high: int | None = None) -> Convert:
    def convert(value: Any, root: Path) -> int:
        # bool is an int to Python, but "max_replicas: yes" is a typo, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"must be an integer, got {describe(value)}")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise Invalid(f"must be {bound}, got {value}")
        return value

    return convert


def string(value: Any, root: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be a non-empty string, got {describe(value)}")
    return value


def choice(*options: str) -> Convert:
    def convert(value: Any, root: Path) -> str:
        if value not in options:
            raise Invalid(f"must be one of {', '.join(options)}, got {describe(value)}")
        return value

    return convert


def quantity(parse: Callable[[Any], Any], minimum: str = "positive") -> Convert:
    """A cpu, mem or duration: ``minimum`` is "positive" (> 0) or "zero" (>= 0)."""

    def convert(value: Any, root: Path) -> Any:
        parsed = parse(value)
        if minimum == "positive" and not parsed > 0:
            raise Invalid(f"must be more than 0, got {describe(value)}")
        return parsed

    return convert


def duration(at_most: float) -> Convert:
    """A duration of more than 0 and at most ``at_most`` seconds."""
    positive = quantity(parse_duration)

    def convert(value: Any, root: Path) -> float:
        seconds = positive(value, root)
        if seconds > at_most:
            raise Invalid(f"must be at most {format_duration(at_most)}, got {describe(value)}")
        return seconds

    return convert


def metadata(value: Any, root: Path) -> dict[str, Any]:
    """A mapping of JSON values: it travels to replicas as JSON."""
    if not isinstance(value, dict):
        raise Invalid(f"must be a mapping of names to values, got {describe(value)}")
    _json_value(value, "")
    return dict(value)


def _json_value(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                # YAML 1.1 reads on/off/yes/no as booleans, a surprise in a mapping's keys.
                hint = f' (quote it: "{key}")' if not isinstance(key, bool) else " (quote it)"
                raise Invalid(f"{where}keys must be strings, got {describe(key)}{hint}")
            _json_value(item, f"{where}{key}: ")
    elif isinstance(value, list):
        for item in value:
            _json_value(item, where)
    elif not isinstance(value, (str, int, float, type(None))):
        # YAML reads 2019-10-01 as a date, which JSON cannot carry.
        raise Invalid(f"{where}{value} is a {type(value).__name__}, not a JSON value; quote it")


def is_name(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 63 and bool(_NAME.fullmatch(value))


def name(value: Any, root: Path) -> str:
    string(value, root)
    if not is_name(value):
        raise Invalid(
            f"{describe(value)} is not a valid name: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters "
            "(names become queue names)"
        )
    return value


def endpoint(value: Any, root: Path) -> str:
    string(value, root)
    if not value.startswith("/"):
        raise Invalid(f'{describe(value)} must start with "/"')
    if not _ENDPOINT.fullmatch(value):
        raise Invalid(f"{describe(value)} may hold only letters, digits, '-', '_', '.', '~' "
                         "and '/' (no spaces, query string or fragment)")
    if value.rstrip("/") == "":
        raise Invalid(f"{describe(value)} is the root; name a path such as /iris/classifier")
    for reserved in RESERVED_ENDPOINTS:
        if value.rstrip("/") == reserved or value.startswith(reserved + "/"):
            raise Invalid(f"{describe(value)} is reserved by the gateway ({reserved})")
    return value


# -- streams ------------------------------------------------------------------------------------

RESERVED_KEY_PREFIXES = ("inferq:", "inferq.")  # inferq's own keys and queues


def stream_key(value: Any, root: Path) -> str:
    """A Redis stream's key: any non-empty text outside inferq's own keys."""
    string(value, root)
    if value.startswith(RESERVED_KEY_PREFIXES):
        raise Invalid(f"{describe(value)} is under inferq's own keys (inferq: and inferq.); "
                      "name the stream otherwise")
    if value != value.strip():
        raise Invalid(f"{describe(value)} starts or ends with a space")
    return value


def redis_url(value: Any, root: Path) -> str:
    """``redis://[:password@]host[:port][/db]``, ``rediss://`` or ``unix://``."""
    string(value, root)
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise Invalid(f"{describe(redact_url(value))} is not a Redis URL (redis://host:6379/0, "
                      "rediss://... or unix://...)")
    if parts.scheme != "unix" and not parts.hostname:
        raise Invalid(f"{describe(redact_url(value))} names no host")
    try:
        parts.port  # noqa: B018  (raises on a port that is no number)
    except ValueError:
        raise Invalid(f"{describe(redact_url(value))} has a port that is no number") from None
    return value


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: for what is printed or logged."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# -- files and models ---------------------------------------------------------------------------


def inside(value: Any, root: Path) -> tuple[str, Path]:
    """The normalised project-relative posix path of ``value``, and that path on disk."""
    string(value, root)
    relative = posixpath.normpath(value)
    if posixpath.isabs(relative):
        raise Invalid(f"{describe(value)} must be relative to the project folder")
    outside = Invalid(f"{describe(value)} is outside the project folder")
    if relative == ".." or relative.startswith("../"):
        raise outside
    path = root / relative
    # A symlink out of the project would not travel with the bundle.
    if not path.resolve().is_relative_to(root.resolve()):
        raise outside
    return relative, path


def project_file(suffix: str, noun: str) -> Convert:
    def convert(value: Any, root: Path) -> str:
        relative, path = inside(value, root)
        if not relative.endswith(suffix):
            raise Invalid(f"{describe(value)} is not {noun} (a {suffix} file)")
        _exists(value, path, folder=False)
        return relative

    return convert


def folder(value: Any, root: Path) -> str:
    relative, path = inside(value, root)
    _exists(value, path, folder=True)
    return relative


def model(suffix: str | None = None) -> Convert:
    """An ``s3://bucket/key`` URL or a project path (a file or a folder), kept as given."""

    def convert(value: Any, root: Path) -> str:
        string(value, root)
        if value.startswith("s3://"):
            key = _s3_key(value)
            if suffix and not key.endswith(suffix):
                raise Invalid(f"{describe(value)} is not a {suffix} file")
            return value
        if "://" in value:
            raise Invalid(f"{describe(value)} must be s3://bucket/key or a path inside the "
                             "project folder")
        relative, path = inside(value, root)
        if suffix and not relative.endswith(suffix):
            raise Invalid(f"{describe(value)} is not a {suffix} file")
        _exists(value, path, folder=None if suffix is None else False)
        return relative

    return convert


def _exists(value: str, path: Path, folder: bool | None) -> None:
    """Raise unless ``path`` is a folder (True), a file (False) or either (None)."""
    if not path.exists():
        raise Invalid(f"{describe(value)} does not exist (paths are relative to the folder "
                         "of cortex.yaml)")
    if folder is True and not path.is_dir():
        raise Invalid(f"{describe(value)} is a file, not a folder")
    if folder is False and not path.is_file():
        raise Invalid(f"{describe(value)} is a folder, not a file")


def _s3_key(url: str) -> str:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _is_ip(bucket):
        raise Invalid(f'{describe(url)}: "{bucket}" is not a valid S3 bucket name '
                         "(3-63 lowercase letters, digits, '.' and '-')")
    if not key:
        raise Invalid(f"{describe(url)} names no key: use s3://bucket/key for a file or "
                         "s3://bucket/prefix/ for a folder")
    return key


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- the tables ---------------------------------------------------------------------------------

DEPLOYMENT = Schema({"name": name}, required=("name",), hints={"name": "the deployment's name"},
                    ignored=("kind",))

SERVER_SIDE_BATCHING = Schema(
    {"max_batch_size": integer(1, MAX_BATCH_SIZE),
     "batch_interval": duration(at_most=MAX_BATCH_INTERVAL)},
    required=("max_batch_size", "batch_interval"),
    hints={"max_batch_size": f"the most requests in one batch, 1 to {MAX_BATCH_SIZE}",
           "batch_interval": "how long a batch gathers requests, e.g. 100ms"},
)

PREDICTOR = Schema(
    {"path": project_file(".py", "a Python file"), "model": model(), "python_path": folder,
     "metadata": metadata, "server_side_batching": SERVER_SIDE_BATCHING},
    required=("path",),
    hints={"path": "the predictor file, relative to the project folder"},
)

ONNX = Schema(
    {"model": model(".onnx"), "request_handler": project_file(".py", "a Python file"),
     "python_path": folder, "metadata": metadata},
    required=("model",),
    hints={"model": "s3://bucket/key.onnx or a project path to a .onnx file"},
)

TRACKER = Schema(
    {"key": string, "model_type": choice("classification", "regression")},
    required=("model_type",),
    hints={"model_type": "classification or regression"},
)

COMPUTE = Schema({
    "min_replicas": integer(0),
    "max_replicas": integer(1),
    "init_replicas": integer(0),
    "target_cpu_utilization": integer(1, 100),
    "cpu": quantity(parse_cpu),
    "gpu": integer(0),
    "mem": quantity(parse_mem),
    "timeout": quantity(parse_duration),
    "max_queue_length": integer(1),
    "upscale_stabilization_period": quantity(parse_duration, minimum="zero"),
    "downscale_stabilization_period": quantity(parse_duration, minimum="zero"),
    "async_retention": quantity(parse_duration),
})

STREAM = Schema(
    {"source": stream_key, "sink": stream_key, "url": redis_url, "start": choice("new", "all"),
     "field": string, "sink_max_len": integer(1)},
    required=("source",),
    hints={"source": "the key of the Redis stream the samples arrive on"},
)

API = Schema(
    {"name": name, "endpoint": endpoint, "predictor": PREDICTOR, "onnx": ONNX,
     "tracker": TRACKER, "compute": COMPUTE, "stream": STREAM},
    required=("name",),
    hints={"name": "the API's name"},
    ignored=("kind", "tensorflow"),
)
