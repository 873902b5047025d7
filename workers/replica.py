"""One replica of one API: bootstrap, then one prediction at a time.

Bootstrap is a short sequence of named steps, run in the process that serves predictions
(never in a parent that forks afterwards: CUDA does not survive a fork, celery #3402):

    resolve the API -> fetch its bundle -> install its requirements.txt (once per host)
    -> python_path on sys.path -> the project's folder as working directory
    -> fetch the model -> import the predictor and run init() -> live

Each step that fails raises :class:`PredictorError` with the file and traceback; the replica
is then marked ``error`` in the registry, with the error's ``kind`` (``requirements`` for a
failed install) as its ``failure``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from inferq import stack
from inferq.bundle import unpack
from inferq.configs import Api
from inferq.errors import PredictionError, PredictorError, UnknownAPI
from inferq.messages import Command, Outcome
from inferq.registry import DeployedApi, FailureKind, Registry, ReplicaStatus, Telemetry
from inferq.workers import requirements
from inferq.workers.models import fetch_model
from inferq.workers.predictor import PythonPredictor, import_file
from inferq.workers.tracker import PredictionTracker

log = logging.getLogger("inferq.replica")


class Replica:
    """A loaded predictor of one deployed API, ready to predict."""

    def __init__(self, deployed: DeployedApi, predictor: Any, replica: str, project: Path,
                 tracker: PredictionTracker | None = None) -> None:
        self.deployed = deployed
        self.api: Api = deployed.api
        self.predictor = predictor
        self.id = replica
        self.project = project  # the unpacked project folder (the working directory)
        self._predicted = self._failed = 0  # samples predicted since the last take_tracking
        self.tracker = tracker
        self._batch_failed_once = False

    def predict(self, sample: Any, *, debug: bool = False) -> Any:
        """``predict(sample)`` as JSON-compatible data; PredictionError when it fails."""
        if debug:
            log.info('api "%s": debug: sample: %s', self.api.name, _short(sample))
        started = time.perf_counter()
        try:
            prediction = self.predictor.predict(sample)
        except PredictionError:
            raise
        except Exception as exc:
            log.exception('api "%s": predict() raised', self.api.name)
            raise PredictionError(_describe(exc), api=self.api.name) from exc
        return self._answer(prediction, debug, started)

    def predict_many(self, samples: list[Any], *, debug: bool = False) -> list[Outcome]:
        """Each sample's prediction or error, in order: with ``predict_batch`` in one call
        when the predictor has it, else ``predict`` per sample. A sample that fails fails
        alone (when ``predict_batch`` raises, each sample is predicted alone to tell which)."""
        outcomes = self._predict_many(samples, debug)
        self._predicted += len(outcomes)
        self._failed += sum(1 for o in outcomes if o.error is not None)
        return outcomes

    def _predict_many(self, samples: list[Any], debug: bool) -> list[Outcome]:
        if not getattr(self.predictor, "batches", False) or len(samples) < 2:
            return [self._one(sample, debug) for sample in samples]
        if debug:
            for sample in samples:
                log.info('api "%s": debug: sample: %s', self.api.name, _short(sample))
        started = time.perf_counter()
        try:
            predictions = self.predictor.predict_batch(samples)
        except Exception:
            if not self._batch_failed_once:
                self._batch_failed_once = True
                log.exception('api "%s": predict_batch() raised; predicting each sample alone '
                              "to find which failed (logged once)", self.api.name)
            return [self._one(sample, debug) for sample in samples]
        problem = _batch_problem(predictions, len(samples))
        if problem is not None:
            log.error('api "%s": %s', self.api.name, problem)
            return [Outcome(error=problem) for _ in samples]
        return [self._converted(p, debug, started) for p in predictions]

    def take_tracking(self) -> list[Command]:
        """The Redis commands that count and track the predictions made since the last call
        (sent with the acknowledgement of the message they answer)."""
        commands = Telemetry.count_commands(self.api.name, self._predicted, self._failed)
        self._predicted = self._failed = 0
        return commands + (self.tracker.take_commands() if self.tracker is not None else [])

    def _one(self, sample: Any, debug: bool) -> Outcome:
        try:
            return Outcome(result=self.predict(sample, debug=debug))
        except PredictionError as exc:
            return Outcome(error=exc.reason)

    def _converted(self, prediction: Any, debug: bool, started: float) -> Outcome:
        try:
            return Outcome(result=self._answer(prediction, debug, started))
        except PredictionError as exc:
            return Outcome(error=exc.reason)

    def _answer(self, prediction: Any, debug: bool, started: float) -> Any:
        try:
            prediction = to_jsonable(prediction, api=self.api.name)
        except RecursionError:  # uncaught, the caller would get no reply and wait out its timeout
            raise PredictionError(
                "the prediction nests too deep to be sent as JSON (keep it to a few hundred "
                "levels)", api=self.api.name,
            ) from None
        if self.tracker is not None:
            self.tracker.track(prediction)
        if debug:
            log.info('api "%s": debug: prediction: %s (%.1f ms)', self.api.name,
                     _short(prediction), (time.perf_counter() - started) * 1000)
        return prediction


def _batch_problem(predictions: Any, expected: int) -> str | None:
    """Why ``predict_batch``'s result cannot answer ``expected`` samples, or None."""
    if isinstance(predictions, (str, bytes, dict)) or not hasattr(predictions, "__len__"):
        return (f"predict_batch() returned {type(predictions).__name__}, not a list of "
                f"{expected} predictions")
    if len(predictions) != expected:
        return f"predict_batch() returned {len(predictions)} predictions for {expected} samples"
    return None


