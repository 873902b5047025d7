"""inferq: Cortex-style model serving on Celery workers, a Redis queue and a Flask gateway."""

from inferq.errors import (
    ApiUnavailable,
    BrokerUnavailable,
    ConfigError,
    InferqError,
    InvalidSample,
    JobError,
    PredictionError,
    PredictionTimeout,
    QueueFull,
    UnknownAPI,
    UnknownRequest,
)

__version__ = "0.1.0"

__all__ = [
    "ApiUnavailable",
    "BrokerUnavailable",
    "Client",
    "ConfigError",
    "InferqError",
    "InvalidSample",
    "JobError",
    "PredictionError",
    "PredictionTimeout",
    "QueueFull",
    "UnknownAPI",
    "UnknownRequest",
    "__version__",
]


def __getattr__(name: str):
    # The client pulls in celery and redis; importing inferq.errors (as configs/ does) must not.
    if name == "Client":
        from inferq.client import Client

        return Client
    raise AttributeError(f"module 'inferq' has no attribute {name!r}")
