"""Reading a project's cortex.yaml into a validated, fully resolved :class:`Deployment`.

Every problem is collected, one :class:`Problem` each, and raised together as
:class:`~inferq.errors.ConfigError`, so a user fixes a file in one pass. Loading reads files
and checks that they exist; it never imports or runs any of the project's code.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from inferq.configs import fields as f
from inferq.configs.quantities import describe, format_duration
from inferq.configs.spec import Api, Compute, Deployment, Onnx, Predictor, Stream, Tracker
from inferq.errors import ConfigError

CONFIG_NAME = "cortex.yaml"
KINDS = ("deployment", "api")
_UNREADABLE = object()  # _read_yaml's answer when there is no document to check


@dataclass(frozen=True)
class Problem:
    """One problem of a project: the file, where in it (``api "iris": compute.cpu``), what."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        if self.path:
            return f"{self.file}: {self.path}: {self.message}"
        return f"{self.file}: {self.message}"


class _Report:
    """The problems found so far in one file."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def add(self, label: str, path: str, message: str) -> None:
        where = ": ".join(part for part in (label, path) if part)
        self.problems.append(Problem(self.file, where, message))


def load_project(project_dir: str | os.PathLike[str]) -> Deployment:
    """Load ``<project_dir>/cortex.yaml`` (or the YAML file ``project_dir`` names).

    Returns the :class:`Deployment` with every default filled in. Raises
    :class:`~inferq.errors.ConfigError` listing every problem found.
    """
    given = Path(project_dir)
    is_file = given.is_file() or given.suffix in (".yaml", ".yml")
    config_file = given if is_file else given / CONFIG_NAME
    root = config_file.parent
    # The path as the user gave it ("cortex.yaml" when they are in the project folder).
    report = _Report(str(config_file))
    document = _read_yaml(config_file, report)
    if document is _UNREADABLE:
        raise ConfigError(report.problems)
    resources = _resources(document, report)
    if resources is None:  # not a list: nothing below would be worth saying
        raise ConfigError(report.problems)
    deployment = _deployment(resources, report)
    apis = [_api(resource, index, deployment, root, report)
            for index, resource in resources if resource["kind"] == "api"]
    if not apis and not report.problems:
        report.add("", "", 'no APIs: add a resource with "kind: api"')
    _check_unique(apis, report)
    problems = list(report.problems)
    problems += _python_problems([api for _, api, _ in apis if api is not None], root)
    if problems or deployment is None:
        raise ConfigError(problems)
    return Deployment(
        name=deployment,
        apis=tuple(api for _, api, _ in apis if api is not None),  # all, with no problem
        project_dir=root.resolve(),
        config_file=config_file.resolve(),
    )


def _python_problems(apis: list[Api], root: Path) -> list[Problem]:
    """A syntax error in a predictor or request handler, found by compiling it (nothing of
    it runs), named by the file as the user sees it and its line."""
    files = {api.predictor.path if api.predictor else api.onnx_spec.request_handler
             for api in apis}
    problems = []
    for name in sorted(name for name in files if name):
        path = root / name
        shown = os.path.normpath(path)  # beside cortex.yaml, as the user named that
        try:
            compile(path.read_bytes(), shown, "exec", dont_inherit=True)
        except SyntaxError as exc:
            where = f"line {exc.lineno}" + (f", column {exc.offset}" if exc.offset else "")
            code = f": {exc.text.strip()}" if exc.text and exc.text.strip() else ""
            problems.append(Problem(shown, where,
                                    f"{type(exc).__name__}: {exc.msg}{code}"))
        except (OSError, ValueError) as exc:  # unreadable, or a null byte in the source
            problems.append(Problem(shown, "", f"cannot be compiled: {exc}"))
    return problems


# -- the YAML file ------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, noting duplicate mapping keys (PyYAML keeps the last silently)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[Any, yaml.Mark, yaml.Mark]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not key_node.start_mark:
                self.duplicates.append((key, key_node.start_mark, first))
        return super().construct_mapping(node, deep=deep)


def _read_yaml(config_file: Path, report: _Report) -> Any:
    if not config_file.parent.is_dir():
        report.add("", "", f"no such folder: {config_file.parent}")
        return _UNREADABLE
    if not config_file.is_file():
        report.add("", "", f"not found: the folder {config_file.parent} has no {config_file.name}")
        return _UNREADABLE
    try:
        text = config_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        report.add("", "", f"cannot be read: {exc}")
        return _UNREADABLE
    loader = _StrictLoader(text)
    try:
        document = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        report.add("", *_syntax_error(exc))
        return _UNREADABLE
    except yaml.YAMLError as exc:
        report.add("", "", f"invalid YAML: {exc}")
        return _UNREADABLE
    finally:
        loader.dispose()
    for key, mark, first in loader.duplicates:
        report.add("", f"line {mark.line + 1}, column {mark.column + 1}",
                   f"duplicate key {describe(key)} (first at line {first.line + 1}); "
                   "each key may appear once")
    return document


def _syntax_error(exc: yaml.MarkedYAMLError) -> tuple[str, str]:
    """Where and what: PyYAML's problem first, then what it was parsing and from where."""
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    message = (exc.problem or str(exc)).removeprefix("but ")
    if exc.context:
        since = f", line {exc.context_mark.line + 1}" if exc.context_mark else ""
        message += f" ({exc.context}{since})"
    if "\\t" in message:
        message += "; indent with spaces, not tabs"
    return where, f"invalid YAML: {message}"


