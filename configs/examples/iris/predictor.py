"""Cortex-style predictor for the iris classifier (numpy only, no scikit-learn).

``init(model_path, metadata)`` runs once per replica and loads ``model.json`` (written by
``train.py``) into module globals; ``predict(sample, metadata)`` runs per request and maps one
sample such as ``{"sepal_length": 5.2, "sepal_width": 3.6, "petal_length": 1.4,
"petal_width": 0.3}`` (centimetres) to its class label, e.g. ``"setosa"``.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

MODEL_FILE = "model.json"

# Filled by init(); each replica handles one request at a time, so globals are safe.
features: list[str] = []
classes: list[str] = []
coef: np.ndarray | None = None  # (n_classes, n_features)
intercept: np.ndarray | None = None  # (n_classes,)


def _resolve(model_path: str | None) -> str:
    """The model file: the given file, model.json inside a given folder, or the bundled one."""
    if model_path is None:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), MODEL_FILE)
    if os.path.isdir(model_path):
        return os.path.join(model_path, MODEL_FILE)
    return model_path


def init(model_path, metadata):
    """Load the exported logistic regression into module globals."""
    global features, classes, coef, intercept
    path = _resolve(model_path)
    with open(path, encoding="utf-8") as f:
        model = json.load(f)

    expected = (metadata or {}).get("model_format")
    if expected is not None and model.get("format") != expected:
        raise ValueError(
            f"{path}: model format is {model.get('format')!r}, but the API's metadata "
            f"expects model_format {expected!r}"
        )

    w = np.asarray(model["coef"], dtype=np.float64)
    b = np.asarray(model["intercept"], dtype=np.float64)
    if w.shape != (len(model["classes"]), len(model["features"])) or b.shape != (w.shape[0],):
        raise ValueError(f"{path}: coef/intercept shapes do not match classes and features")
    features, classes, coef, intercept = list(model["features"]), list(model["classes"]), w, b


def _vector(sample) -> np.ndarray:
    """The sample's feature values in model order; an error naming what is wrong."""
    if not isinstance(sample, dict):
        raise TypeError(
            f"expected a JSON object with the keys {', '.join(features)}, "
            f"got {type(sample).__name__}"
        )
    missing = [name for name in features if name not in sample]
    if missing:
        raise ValueError(
            f"missing feature{'s' if len(missing) > 1 else ''}: {', '.join(missing)} "
            f"(expected keys: {', '.join(features)})"
        )
    values = []
    for name in features:
        value = sample[name]
        # bool is an int subclass, but true/false is not a length.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"feature {name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"feature {name} must be a finite number, got {value!r}")
        values.append(float(value))
    return np.asarray(values, dtype=np.float64)


def predict(sample, metadata):
    """Return the predicted species of one iris sample as a string."""
    if coef is None:
        raise RuntimeError("predict() called before init()")
    scores = coef @ _vector(sample) + intercept  # softmax is monotonic: argmax of the logits
    return classes[int(np.argmax(scores))]


def predict_batch(samples, metadata):
    """The species of each sample, in order, from one matrix product (beyond Cortex v0.11:
    inferq calls it when a message carries several samples, e.g. from ``Client.map``)."""
    if coef is None:
        raise RuntimeError("predict_batch() called before init()")
    scores = np.stack([_vector(sample) for sample in samples]) @ coef.T + intercept
    return [classes[int(i)] for i in np.argmax(scores, axis=1)]
