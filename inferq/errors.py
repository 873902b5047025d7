"""The one error hierarchy of inferq.

Every error a user can meet derives from :class:`InferqError`; each subclass is a kind of
failure a caller may want to tell apart (and the gateway maps to an HTTP status). Messages name
what was wrong and where: the API, the file or the field.

This module imports nothing, so every package (``configs`` included) may raise these.
"""

from __future__ import annotations


class InferqError(Exception):
    """Root of every inferq error."""


class ConfigError(InferqError):
    """A project (cortex.yaml, its files) is invalid; ``problems`` lists every problem."""

    def __init__(self, problems: list) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class BundleTooLarge(ConfigError):
    """The project folder is over the bundle limits (its size, or its number of files)."""


class DeployError(InferqError):
    """A valid project cannot be deployed (e.g. an API name taken by another deployment)."""


class BrokerUnavailable(InferqError):
    """No broker is configured or running, or it does not answer."""


class UnknownAPI(InferqError):
    """No API of that name (or endpoint) is deployed."""


class PredictorError(InferqError):
    """A predictor cannot be loaded: import error, contract violation, init() raised.

    ``kind`` is how the replica's failure is recorded, and the API's status says it:
    ``error``, or ``error (requirements)`` for :class:`RequirementsError`.
    """

    kind = "error"


class RequirementsError(PredictorError):
    """The project's requirements.txt could not be installed (the installer's last lines)."""

    kind = "requirements"


class PredictionError(InferqError):
    """A prediction failed: predict() raised, or its replica died while predicting.

    ``api`` names the API, ``index`` the sample's position in a batch (or None).
    """

    def __init__(self, message: str, *, api: str | None = None, index: int | None = None):
        self.api = api
        self.index = index
        self.reason = message
        super().__init__(_located(message, api, index))


class PredictionTimeout(PredictionError):
    """No replica answered within the API's timeout."""


class ApiUnavailable(InferqError):
    """An API cannot serve a request now: no replica of it is live, and its status says none
    will be soon (``error``, ``error (out of memory)``, ``error (requirements)``, ``compute
    unavailable``), or no scaler runs to start one. ``status`` and ``reason`` say why;
    ``retry_after`` is when trying again may help (seconds). Nothing was queued."""

    def __init__(self, message: str, *, api: str, status: str | None, reason: str | None,
                 retry_after: int = 5) -> None:
        self.api = api
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(message)


class UnknownRequest(InferqError):
    """No async request has that id (never queued, or past its API's ``async_retention``)."""


class JobError(InferqError):
    """A batch job cannot be submitted, resumed or go on: its input or output cannot be read
    or written, or the job or its API is unknown. The message names the job and the place."""


class RequestWithdrawn(InferqError):
    """A request was taken off its queue because its caller went away."""


class InvalidSample(InferqError, ValueError):
    """A sample cannot travel as JSON (not serialisable, or nested too deep); nothing was queued.

    ``api`` names the API, ``index`` the sample's position in ``Client.map`` (or None).
    """

    def __init__(self, message: str, *, api: str | None = None, index: int | None = None):
        self.api = api
        self.index = index
        self.reason = message
        super().__init__(_located(message, api, index))


class QueueFull(InferqError):
    """The API's queue holds more requests than its ``max_queue_length``."""

    def __init__(self, message: str, retry_after: int = 1):
        self.retry_after = retry_after
        super().__init__(message)


class ModelDownloadError(PredictorError):
    """A model could not be fetched (missing bucket or key, access denied, ...)."""


def _located(message: str, api: str | None, index: int | None) -> str:
    """``api "x", sample 3: message``: where a sample's problem happened, when known."""
    where = f'api "{api}"' if api else ""
    if index is not None:
        where += f", sample {index}" if where else f"sample {index}"
    return f"{where}: {message}" if where else message


def some_of(names: list[str], shown: int = 10) -> str:
    """``a, b, c and 7 more``: what is deployed, in a message that stays one line however
    many APIs there are (a 404 must not list ten thousand endpoints to every caller)."""
    if not names:
        return "none"
    listed = ", ".join(names[:shown])
    return f"{listed} and {len(names) - shown} more" if len(names) > shown else listed