# -- resources ----------------------------------------------------------------------------------


def _resources(document: Any, report: _Report) -> list[tuple[int, dict]] | None:
    """The resources with a valid kind, numbered from 1 as a user counts them."""
    example = '(- kind: deployment ...)'
    if document is None:
        report.add("", "", f"the file is empty: expected a list of resources {example}")
        return None
    if not isinstance(document, list):
        report.add("", "", f"expected a list of resources {example}, got {describe(document)}; "
                           'start each resource with "- "')
        return None
    resources = []
    for index, resource in enumerate(document, start=1):
        label = f"resource {index}"
        if not isinstance(resource, dict):
            report.add(label, "", f"must be a mapping with a kind, got {describe(resource)}")
        elif "kind" not in resource or resource["kind"] is None:
            report.add(label, "kind", f"required (one of: {', '.join(KINDS)})")
        elif resource["kind"] not in KINDS:
            report.add(label, "kind", f"unknown kind {describe(resource['kind'])} (valid kinds: "
                                      f"{', '.join(KINDS)}; inferq reads Cortex v0.11 projects)")
        else:
            resources.append((index, resource))
    return resources


def _deployment(resources: list[tuple[int, dict]], report: _Report) -> str | None:
    """The deployment's name, when there is exactly one deployment with a valid name."""
    found = [(index, resource) for index, resource in resources
             if resource["kind"] == "deployment"]
    if not found:
        report.add("", "", 'no deployment: add a resource "- kind: deployment" with a name')
        return None
    for index, _ in found[1:]:
        report.add(f"resource {index}", "kind",
                   f"a second deployment (resource {found[0][0]} is the first); "
                   "a project has exactly one")
    values = _fields(found[0][1], f.DEPLOYMENT, Path("."), report, "deployment")
    return values.get("name") if f.BAD not in values.values() else None


def _api(resource: dict, index: int, deployment: str | None, root: Path,
         report: _Report) -> tuple[str, Api | None, dict]:
    """One API (None when it has problems), its label and values for the uniqueness checks."""
    name = resource.get("name")
    label = f'api "{name}"' if isinstance(name, str) and name.strip() else f"resource {index}"
    before = len(report.problems)
    values = _fields(resource, f.API, root, report, label)
    if "tensorflow" in resource:
        report.add(label, "tensorflow", "TensorFlow serving is not supported by inferq: export "
                                        "the model to ONNX (onnx:) or serve it from a Python "
                                        "predictor (predictor:)")
    kinds = [key for key in ("predictor", "onnx") if values.get(key) is not None]
    if not kinds and "tensorflow" not in resource:
        report.add(label, "", "needs a predictor or an onnx section (exactly one of them)")
    elif len(kinds) > 1:
        report.add(label, "", "has both predictor and onnx; keep exactly one of them")
    if values.get("endpoint") is None and deployment and f.is_name(values.get("name")):
        values["endpoint"] = f"/{deployment}/{values['name']}"
    compute = values.get("compute", {})
    compute = _compute(compute, label, report) if compute is not f.BAD else None
    _check_batch_interval(values.get("predictor"), compute, label, report)
    stream_values = values.get("stream")
    stream = None
    if isinstance(stream_values, dict) and f.BAD not in stream_values.values():
        stream = _stream(stream_values, label, report)
    if len(report.problems) > before or deployment is None or compute is None:
        return label, None, values
    api = Api(
        name=values["name"],
        deployment=deployment,
        endpoint=values["endpoint"],
        compute=compute,
        predictor=Predictor.from_dict(values["predictor"]) if "predictor" in values else None,
        onnx=Onnx(**values["onnx"]) if "onnx" in values else None,
        tracker=Tracker(**values["tracker"]) if "tracker" in values else None,
        stream=stream,
    )
    return label, api, values