def bootstrap(api_name: str, registry: Registry, replica: str) -> Replica:
    """Load ``api_name`` as deployed now and return a live replica (see the module doc)."""
    os.environ["INFERQ_HOME"] = str(stack.home())  # absolute, before the working dir changes
    deployed = resolve(api_name, registry)
    registry.replicas.update(
        api_name, replica, status=ReplicaStatus.CREATING, host=stack.host_name(),
        pid=os.getpid(),  # the process that predicts (the serving process)
        replica_pid=os.getppid(),  # its supervisor: the replica itself
        version=deployed.version, error=None,
    )
    try:
        project = fetch_bundle(deployed, registry)
        install_requirements(project, api_name, registry, replica)
        add_python_path(project, deployed.api)
        os.chdir(project)  # the predictor opens its project's files by relative path
        predictor = load_predictor(deployed.api, project)
    except PredictorError as exc:
        registry.replicas.update(api_name, replica, status=ReplicaStatus.ERROR, error=str(exc),
                                 failure=FailureKind(exc.kind), detail=None)
        raise
    registry.replicas.update(api_name, replica, status=ReplicaStatus.LIVE, live_at=time.time(),
                             detail=None)
    log.info('api "%s": replica %s is live (version %s)', api_name, replica, deployed.version)
    tracker = deployed.api.tracker
    return Replica(
        deployed, predictor, replica, project,
        PredictionTracker(api_name, tracker) if tracker is not None else None,
    )


def resolve(api_name: str, registry: Registry) -> DeployedApi:
    deployed = registry.deployments.api(api_name)
    if deployed is None:
        raise UnknownAPI(f'no API named "{api_name}" is deployed')
    return deployed


def fetch_bundle(deployed: DeployedApi, registry: Registry) -> Path:
    """The deployed project folder, unpacked once per host from the registry's bundle."""
    cached = stack.cache_dir("bundles") / deployed.bundle
    if cached.is_dir():
        return cached
    data = registry.deployments.get_bundle(deployed.bundle)
    if data is None:
        raise PredictorError(
            f'api "{deployed.name}": bundle {deployed.bundle[:12]} is missing from the registry; '
            "deploy the project again"
        )
    return unpack(data, deployed.bundle, stack.cache_dir("bundles"))


def install_requirements(project: Path, api_name: str, registry: Registry, replica: str) -> None:
    """The project's requirements.txt, installed on this host once, ahead on ``sys.path``.

    While it installs (or waits for another replica installing it), the replica's record
    says so: ``creating``, detail "installing requirements".
    """
    def installing() -> None:
        registry.replicas.update(api_name, replica, detail=requirements.INSTALLING)

    folder = requirements.prepare(project, api=api_name, on_install=installing)
    if folder is not None:
        requirements.activate(folder)


def add_python_path(project: Path, api: Api) -> None:
    python_path = api.predictor.python_path if api.predictor else api.onnx_spec.python_path
    folder = str((project / python_path).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)


def load_predictor(api: Api, project: Path) -> Any:
    """Fetch the model, import the predictor (or request handler) and run ``init``."""
    if api.predictor is not None:
        spec = api.predictor
        model_path = _model(api, spec.model, project) if spec.model else None
        return PythonPredictor(
            project / spec.path, label=spec.path, model_path=model_path, metadata=spec.metadata
        )
    from inferq.workers.onnx import (
        OnnxPredictor,  # onnxruntime is heavy: only ONNX replicas load it
    )

    onnx = api.onnx_spec
    handler = None
    if onnx.request_handler:
        handler = import_file(project / onnx.request_handler, label=onnx.request_handler)
    return OnnxPredictor(
        _model(api, onnx.model, project), handler, onnx.metadata, api=api.name,
        handler_label=onnx.request_handler, model_label=onnx.model,
    )


def _model(api: Api, model: str, project: Path) -> Path:
    return fetch_model(model, project, stack.cache_dir("models"), api=api.name)


def to_jsonable(value: Any, *, api: str, where: str = "prediction") -> Any:
    """``value`` as plain JSON data: numpy scalars and arrays become numbers and lists.

    Anything else that JSON cannot carry fails with a message naming where it was found.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if value.bit_length() > 10_000:  # near Python's 4300-digit limit of int -> text
            _check_writable(value, api=api, where=where)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PredictionError(f"{where} is {value}, which JSON cannot carry", api=api)
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and not _is_numpy_scalar(key):
                raise PredictionError(
                    f"{where} has a key of type {type(key).__name__}; JSON keys are strings",
                    api=api,
                )
            name = str(key.item() if _is_numpy_scalar(key) else key)
            out[name] = to_jsonable(item, api=api, where=f"{where}[{name!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, api=api, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if _is_numpy_scalar(value) or type(value).__name__ == "ndarray":
        return to_jsonable(value.tolist(), api=api, where=where)
    raise PredictionError(
        f"{where} is not JSON-serialisable: {type(value).__module__}.{type(value).__qualname__}"
        " (return dicts, lists, strings, numbers, booleans or None; numpy values are converted)",
        api=api,
    )


def _check_writable(number: int, *, api: str, where: str) -> None:
    # Otherwise the reply (or the tracker) would fail writing it, and no answer would be sent.
    try:
        str(number)
    except ValueError as exc:
        raise PredictionError(f"{where} is an integer JSON cannot carry: {exc}", api=api) from None


def _is_numpy_scalar(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.generic)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


def _short(value: Any, limit: int = 2000) -> str:
    import json

    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
