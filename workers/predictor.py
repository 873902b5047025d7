"""Loading a user's predictor module and checking it keeps Cortex v0.11's contract.

``predictor.py`` defines ``predict(sample, metadata)`` (required),
``init(model_path, metadata)`` (optional) and, beyond v0.11, ``predict_batch(samples,
metadata)`` (optional: a list of samples in, a list of predictions out). A syntax error, an
exception at import or in ``init``, a missing ``predict`` or a signature that cannot take
those arguments is a :class:`PredictorError` naming the file, with the traceback.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from inferq.errors import PredictorError


def import_file(path: Path, *, label: str) -> ModuleType:
    """Import ``path`` as a module named after its file, as Cortex did; its globals run now.

    ``label`` is how the file is named in errors (its project-relative path).
    """
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PredictorError(f"{label}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # lets the module's own code (pickle, dataclasses) find itself
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise PredictorError(
            f"{label}: importing it failed:\n{_user_traceback(exc, path, label)}"
        ) from exc
    return module


def check_callable(module: ModuleType, name: str, params: tuple[str, ...], *, label: str,
                   required: bool) -> Any:
    """Return ``module.<name>`` if it can be called with ``params``; None if optional and absent."""
    func = getattr(module, name, None)
    wanted = f"{name}({', '.join(params)})"
    if func is None:
        if required:
            raise PredictorError(f"{label}: no {wanted} function is defined")
        return None
    if not callable(func):
        raise PredictorError(f"{label}: {name} must be a function {wanted}")
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return func  # builtins and C callables: trust them
    try:
        signature.bind(*params)
    except TypeError:
        raise PredictorError(
            f"{label}: {name}{signature} cannot be called as {wanted}"
        ) from None
    return func


class PythonPredictor:
    """A Cortex v0.11 Python predictor: import, check, ``init`` once, ``predict`` per sample."""

    def __init__(self, path: Path, *, label: str, model_path: Path | None,
                 metadata: dict[str, Any]) -> None:
        self.label = label
        self.metadata = metadata
        module = import_file(path, label=label)
        self._predict = check_callable(
            module, "predict", ("sample", "metadata"), label=label, required=True
        )
        self._predict_batch = check_callable(
            module, "predict_batch", ("samples", "metadata"), label=label, required=False
        )
        init = check_callable(
            module, "init", ("model_path", "metadata"), label=label, required=False
        )
        if init is not None:
            try:
                init(str(model_path) if model_path is not None else None, metadata)
            except Exception as exc:
                raise PredictorError(
                    f"{label}: init() raised:\n{_user_traceback(exc, path, label)}"
                ) from exc

    def predict(self, sample: Any) -> Any:
        return self._predict(sample, self.metadata)

    @property
    def batches(self) -> bool:
        """Whether the predictor defines ``predict_batch``."""
        return self._predict_batch is not None

    def predict_batch(self, samples: list[Any]) -> Any:
        return self._predict_batch(samples, self.metadata)


def project_root(path: Path, label: str) -> Path:
    """The project folder of the file at ``path`` whose project-relative name is ``label``."""
    return path.parents[len(Path(label).parts) - 1]


def project_relative(text: str, root: Path) -> str:
    """``text`` with the project's files named as in the project (``predictor.py``), not by
    where this host unpacked it (``INFERQ_HOME/cache/bundles/<hash>/predictor.py``)."""
    return text.replace(f"{root}{os.sep}", "")


def _user_traceback(exc: BaseException, path: Path, label: str) -> str:
    """The traceback from the first frame of the user's project on (inferq's frames add
    noise), the project's files named as in the project."""
    frames: list[traceback.FrameSummary] = list(traceback.extract_tb(exc.__traceback__))
    root = project_root(path, label)
    for index, frame in enumerate(frames):
        if frame.filename.startswith(f"{root}{os.sep}"):
            frames = frames[index:]
            break
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines += traceback.format_exception_only(type(exc), exc)
    return project_relative("".join(lines).rstrip(), root)
