"""Serving an exported ONNX model the way Cortex v0.11's ``onnx_serve/api.py`` did.

Per request: ``pre_inference(sample, signature, metadata)`` (optional, ``signature`` is the
session's inputs) -> each input converted to a numpy array of its declared type and shape ->
``sess.run([], inputs)`` -> ``post_inference(prediction, signature, metadata)`` (optional,
``signature`` is the session's outputs). Request handlers written for v0.11 run unchanged.

onnxruntime is imported here only, so Python-predictor replicas never load it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from inferq.errors import PredictionError, PredictorError
from inferq.workers.predictor import check_callable

log = logging.getLogger("inferq.onnx")

# v0.11's ONNX_TO_NP_TYPE (from onnxruntime's onnxruntime_pybind_mlvalue.cc), kept as is.
ONNX_TO_NP_TYPE: dict[str, str] = {
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}

# Ask for CUDA where this onnxruntime build has it (a GPU replica is pinned to its GPUs by
# CUDA_VISIBLE_DEVICES); other providers (e.g. Azure) are not for local inference.
_PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxPredictor:
    """An ONNX model in an onnxruntime session, with an optional v0.11 request handler.

    Parameters: ``model_path`` the local ``.onnx`` file; ``handler`` the imported request
    handler module (or None); ``metadata`` the API's ``onnx.metadata``; ``api`` the API name
    (for errors); ``handler_label`` / ``model_label`` how files are named in errors
    (default: their file names).
    """

    def __init__(self, model_path: Path | str, handler: ModuleType | None,
                 metadata: dict[str, Any], *, api: str, handler_label: str | None = None,
                 model_label: str | None = None) -> None:
        self.api = api
        self.metadata = metadata
        self.model_path = Path(model_path)
        self.model_label = model_label or self.model_path.name
        self.handler_label = handler_label or _file_name(handler)
        self._pre: Callable[..., Any] | None = None
        self._post: Callable[..., Any] | None = None
        if handler is not None:
            # v0.11 called each of them only if defined (util.has_function); both are optional.
            self._pre = check_callable(handler, "pre_inference",
                                       ("sample", "signature", "metadata"),
                                       label=self.handler_label, required=False)
            self._post = check_callable(handler, "post_inference",
                                        ("prediction", "signature", "metadata"),
                                        label=self.handler_label, required=False)
        self.session = _load_session(self.model_path, self.model_label)
        # v0.11 read the signature once at start and passed the same lists to every call.
        self.inputs = self.session.get_inputs()
        self.outputs = self.session.get_outputs()
        for arg in self.inputs:
            if arg.type not in ONNX_TO_NP_TYPE:
                raise PredictorError(
                    f'{self.model_label}: input "{arg.name}" has type {arg.type}; only tensor '
                    f"inputs can be served ({', '.join(ONNX_TO_NP_TYPE)})"
                )

    def predict(self, sample: Any) -> Any:
        """Run one request's ``sample`` through the handler and the model."""
        prepared = sample
        if self._pre is not None:
            prepared = self._call_handler(self._pre, "pre_inference", sample, self.inputs)
        feed = self.to_onnx_input(prepared)
        try:
            outputs = self.session.run([], feed)
        except Exception as exc:
            raise PredictionError(
                f"{self.model_label}: onnxruntime could not run the model: {exc}", api=self.api
            ) from exc
        if self._post is not None:
            # v0.11 handed post_inference the raw sess.run() list (numpy arrays included).
            return self._call_handler(self._post, "post_inference", outputs, self.outputs)
        # Without a handler v0.11 answered the list of outputs, numpy arrays as plain lists.
        return [out.tolist() if isinstance(out, np.ndarray) else out for out in outputs]

    def to_onnx_input(self, sample: Any) -> dict[str, np.ndarray]:
        """The session's input feed for ``sample`` (v0.11's ``convert_to_onnx_input``).

        One input: the sample itself, or a dict holding it under the input's name. Several
        inputs: a dict keyed by input names.
        """
        names = [arg.name for arg in self.inputs]
        if len(self.inputs) == 1 and not isinstance(sample, dict):
            return {names[0]: self._to_numpy(sample, self.inputs[0])}
        if not isinstance(sample, dict):
            raise PredictionError(
                f"expected the sample to be a dictionary with keys {_quoted(names)}, "
                f"got {type(sample).__name__}", api=self.api,
            )
        # v0.11 tested sample.get(name) is None, so a null value counts as missing too.
        missing = [name for name in names if sample.get(name) is None]
        if missing:
            word = "key" if len(missing) == 1 else "keys"
            raise PredictionError(
                f"missing {word} {_quoted(missing)} (the model's inputs are {_quoted(names)})",
                api=self.api,
            )
        return {arg.name: self._to_numpy(sample[arg.name], arg) for arg in self.inputs}

    def _to_numpy(self, value: Any, arg: Any) -> np.ndarray:
        """``value`` as an array of ``arg``'s type and shape (v0.11's ``transform_to_numpy``)."""
        dtype = ONNX_TO_NP_TYPE[arg.type]
        # v0.11: every dimension that is not an int (None, or symbolic like "batch") becomes 1,
        # so one request carries one sample, and the array is always reshaped to that shape.
        shape = tuple(dim if type(dim) is int else 1 for dim in arg.shape)
        where = f'input "{arg.name}" ({arg.type}, shape {_shape(arg.shape)})'
        if isinstance(value, np.ndarray):
            # v0.11 cast arrays returned by pre_inference only between numeric kinds.
            if np.issubdtype(value.dtype, np.number) != np.issubdtype(np.dtype(dtype), np.number):
                raise PredictionError(
                    f"{where}: expected dtype {dtype} but found {value.dtype}", api=self.api
                )
            array = value.astype(dtype, copy=False)
        else:
            try:
                array = np.array(value, dtype=dtype)
            except (TypeError, ValueError, OverflowError) as exc:
                raise PredictionError(
                    f"{where}: cannot convert the value to {dtype}: {exc}", api=self.api
                ) from exc
        try:
            return array.reshape(shape)
        except ValueError:
            raise PredictionError(
                f"{where}: got {array.size} value(s) of shape {_shape(array.shape)}, which do not "
                f"fit shape {_shape(shape)} (unknown dimensions are 1: one sample per request)",
                api=self.api,
            ) from None

    def _call_handler(self, func: Callable[..., Any], name: str, value: Any,
                      signature: list[Any]) -> Any:
        try:
            return func(value, signature, self.metadata)
        except Exception as exc:
            # Like v0.11's UserRuntimeException: say which handler function failed.
            log.exception('api "%s": %s: %s() raised', self.api, self.handler_label, name)
            raise PredictionError(
                f"{self.handler_label}: {name}() raised {type(exc).__name__}: {exc}", api=self.api
            ) from exc


def _load_session(path: Path, label: str) -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise PredictorError(
            f"{label}: serving ONNX models needs onnxruntime: pip install 'inferq[onnx]' "
            "(or pip install onnxruntime)"
        ) from exc
    available = onnxruntime.get_available_providers()
    providers = [p for p in _PREFERRED_PROVIDERS if p in available] or available
    try:
        return onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as exc:
        raise PredictorError(
            f"{label}: onnxruntime cannot load it as an ONNX model ({path}): {exc}"
        ) from exc


def _file_name(module: ModuleType | None) -> str:
    file = getattr(module, "__file__", None)
    return Path(file).name if file else "request handler"


def _quoted(names: list[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def _shape(shape: Any) -> str:
    return "[" + ", ".join("None" if dim is None else str(dim) for dim in shape) + "]"
