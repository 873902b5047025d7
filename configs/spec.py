"""The resolved spec of a project: frozen dataclasses with every default filled in.

``inferq.configs.load_project`` builds these from a ``cortex.yaml``; after that no code looks up
config keys in dicts. Quantities are exact integers: cpu in millicores, mem in bytes.
Durations are float seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

ModelType = Literal["classification", "regression"]


@dataclass(frozen=True)
class ServerSideBatching:
    """Dynamic batching at the gateway: concurrent requests travel to a replica together.

    Requests that arrive within ``batch_interval`` seconds of the first, up to
    ``max_batch_size`` of them, go as one message and reach ``predict_batch`` at once.
    """

    max_batch_size: int
    batch_interval: float  # seconds


@dataclass(frozen=True)
class Predictor:
    """A Python predictor: ``path`` holds ``init(model_path, metadata)`` and ``predict``."""

    path: str  # relative to the project root
    model: str | None = None  # s3://bucket/key[/] or a project-relative path
    python_path: str = "."  # relative to the project root
    metadata: dict[str, Any] = field(default_factory=dict)
    # Extension (an optional key; every v0.11 file stays valid):
    server_side_batching: ServerSideBatching | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Predictor:
        """A predictor from its keys, ``server_side_batching`` as a mapping or absent."""
        batching = data.get("server_side_batching")
        return cls(**{**data, "server_side_batching":
                      ServerSideBatching(**batching) if batching is not None else None})


@dataclass(frozen=True)
class Onnx:
    """An ONNX model served with onnxruntime, with an optional request handler."""

    model: str  # s3://... or a project-relative path to a .onnx file
    request_handler: str | None = None  # relative to the project root
    python_path: str = "."
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tracker:
    """Cortex's prediction monitoring: which value of a response to count, and how."""

    model_type: ModelType
    key: str | None = None


@dataclass(frozen=True)
class Stream:
    """A Redis stream the API consumes, and the stream its answers go to (an extension)."""

    source: str  # the stream's key
    sink: str  # where answers are added (default: <source>:predictions)
    url: str | None = None  # the Redis of both streams (None: the broker's)
    start: Literal["new", "all"] = "new"  # where a new consumer group starts
    field: str = "data"  # the entry field that holds the sample as JSON
    sink_max_len: int = 1_000_000  # the sink is trimmed to about this many entries

    @property
    def dead_letter(self) -> str:
        """Where samples that failed go too: ``<sink>:failed``."""
        return f"{self.sink}:failed"

    def group(self, api: str) -> str:
        """The consumer group of ``api`` on the source."""
        return f"inferq:{api}"


ASYNC_RETENTION = 24 * 3600.0


@dataclass(frozen=True)
class Compute:
    """Compute bounds of one API (Cortex v0.11 keys first, then inferq's extension keys)."""

    min_replicas: int = 1
    max_replicas: int = 100
    init_replicas: int = 1
    target_cpu_utilization: int = 80  # percent of the cpu request
    cpu: int = 200  # millicores per replica
    gpu: int = 0  # GPUs per replica
    mem: int | None = None  # bytes per replica
    # Extensions (optional keys; every v0.11 file stays valid):
    timeout: float = 60.0  # seconds a request waits for a replica's answer (504 after)
    max_queue_length: int = 1024  # queued requests over which the gateway answers 503
    upscale_stabilization_period: float = 0.0  # seconds a higher need must last to scale up
    downscale_stabilization_period: float = 30.0  # seconds a lower need must last to scale down
    async_retention: float = ASYNC_RETENTION  # seconds an async request and its result are kept


@dataclass(frozen=True)
class Api:
    """One API of a deployment. Exactly one of ``predictor`` and ``onnx`` is set."""

    name: str
    deployment: str
    endpoint: str
    compute: Compute
    predictor: Predictor | None = None
    onnx: Onnx | None = None
    tracker: Tracker | None = None
    stream: Stream | None = None  # an extension

    @property
    def kind(self) -> str:
        return "predictor" if self.predictor is not None else "onnx"

    @property
    def onnx_spec(self) -> Onnx:
        """The ``onnx`` section of an API that has no predictor (validation made it so)."""
        if self.onnx is None:
            raise ValueError(f'api "{self.name}" is a Python predictor, not an ONNX model')
        return self.onnx

    def to_dict(self) -> dict[str, Any]:
        """The API as plain data (what the registry stores and ``--dry-run`` prints)."""
        data = asdict(self)
        for key in ("predictor", "onnx", "tracker", "stream"):
            if data[key] is None:
                del data[key]
        # Left out when unset, so the version of an API without it (a hash of this) is what it
        # was before the key existed: an unchanged project stays unchanged across an upgrade.
        predictor = data.get("predictor")
        if predictor is not None and predictor["server_side_batching"] is None:
            del predictor["server_side_batching"]
        if data["compute"]["async_retention"] == ASYNC_RETENTION:
            del data["compute"]["async_retention"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Api:
        """Rebuild an API from :meth:`to_dict`'s output (trusted: it was validated before)."""
        return cls(
            name=data["name"],
            deployment=data["deployment"],
            endpoint=data["endpoint"],
            compute=Compute(**data["compute"]),
            predictor=Predictor.from_dict(data["predictor"]) if data.get("predictor") else None,
            onnx=Onnx(**data["onnx"]) if data.get("onnx") else None,
            tracker=Tracker(**data["tracker"]) if data.get("tracker") else None,
            stream=Stream(**data["stream"]) if data.get("stream") else None,
        )


@dataclass(frozen=True)
class Deployment:
    """A validated project: its deployment name, its APIs and where it lives on disk."""

    name: str
    apis: tuple[Api, ...]
    project_dir: Path
    config_file: Path

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "apis": [api.to_dict() for api in self.apis]}