def _compute(values: dict, label: str, report: _Report) -> Compute | None:
    """The compute section with its defaults, after the checks that span several keys."""
    defaults = Compute()
    low = values.get("min_replicas", defaults.min_replicas)
    high = values.get("max_replicas", defaults.max_replicas)
    init = values.get("init_replicas", low)
    if f.BAD in (low, high, init):  # already reported; comparing would only add noise
        return None
    if low > high:
        report.add(label, "compute", f"min_replicas ({low}) is more than max_replicas ({high})")
        return None
    if not low <= init <= high:
        report.add(label, "compute.init_replicas", f"must be between min_replicas ({low}) and "
                                                   f"max_replicas ({high}), got {init}")
        return None
    return Compute(**{**values, "init_replicas": init})


def _stream(values: dict, label: str, report: _Report) -> Stream:
    """The stream section with its defaults; the sink and the dead letter are not the
    source (an API would consume its own answers)."""
    stream = Stream(**{"sink": f"{values['source']}:predictions", **values})
    for where, key in (("stream.sink", stream.sink), ("stream.sink", stream.dead_letter)):
        if key == stream.source:
            report.add(label, where, f"{describe(key)} is the source too; answers added to "
                                     "it would be consumed again")
            break
    return stream


def _check_batch_interval(predictor: Any, compute: Compute | None, label: str,
                          report: _Report) -> None:
    """A batch waits out its interval before it leaves, so the interval is under the timeout.

    Otherwise a request that arrives alone would always be answered 504.
    """
    batching = predictor.get("server_side_batching") if isinstance(predictor, dict) else None
    if not isinstance(batching, dict) or compute is None:
        return
    interval = batching.get("batch_interval", f.BAD)
    if interval is not f.BAD and interval >= compute.timeout:
        report.add(label, "predictor.server_side_batching.batch_interval",
                   f"must be less than compute.timeout ({format_duration(compute.timeout)}), "
                   f"got {format_duration(interval)}")


def _check_unique(apis: list[tuple[str, Api | None, dict]], report: _Report) -> None:
    """API names and endpoints are unique (a later API has the problem)."""
    names: dict[str, str] = {}
    endpoints: dict[str, str] = {}
    for label, _, values in apis:
        name, endpoint = values.get("name"), values.get("endpoint")
        if isinstance(name, str):
            if name in names:
                report.add(label, "name", "another API has this name; API names are unique")
            names.setdefault(name, label)
        if isinstance(endpoint, str):
            key = endpoint.rstrip("/")
            if key in endpoints:
                report.add(label, "endpoint",
                           f"{describe(endpoint)} is also the endpoint of {endpoints[key]}")
            endpoints.setdefault(key, label)


# -- sections -----------------------------------------------------------------------------------


def _fields(data: dict, schema: f.Schema, root: Path, report: _Report, label: str,
            prefix: str = "") -> dict[str, Any]:
    """The converted values of a mapping's keys (``f.BAD`` where a key has a problem).

    Unknown keys and missing required keys are problems; a null value means the default.
    """
    values: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        spec = schema.keys.get(key) if isinstance(key, str) else None
        if spec is None:
            if key not in schema.ignored:
                report.add(label, path, _unknown_key(key, schema))
            continue
        if value is None:
            continue
        if isinstance(spec, f.Schema):
            if not isinstance(value, dict):
                report.add(label, path, f"must be a mapping of keys, got {describe(value)}")
                values[key] = f.BAD
                continue
            values[key] = _fields(value, spec, root, report, label, f"{path}.")
            continue
        try:
            values[key] = spec(value, root)
        except ValueError as exc:
            report.add(label, path, str(exc))
            values[key] = f.BAD
    for key in schema.required:
        if data.get(key) is None:
            report.add(label, f"{prefix}{key}", f"required ({schema.hints.get(key, 'a value')})")
            values[key] = f.BAD
    return values


def _unknown_key(key: Any, schema: f.Schema) -> str:
    valid = sorted(schema.keys)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    return f"unknown key (valid keys: {', '.join(valid)})"
