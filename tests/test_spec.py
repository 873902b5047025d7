"""cortex.yaml: every problem reported at once with its exact line, defaults, quantities, YAML."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import yaml
from helpers import EXAMPLES, write_project

from inferq.configs import (
    Api,
    Compute,
    Problem,
    ServerSideBatching,
    api_yaml,
    format_cpu,
    format_mem,
    load_project,
    parse_cpu,
    parse_duration,
    parse_mem,
    to_yaml,
)
from inferq.configs.quantities import format_duration
from inferq.errors import ConfigError

PREDICTOR = "def predict(sample, metadata):\n    return sample\n"
FILES = {
    "predictor.py": PREDICTOR,
    "handler.py": "def pre_inference(sample, signature, metadata):\n    return sample\n",
    "model.onnx": "onnx",
    "model.json": "{}",
    "notes.txt": "notes",
    "lib/util.py": "X = 1\n",
    "models/linreg/weights.bin": "w",
    "dir.py/__init__.py": "",
}
DEPLOYMENT = "- kind: deployment\n  name: shop\n"


def api(*lines: str, name: str = "iris", predictor: str = "path: predictor.py") -> str:
    """The project's YAML: a deployment and one API whose body adds ``lines`` (YAML text)."""
    body = [f"  name: {name}"] if name else []
    if predictor:
        body += ["  predictor:", *(f"    {part}" for part in predictor.split("; "))]
    body += [textwrap.indent(line, "  ") for line in lines]
    return DEPLOYMENT + "- kind: api\n" + "\n".join(body) + "\n"


def second_api(*lines: str, name: str = "b", **keys: str) -> str:
    """Another API for the same file (no second deployment)."""
    return api(*lines, name=name, **keys).replace(DEPLOYMENT, "")


def compute(**values: str) -> str:
    return "compute:\n" + "".join(f"  {key}: {value}\n" for key, value in values.items())


def batching(**values: str) -> str:
    """A predictor (for ``api(predictor=...)``) with a ``server_side_batching`` block."""
    block = ", ".join(f"{key}: {value}" for key, value in values.items())
    return f"path: predictor.py; server_side_batching: {{{block}}}"


def problems(tmp_path, monkeypatch, text: str, files: dict | None = None) -> list[str]:
    """Every problem line of a project, loaded from inside its folder as a user would."""
    project = write_project(tmp_path / "p", text, {**FILES, **(files or {})})
    monkeypatch.chdir(project)
    with pytest.raises(ConfigError) as caught:
        load_project(".")
    assert all(isinstance(problem, Problem) for problem in caught.value.problems)
    return [str(problem) for problem in caught.value.problems]


def load(tmp_path, text: str, files: dict | None = None):
    return load_project(write_project(tmp_path / "p", text, {**FILES, **(files or {})}))


IRIS = 'cortex.yaml: api "iris": '

INVALID = [
    # compute: quantities
    ("cpu-garbage", api(compute(cpu="2x")),
     IRIS + 'compute.cpu: "2x" is not a CPU quantity (examples: 1, 0.5, 200m)'),
    ("cpu-finer-than-millicore", api(compute(cpu='"0.0001"')),
     IRIS + 'compute.cpu: "0.0001" is finer than 1m'),
    ("cpu-negative", api(compute(cpu="-1")), IRIS + "compute.cpu: -1 is negative"),
    ("cpu-zero", api(compute(cpu="0")), IRIS + "compute.cpu: must be more than 0, got 0"),
    ("cpu-bool", api(compute(cpu="true")), IRIS + "compute.cpu: true is not a CPU quantity"),
    ("cpu-list", api(compute(cpu="[1]")), IRIS + "compute.cpu: a list is not a CPU quantity"),
    ("mem-fraction-of-byte", api(compute(mem="1.5")),
     IRIS + "compute.mem: 1.5 is not a whole number of bytes"),
    ("mem-unknown-suffix", api(compute(mem="12Zi")),
     IRIS + 'compute.mem: "12Zi" is not a memory quantity'),
    ("mem-zero", api(compute(mem="0")), IRIS + "compute.mem: must be more than 0"),
    ("mem-negative", api(compute(mem="-1G")), IRIS + 'compute.mem: "-1G" is negative'),
    # compute: integers and ranges
    ("gpu-negative", api(compute(gpu="-1")), IRIS + "compute.gpu: must be at least 0, got -1"),
    ("gpu-float", api(compute(gpu="1.5")), IRIS + "compute.gpu: must be an integer, got 1.5"),
    ("gpu-bool", api(compute(gpu="yes")), IRIS + "compute.gpu: must be an integer, got true"),
    ("min-replicas-string", api(compute(min_replicas='"2"')),
     IRIS + 'compute.min_replicas: must be an integer, got "2"'),
    ("min-replicas-negative", api(compute(min_replicas="-1")),
     IRIS + "compute.min_replicas: must be at least 0, got -1"),
    ("max-replicas-zero", api(compute(max_replicas="0")),
     IRIS + "compute.max_replicas: must be at least 1, got 0"),
    ("min-over-max", api(compute(min_replicas="3", max_replicas="2")),
     IRIS + "compute: min_replicas (3) is more than max_replicas (2)"),
    ("min-over-default-max", api(compute(min_replicas="101")),
     IRIS + "compute: min_replicas (101) is more than max_replicas (100)"),
    ("init-over-max", api(compute(max_replicas="2", init_replicas="5")),
     IRIS + "compute.init_replicas: must be between min_replicas (1) and max_replicas (2), got 5"),
    ("init-under-min", api(compute(min_replicas="2", init_replicas="1")),
     IRIS + "compute.init_replicas: must be between min_replicas (2) and max_replicas (100)"),
    ("target-cpu-zero", api(compute(target_cpu_utilization="0")),
     IRIS + "compute.target_cpu_utilization: must be between 1 and 100, got 0"),
    ("target-cpu-over-100", api(compute(target_cpu_utilization="101")),
     IRIS + "compute.target_cpu_utilization: must be between 1 and 100, got 101"),
    ("compute-typo", api(compute(min_replica="1")),
     IRIS + "compute.min_replica: unknown key (did you mean min_replicas?)"),
    ("compute-not-mapping", api("compute: [1, 2]"),
     IRIS + "compute: must be a mapping of keys, got a list"),
    # compute: extensions
    ("timeout-zero", api(compute(timeout="0")), IRIS + "compute.timeout: must be more than 0"),
    ("timeout-garbage", api(compute(timeout="soon")),
     IRIS + 'compute.timeout: "soon" is not a duration (examples: 30, 500ms, 30s, 2m)'),
    ("queue-length-zero", api(compute(max_queue_length="0")),
     IRIS + "compute.max_queue_length: must be at least 1, got 0"),
    ("stabilization-negative", api(compute(upscale_stabilization_period="-5s")),
     IRIS + 'compute.upscale_stabilization_period: "-5s" is negative'),
    # predictor
    ("predictor-path-missing", api(predictor="model: model.json"),
     IRIS + "predictor.path: required (the predictor file, relative to the project folder)"),
    ("predictor-path-gone", api(predictor="path: gone.py"),
     IRIS + 'predictor.path: "gone.py" does not exist'),
    ("predictor-path-not-python", api(predictor="path: notes.txt"),
     IRIS + 'predictor.path: "notes.txt" is not a Python file (a .py file)'),
    ("predictor-path-escapes", api(predictor="path: ../outside.py"),
     IRIS + 'predictor.path: "../outside.py" is outside the project folder'),
    ("predictor-path-absolute", api(predictor="path: /etc/predictor.py"),
     IRIS + 'predictor.path: "/etc/predictor.py" must be relative to the project folder'),
    ("predictor-path-folder", api(predictor="path: dir.py"),
     IRIS + 'predictor.path: "dir.py" is a folder, not a file'),
    ("predictor-path-number", api(predictor="path: 5"),
     IRIS + "predictor.path: must be a non-empty string, got 5"),
    ("model-gone", api(predictor="path: predictor.py; model: gone.pkl"),
     IRIS + 'predictor.model: "gone.pkl" does not exist'),
    ("model-http", api(predictor="path: predictor.py; model: https://example.com/m.pkl"),
     IRIS + 'predictor.model: "https://example.com/m.pkl" must be s3://bucket/key'),
    ("model-bad-bucket", api(predictor="path: predictor.py; model: s3://Bad_Bucket/m.pkl"),
     IRIS + 'predictor.model: "s3://Bad_Bucket/m.pkl": "Bad_Bucket" is not a valid S3 bucket'),
    ("model-no-key", api(predictor="path: predictor.py; model: s3://my-bucket"),
     IRIS + 'predictor.model: "s3://my-bucket" names no key'),
    ("python-path-gone", api(predictor="path: predictor.py; python_path: src"),
     IRIS + 'predictor.python_path: "src" does not exist'),
    ("python-path-file", api(predictor="path: predictor.py; python_path: predictor.py"),
     IRIS + 'predictor.python_path: "predictor.py" is a file, not a folder'),
    ("python-path-escapes", api(predictor="path: predictor.py; python_path: lib/../.."),
     IRIS + 'predictor.python_path: "lib/../.." is outside the project folder'),
    ("metadata-list", api(predictor="path: predictor.py; metadata: [a]"),
     IRIS + "predictor.metadata: must be a mapping of names to values, got a list"),
    ("metadata-int-key", api(predictor="path: predictor.py; metadata: {1: a}"),
     IRIS + 'predictor.metadata: keys must be strings, got 1 (quote it: "1")'),
    ("metadata-yaml-boolean-key", api(predictor="path: predictor.py; metadata: {on: 1}"),
     IRIS + "predictor.metadata: keys must be strings, got true (quote it)"),
    ("metadata-date", api(predictor="path: predictor.py; metadata: {trained: {at: 2019-10-01}}"),
     IRIS + "predictor.metadata: trained: at: 2019-10-01 is a date, not a JSON value; quote it"),
    ("predictor-typo", api(predictor="path: predictor.py; modle: model.json"),
     IRIS + "predictor.modle: unknown key (did you mean model?)"),
    ("predictor-not-mapping", api(predictor="", name="iris") + "  predictor: predictor.py\n",
     IRIS + 'predictor: must be a mapping of keys, got "predictor.py"'),
    # predictor.server_side_batching (extension)
    ("batch-size-zero", api(predictor=batching(max_batch_size="0", batch_interval="10ms")),
     IRIS + "predictor.server_side_batching.max_batch_size: must be between 1 and 1024, got 0"),
    ("batch-size-negative", api(predictor=batching(max_batch_size="-4", batch_interval="10ms")),
     IRIS + "predictor.server_side_batching.max_batch_size: must be between 1 and 1024, got -4"),
    ("batch-size-over-1024",
     api(predictor=batching(max_batch_size="1025", batch_interval="10ms")),
     IRIS + "predictor.server_side_batching.max_batch_size: must be between 1 and 1024, "
            "got 1025"),
    ("batch-size-float", api(predictor=batching(max_batch_size="2.5", batch_interval="10ms")),
     IRIS + "predictor.server_side_batching.max_batch_size: must be an integer, got 2.5"),
    ("batch-size-string", api(predictor=batching(max_batch_size='"8"', batch_interval="10ms")),
     IRIS + 'predictor.server_side_batching.max_batch_size: must be an integer, got "8"'),
    ("batch-size-bool", api(predictor=batching(max_batch_size="yes", batch_interval="10ms")),
     IRIS + "predictor.server_side_batching.max_batch_size: must be an integer, got true"),
    ("batch-size-missing", api(predictor=batching(batch_interval="10ms")),
     IRIS + "predictor.server_side_batching.max_batch_size: required (the most requests in "
            "one batch, 1 to 1024)"),
    ("batch-interval-missing", api(predictor=batching(max_batch_size="8")),
     IRIS + "predictor.server_side_batching.batch_interval: required (how long a batch "
            "gathers requests, e.g. 100ms)"),
    ("batch-interval-zero", api(predictor=batching(max_batch_size="8", batch_interval="0")),
     IRIS + "predictor.server_side_batching.batch_interval: must be more than 0, got 0"),
    ("batch-interval-zero-ms",
     api(predictor=batching(max_batch_size="8", batch_interval="0ms")),
     IRIS + 'predictor.server_side_batching.batch_interval: must be more than 0, got "0ms"'),
    ("batch-interval-negative",
     api(predictor=batching(max_batch_size="8", batch_interval="-5ms")),
     IRIS + 'predictor.server_side_batching.batch_interval: "-5ms" is negative'),
    ("batch-interval-garbage",
     api(predictor=batching(max_batch_size="8", batch_interval="soon")),
     IRIS + 'predictor.server_side_batching.batch_interval: "soon" is not a duration '
            "(examples: 30, 500ms, 30s, 2m)"),
    ("batch-interval-over-60s",
     api(predictor=batching(max_batch_size="8", batch_interval="2m")),
     IRIS + 'predictor.server_side_batching.batch_interval: must be at most 60s, got "2m"'),
    ("batch-interval-over-60-seconds",
     api(predictor=batching(max_batch_size="8", batch_interval="60.5")),
     IRIS + "predictor.server_side_batching.batch_interval: must be at most 60s, got 60.5"),
    ("batch-interval-not-under-timeout",
     api(compute(timeout="1s"), predictor=batching(max_batch_size="8", batch_interval="1s")),
     IRIS + "predictor.server_side_batching.batch_interval: must be less than compute.timeout "
            "(1s), got 1s"),
    ("batch-interval-not-under-default-timeout",
     api(predictor=batching(max_batch_size="8", batch_interval="60s")),
     IRIS + "predictor.server_side_batching.batch_interval: must be less than compute.timeout "
            "(60s), got 60s"),
    ("batching-unknown-key",
     api(predictor=batching(max_batch_size="8", batch_interval="10ms", timeout="1s")),
     IRIS + "predictor.server_side_batching.timeout: unknown key (valid keys: batch_interval, "
            "max_batch_size)"),
    ("batching-key-typo",
     api(predictor=batching(max_batch_size="8", batch_interval="10ms", interval="5ms")),
     IRIS + "predictor.server_side_batching.interval: unknown key (did you mean "
            "batch_interval?)"),
    ("batching-not-mapping",
     api(predictor="path: predictor.py; server_side_batching: 8"),
     IRIS + "predictor.server_side_batching: must be a mapping of keys, got 8"),
    ("batching-true", api(predictor="path: predictor.py; server_side_batching: true"),
     IRIS + "predictor.server_side_batching: must be a mapping of keys, got true"),
    ("batching-under-onnx",
     api("onnx:\n  model: model.onnx\n  server_side_batching: {max_batch_size: 8, "
         "batch_interval: 10ms}", predictor=""),
     IRIS + "onnx.server_side_batching: unknown key (valid keys: metadata, model, python_path, "
            "request_handler)"),
    ("batching-at-api-level", api("server_side_batching: {max_batch_size: 8, batch_interval: 1s}"),
     IRIS + "server_side_batching: unknown key (valid keys: compute, endpoint, name, onnx, "
            "predictor, stream, tracker)"),
    ("batching-under-compute", api(compute(server_side_batching="{max_batch_size: 8}")),
     IRIS + "compute.server_side_batching: unknown key"),
    # predictor / onnx / tensorflow
    ("both-predictor-and-onnx", api("onnx:\n  model: model.onnx"),
     IRIS.rstrip(": ") + ": has both predictor and onnx; keep exactly one of them"),
    ("neither-predictor-nor-onnx", api(predictor=""),
     IRIS.rstrip(": ") + ": needs a predictor or an onnx section (exactly one of them)"),
    ("tensorflow", api("tensorflow:\n  model: s3://my-bucket/model/", predictor=""),
     IRIS + "tensorflow: TensorFlow serving is not supported by inferq"),
    ("onnx-model-missing", api("onnx:\n  request_handler: handler.py", predictor=""),
     IRIS + "onnx.model: required"),
    ("onnx-model-not-onnx", api("onnx:\n  model: model.json", predictor=""),
     IRIS + 'onnx.model: "model.json" is not a .onnx file'),
    ("onnx-s3-not-onnx", api("onnx:\n  model: s3://my-bucket/model.pkl", predictor=""),
     IRIS + 'onnx.model: "s3://my-bucket/model.pkl" is not a .onnx file'),
    ("onnx-handler-not-python",
     api("onnx:\n  model: model.onnx\n  request_handler: notes.txt", predictor=""),
     IRIS + 'onnx.request_handler: "notes.txt" is not a Python file'),
    ("onnx-handler-gone", api("onnx:\n  model: model.onnx\n  request_handler: h.py", predictor=""),
     IRIS + 'onnx.request_handler: "h.py" does not exist'),
    # tracker
    ("tracker-model-type-missing", api("tracker:\n  key: label"),
     IRIS + "tracker.model_type: required (classification or regression)"),
    ("tracker-model-type-unknown", api("tracker:\n  model_type: clustering"),
     IRIS + 'tracker.model_type: must be one of classification, regression, got "clustering"'),
    ("tracker-key-number", api("tracker:\n  model_type: regression\n  key: 5"),
     IRIS + "tracker.key: must be a non-empty string, got 5"),
    # names and endpoints
    ("api-name-uppercase", api(name="Iris"),
     'cortex.yaml: api "Iris": name: "Iris" is not a valid name: use lowercase letters'),
    ("api-name-underscore", api(name="iris_v2"),
     'cortex.yaml: api "iris_v2": name: "iris_v2" is not a valid name'),
    ("api-name-too-long", api(name="a" * 64),
     f'cortex.yaml: api "{"a" * 64}": name: "{"a" * 64}" is not a valid name'),
    ("api-name-missing", api(name=""), "cortex.yaml: resource 2: name: required (the API's name)"),
    ("api-name-number", api(name="5"),
     "cortex.yaml: resource 2: name: must be a non-empty string, got 5"),
    ("endpoint-relative", api("endpoint: iris"), IRIS + 'endpoint: "iris" must start with "/"'),
    ("endpoint-space", api('endpoint: "/ir is"'), IRIS + 'endpoint: "/ir is" may hold only'),
    ("endpoint-query", api("endpoint: /iris?v=1"), IRIS + 'endpoint: "/iris?v=1" may hold only'),
    ("endpoint-root", api("endpoint: /"), IRIS + 'endpoint: "/" is the root'),
    ("endpoint-healthz", api("endpoint: /healthz"),
     IRIS + 'endpoint: "/healthz" is reserved by the gateway (/healthz)'),
    ("endpoint-metrics", api("endpoint: /metrics/"),
     IRIS + 'endpoint: "/metrics/" is reserved by the gateway (/metrics)'),
    ("api-key-typo", api("endpiont: /iris"),
     IRIS + "endpiont: unknown key (did you mean endpoint?)"),
    # resources and the deployment
    ("deployment-name-invalid", api().replace("name: shop", "name: My Shop"),
     'cortex.yaml: deployment: name: "My Shop" is not a valid name'),
    ("deployment-unknown-key", api().replace("name: shop", "name: shop\n  region: eu"),
     "cortex.yaml: deployment: region: unknown key (valid keys: name)"),
    ("deployment-missing", api().replace(DEPLOYMENT, ""), "cortex.yaml: no deployment"),
    ("deployment-twice", api() + DEPLOYMENT,
     "cortex.yaml: resource 3: kind: a second deployment (resource 1 is the first)"),
    ("kind-from-older-cortex", api() + "- kind: model\n  name: m\n",
     'cortex.yaml: resource 3: kind: unknown kind "model" (valid kinds: deployment, api'),
    ("kind-missing", api() + "- name: other\n",
     "cortex.yaml: resource 3: kind: required (one of: deployment, api)"),
    ("resource-not-mapping", api() + "- just text\n",
     'cortex.yaml: resource 3: must be a mapping with a kind, got "just text"'),
    ("top-level-mapping", "kind: deployment\nname: shop\n",
     "cortex.yaml: expected a list of resources"),
    ("empty-file", "# nothing yet\n", "cortex.yaml: the file is empty"),
    ("no-apis", DEPLOYMENT, 'cortex.yaml: no APIs: add a resource with "kind: api"'),
    ("yaml-syntax", DEPLOYMENT + "- kind: api\n  name: [iris\n",
     "cortex.yaml: line 5, column 1: invalid YAML"),
    ("yaml-duplicate-key", api(compute(cpu="1", gpu="0") + "  cpu: 2"),
     'cortex.yaml: line 10, column 5: duplicate key "cpu" (first at line 8)'),
    ("duplicate-api-name", api() + second_api("endpoint: /other", name="iris"),
     IRIS + "name: another API has this name"),
    ("duplicate-endpoint", api("endpoint: /x") + second_api("endpoint: /x/"),
     'cortex.yaml: api "b": endpoint: "/x/" is also the endpoint of api "iris"'),
    ("endpoint-takes-a-default", api() + second_api("endpoint: /shop/iris"),
     'cortex.yaml: api "b": endpoint: "/shop/iris" is also the endpoint of api "iris"'),
]


@pytest.mark.parametrize(("text", "expected"), [case[1:] for case in INVALID],
                         ids=[case[0] for case in INVALID])
def test_an_invalid_project_reports_exactly_one_problem_line(tmp_path, monkeypatch, text,
                                                             expected):
    found = problems(tmp_path, monkeypatch, text)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


def test_a_symlink_out_of_the_project_is_outside_it(tmp_path, monkeypatch):
    (tmp_path / "elsewhere.py").write_text(PREDICTOR)
    project = write_project(tmp_path / "p", api(predictor="path: link.py"), FILES)
    (project / "link.py").symlink_to(tmp_path / "elsewhere.py")
    monkeypatch.chdir(project)
    with pytest.raises(ConfigError) as caught:
        load_project(".")
    assert [str(p) for p in caught.value.problems] == [
        IRIS + 'predictor.path: "link.py" is outside the project folder'
    ]


def test_one_file_with_many_problems_reports_all_of_them_at_once(tmp_path, monkeypatch):
    text = """\
    - kind: deployment
      name: Shop
    - kind: api
      name: ranker
      predictor:
        path: missing.py
      compute:
        cpu: 2x
        min_replicas: 3
        max_replicas: 2
    - kind: model
      name: old
    - kind: api
      name: Tagger
      endpoint: /healthz
      onnx:
        model: tagger.pkl
      tracker:
        model_type: clustering
    - kind: api
      name: ok
      predictor:
        path: predictor.py
      compute:
        gpu: -1
    """
    found = problems(tmp_path, monkeypatch, text)
    assert found == [
        ('cortex.yaml: resource 3: kind: unknown kind "model" (valid kinds: deployment, api; '
        "inferq reads Cortex v0.11 projects)"),
        found[1],
        ('cortex.yaml: api "ranker": predictor.path: "missing.py" does not exist (paths are '
        "relative to the folder of cortex.yaml)"),
        ('cortex.yaml: api "ranker": compute.cpu: "2x" is not a CPU quantity '
        "(examples: 1, 0.5, 200m)"),
        'cortex.yaml: api "ranker": compute: min_replicas (3) is more than max_replicas (2)',
        found[5],
        'cortex.yaml: api "Tagger": endpoint: "/healthz" is reserved by the gateway (/healthz)',
        'cortex.yaml: api "Tagger": onnx.model: "tagger.pkl" is not a .onnx file',
        ('cortex.yaml: api "Tagger": tracker.model_type: must be one of classification, '
        'regression, got "clustering"'),
        'cortex.yaml: api "ok": compute.gpu: must be at least 0, got -1',
    ]
    assert found[1].startswith('cortex.yaml: deployment: name: "Shop" is not a valid name')
    assert found[5].startswith('cortex.yaml: api "Tagger": name: "Tagger" is not a valid name')


@pytest.mark.parametrize(("block", "expected"), [
    ("{}", [IRIS + "predictor.server_side_batching.max_batch_size: required",
            IRIS + "predictor.server_side_batching.batch_interval: required"]),
    ("{batch_size: 8, batch_interval: 10ms}",
     [IRIS + "predictor.server_side_batching.batch_size: unknown key (did you mean "
             "max_batch_size?)",
      IRIS + "predictor.server_side_batching.max_batch_size: required"]),
    ("{max_batch_size: 0, batch_interval: 0}",
     [IRIS + "predictor.server_side_batching.max_batch_size: must be between 1 and 1024",
      IRIS + "predictor.server_side_batching.batch_interval: must be more than 0"]),
])
def test_a_server_side_batching_block_reports_each_of_its_problems(tmp_path, monkeypatch, block,
                                                                   expected):
    text = api(predictor=f"path: predictor.py; server_side_batching: {block}")
    found = problems(tmp_path, monkeypatch, text)
    assert len(found) == len(expected), found
    assert all(line.startswith(start) for line, start in zip(found, expected, strict=True)), found


def test_a_missing_cortex_yaml_names_the_folder(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_project(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path}/cortex.yaml: not found: the folder {tmp_path} has no cortex.yaml"
    )


def test_problems_name_the_file_as_the_user_gave_the_folder(tmp_path):
    project = write_project(tmp_path / "p", api(compute(cpu="2x")), FILES)
    with pytest.raises(ConfigError) as caught:
        load_project(project)
    assert str(caught.value).startswith(f'{project}/cortex.yaml: api "iris": compute.cpu: ')


# -- valid projects -----------------------------------------------------------------------------

V011_SHAPES = {
    "sklearn-iris": """
        - kind: deployment
          name: iris
        - kind: api
          name: classifier
          predictor:
            path: predictor.py
            model: s3://cortex-examples/sklearn/iris-classifier/model.pkl
          tracker:
            model_type: classification
    """,
    "sklearn-mpg-estimator": """
        - kind: deployment
          name: mpg
        - kind: api
          name: estimator
          predictor:
            path: predictor.py
            model: s3://cortex-examples/sklearn/mpg-estimator/linreg/
          tracker:
            model_type: regression
    """,
    "pytorch-text-generator": """
        - kind: deployment
          name: text
        - kind: api
          name: generator
          predictor:
            path: predictor.py
            metadata:
              device: cuda
          compute:
            gpu: 1
    """,
    "onnx-iris": """
        - kind: deployment
          name: iris
        - kind: api
          name: onnx-classifier
          onnx:
            model: s3://cortex-examples/onnx/iris-classifier/gbtree.onnx
            request_handler: handler.py
          tracker:
            model_type: classification
          compute:
            cpu: 1
            mem: 1G
    """,
}


@pytest.mark.parametrize("shape", sorted(V011_SHAPES))
def test_cortex_v011_example_shapes_load_with_their_defaults(tmp_path, shape):
    deployment = load(tmp_path, V011_SHAPES[shape])
    (found,) = deployment.apis
    assert found.endpoint == f"/{deployment.name}/{found.name}"
    assert found.compute.init_replicas == found.compute.min_replicas == 1
    assert found.compute.max_replicas == 100
    spec = found.predictor or found.onnx
    assert spec.python_path == "."
    if shape == "pytorch-text-generator":
        assert found.predictor.metadata == {"device": "cuda"}
        assert (found.compute.gpu, found.compute.cpu, found.tracker) == (1, 200, None)
    if shape == "onnx-iris":
        assert found.kind == "onnx" and found.onnx.request_handler == "handler.py"
        assert (found.compute.cpu, found.compute.mem) == (1000, 10**9)
    if shape == "sklearn-mpg-estimator":
        assert found.predictor.model == "s3://cortex-examples/sklearn/mpg-estimator/linreg/"
        assert found.tracker.model_type == "regression" and found.tracker.key is None


def test_the_bundled_iris_example_loads(tmp_path):
    deployment = load_project(EXAMPLES / "iris")
    assert deployment.project_dir == (EXAMPLES / "iris").resolve()
    assert deployment.config_file == (EXAMPLES / "iris" / "cortex.yaml").resolve()
    assert deployment.apis[0].predictor.metadata == {"model_format": "iris-logreg-v1"}


def test_every_default_is_filled_in(tmp_path):
    (found,) = load(tmp_path, api()).apis
    assert found.deployment == "shop" and found.endpoint == "/shop/iris"
    assert found.compute == Compute()
    assert found.compute.timeout == 60.0 and found.compute.downscale_stabilization_period == 30.0
    assert found.predictor.model is None and found.predictor.metadata == {}


def test_paths_are_normalised_and_local_models_may_be_folders(tmp_path):
    text = api(predictor="path: ./lib/../predictor.py; model: models/linreg/; "
                         "python_path: lib/; metadata:")
    (found,) = load(tmp_path, text).apis
    assert found.predictor.path == "predictor.py"
    assert found.predictor.model == "models/linreg"
    assert found.predictor.python_path == "lib"
    assert found.predictor.metadata == {}


def test_compute_values_resolve_to_exact_units(tmp_path):
    text = api(compute(min_replicas="0", max_replicas="5", init_replicas="2", cpu="0.2",
                       mem="129e6", timeout="500ms", max_queue_length="10",
                       upscale_stabilization_period="2m", downscale_stabilization_period="0"))
    (found,) = load(tmp_path, text).apis
    assert found.compute == Compute(
        min_replicas=0, max_replicas=5, init_replicas=2, cpu=200, mem=129_000_000,
        timeout=0.5, max_queue_length=10, upscale_stabilization_period=120.0,
        downscale_stabilization_period=0.0,
    )


def test_null_values_mean_the_default(tmp_path):
    text = api(compute(mem="null", cpu="~", init_replicas="null") + "tracker:\n")
    (found,) = load(tmp_path, text).apis
    assert found.compute == Compute() and found.tracker is None


@pytest.mark.parametrize(("predictor", "lines", "expected"), [
    ("path: predictor.py", (), None),
    ("path: predictor.py; server_side_batching:", (), None),  # null means the default
    (batching(max_batch_size="8", batch_interval="100ms"), (), ServerSideBatching(8, 0.1)),
    (batching(batch_interval="0.25", max_batch_size="32"), (), ServerSideBatching(32, 0.25)),
    (batching(max_batch_size="4", batch_interval="2"), (), ServerSideBatching(4, 2.0)),
    (batching(max_batch_size="4", batch_interval="1.5s"), (), ServerSideBatching(4, 1.5)),
    (batching(max_batch_size="4", batch_interval='"1ms"'), (), ServerSideBatching(4, 0.001)),
    (batching(max_batch_size="1", batch_interval="10ms"), (), ServerSideBatching(1, 0.01)),
    (batching(max_batch_size="1024", batch_interval="10ms"), (), ServerSideBatching(1024, 0.01)),
    (batching(max_batch_size="16", batch_interval="1m"), (compute(timeout="90s"),),
     ServerSideBatching(16, 60.0)),
    (batching(max_batch_size="16", batch_interval="59s"), (), ServerSideBatching(16, 59.0)),
])
def test_server_side_batching_resolves_to_a_size_and_seconds(tmp_path, predictor, lines,
                                                            expected):
    (found,) = load(tmp_path, api(*lines, predictor=predictor)).apis
    assert found.predictor.server_side_batching == expected


def test_a_yaml_file_path_is_accepted_in_place_of_the_folder(tmp_path):
    project = write_project(tmp_path / "p", "", FILES)
    (project / "staging.yaml").write_text(api())
    deployment = load_project(project / "staging.yaml")
    assert deployment.config_file == (project / "staging.yaml").resolve()
    assert deployment.project_dir == project.resolve()


def test_loading_never_imports_the_predictor(tmp_path):
    marker = tmp_path / "imported"
    predictor = f"open({str(marker)!r}, 'w').close()\nraise SystemExit('imported')\n"
    deployment = load(tmp_path, api(), {"predictor.py": predictor})
    assert deployment.apis[0].predictor.path == "predictor.py"
    assert not marker.exists()
    assert "predictor" not in sys.modules


# -- to_yaml ------------------------------------------------------------------------------------


def test_to_yaml_round_trips_through_cortex_yaml(tmp_path):
    text = (
        api(compute(cpu="2.5", mem="123Mi", min_replicas="0", timeout="1.5"),
            "tracker:\n  model_type: classification\n  key: label",
            predictor="path: predictor.py; model: model.json; python_path: lib; "
                      "metadata: {device: cuda, layers: [1, 2], 'on': true}")
        + second_api("onnx:\n  model: s3://my-bucket/model.onnx\n  request_handler: handler.py",
                     "endpoint: /custom/path", name="onnx-api", predictor="")
    )
    first = load(tmp_path, text)
    rendered = to_yaml(first)
    (first.project_dir / "cortex.yaml").write_text(rendered)
    second = load_project(first.project_dir)
    assert second == first
    assert to_yaml(second) == rendered


@pytest.mark.parametrize("interval", ["100ms", "0.0005", "2", "1.5s", "59s"])
def test_server_side_batching_round_trips_through_yaml_and_the_registry(tmp_path, interval):
    first = load(tmp_path, api(predictor=batching(max_batch_size="16", batch_interval=interval)))
    rendered = to_yaml(first)
    (first.project_dir / "cortex.yaml").write_text(rendered)
    assert load_project(first.project_dir) == first
    (found,) = first.apis
    # The registry stores to_dict() as JSON; `inferq get` renders what comes back.
    stored = Api.from_dict(json.loads(json.dumps(found.to_dict())))
    assert stored == found
    shown = yaml.safe_load(api_yaml(stored))["predictor"]["server_side_batching"]
    expected = found.predictor.server_side_batching
    assert shown["max_batch_size"] == expected.max_batch_size == 16
    assert parse_duration(shown["batch_interval"]) == expected.batch_interval


def test_server_side_batching_is_shown_as_a_duration(tmp_path):
    found = load(tmp_path, api(predictor=batching(max_batch_size="8", batch_interval="0.1")))
    assert "server_side_batching:\n      max_batch_size: 8\n      batch_interval: 100ms\n" in (
        to_yaml(found))
    assert "server_side_batching:\n    max_batch_size: 8\n    batch_interval: 100ms\n" in (
        api_yaml(found.apis[0]))


def test_an_api_without_server_side_batching_stores_what_it_stored_before(tmp_path):
    # The API's version hashes to_dict(): a new null key would make every API look changed.
    (found,) = load(tmp_path, api()).apis
    assert found.to_dict()["predictor"] == {"path": "predictor.py", "model": None,
                                            "python_path": ".", "metadata": {}}
    assert Api.from_dict(found.to_dict()) == found


def test_to_yaml_writes_every_key_in_a_readable_order(tmp_path):
    resources = yaml.safe_load(to_yaml(load(tmp_path, api())))
    assert resources[0] == {"kind": "deployment", "name": "shop"}
    assert list(resources[1]) == ["kind", "name", "endpoint", "predictor", "tracker", "compute"]
    assert resources[1]["predictor"] == {"path": "predictor.py", "model": None,
                                         "python_path": ".", "metadata": {},
                                         "server_side_batching": None}
    assert resources[1]["compute"] == {
        "min_replicas": 1, "max_replicas": 100, "init_replicas": 1,
        "target_cpu_utilization": 80, "cpu": "200m", "gpu": 0, "mem": None, "timeout": "60s",
        "max_queue_length": 1024, "upscale_stabilization_period": "0s",
        "downscale_stabilization_period": "30s", "async_retention": "86400s",
    }


def test_async_retention_is_a_duration_left_out_of_the_stored_spec_at_its_default(tmp_path):
    (found,) = load(tmp_path, api(compute(async_retention="2h"))).apis
    assert found.compute.async_retention == 7200.0
    assert found.to_dict()["compute"]["async_retention"] == 7200.0
    (default,) = load(tmp_path, api()).apis
    assert "async_retention" not in default.to_dict()["compute"]  # versions stay as they were
    assert Api.from_dict(default.to_dict()) == default


# -- quantities ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "millicores"), [
    (1, 1000), (0.2, 200), ("200m", 200), ("0.5", 500), ("1", 1000), (2.5, 2500),
    ("1.001", 1001), ("1e3m", 1000), (0, 0),
])
def test_parse_cpu_is_exact_millicores(value, millicores):
    assert parse_cpu(value) == millicores
    assert parse_cpu(format_cpu(millicores)) == millicores


def test_cpu_of_a_fifth_is_200m():
    assert parse_cpu(0.2) == parse_cpu("200m") == parse_cpu("0.2") == 200
    assert (format_cpu(200), format_cpu(1000), format_cpu(2500)) == ("200m", "1", "2500m")


@pytest.mark.parametrize("value", [True, "2x", "-1", -0.5, "0.0001", "1.5m", None, [1], "",
                                   0.1 + 0.2,
                                   float("inf"), float("nan"), "1e99"])
def test_parse_cpu_refuses(value):
    with pytest.raises(ValueError, match=r"CPU|millicore|negative|range"):
        parse_cpu(value)


@pytest.mark.parametrize(("value", "size"), [
    (129e6, 129_000_000), ("129e6", 129_000_000), ("129M", 129_000_000),
    ("123Mi", 123 * 2**20), ("1G", 10**9), ("1Gi", 2**30), ("1.5Gi", 1536 * 2**20),
    ("1k", 1000), ("1K", 1000), ("2Ti", 2 * 2**40), ("1E", 10**18), ("3Ei", 3 * 2**60),
    (1024, 1024), ("1000000000000000000001", 10**21 + 1),
])
def test_parse_mem_is_exact_bytes(value, size):
    assert parse_mem(value) == size
    assert isinstance(parse_mem(value), int)
    assert parse_mem(format_mem(size)) == size


def test_format_mem_picks_the_shortest_exact_form():
    assert format_mem(123 * 2**20) == "123Mi"
    assert format_mem(129_000_000) == "129M"
    assert format_mem(10**12) == "1T"
    assert format_mem(1023) == "1023"
    assert format_mem(0) == "0"


@pytest.mark.parametrize("value", [True, "-1", -1, "1.5", 0.5, "12Zi", "1e-3", "1m", "lots"])
def test_parse_mem_refuses(value):
    with pytest.raises(ValueError, match=r"memory|bytes|negative"):
        parse_mem(value)


@pytest.mark.parametrize(("value", "seconds"), [
    (30, 30.0), (0.5, 0.5), ("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0),
    ("30", 30.0), ("0", 0.0), ("1.5s", 1.5), (1 / 3, 1 / 3),
])
def test_parse_duration_in_seconds(value, seconds):
    assert parse_duration(value) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_duration_prefers_seconds_then_milliseconds():
    assert (format_duration(60.0), format_duration(0.0), format_duration(0.25)) == (
        "60s", "0s", "250ms")


@pytest.mark.parametrize("value", [True, "-1s", -1, "soon", "5d", None])
def test_parse_duration_refuses(value):
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_duration(value)


# -- stream: (an extension) ----------------------------------------------------------------------

STREAM_PROBLEMS = [
    ("no-source", "stream: {sink: out}",
     IRIS + "stream.source: required (the key of the Redis stream the samples arrive on)"),
    ("bad-start", "stream: {source: events, start: latest}",
     IRIS + 'stream.start: must be one of new, all, got "latest"'),
    ("inferq-key", "stream: {source: 'inferq:events'}",
     IRIS + 'stream.source: "inferq:events" is under inferq\'s own keys (inferq: and inferq.); '
            "name the stream otherwise"),
    ("sink-is-source", "stream: {source: events, sink: events}",
     IRIS + 'stream.sink: "events" is the source too; answers added to it would be consumed '
            "again"),
    ("not-redis", "stream: {source: events, url: 'http://example.com'}",
     IRIS + 'stream.url: "http://example.com" is not a Redis URL (redis://host:6379/0, '
            "rediss://... or unix://...)"),
    ("secret-not-echoed", "stream: {source: events, url: 'mysql://:hunter2@db/1'}",
     IRIS + 'stream.url: "mysql://:***@db/1" is not a Redis URL (redis://host:6379/0, '
            "rediss://... or unix://...)"),
    ("bad-max-len", "stream: {source: events, sink_max_len: 0}",
     IRIS + "stream.sink_max_len: must be at least 1, got 0"),
    ("unknown-key", "stream: {source: events, group: mine}",
     IRIS + "stream.group: unknown key (valid keys: field, sink, sink_max_len, source, start, "
            "url)"),
]


@pytest.mark.parametrize(("case", "line", "expected"), STREAM_PROBLEMS,
                         ids=[c[0] for c in STREAM_PROBLEMS])
def test_a_stream_section_reports_each_problem(tmp_path, monkeypatch, case, line, expected):
    assert problems(tmp_path, monkeypatch, api(line)) == [expected]


def test_a_stream_gets_its_defaults_and_dry_run_hides_its_password(tmp_path):
    deployment = load(tmp_path, api("stream: {source: events, url: 'redis://:pw@cache:6380/2'}"))
    stream = deployment.apis[0].stream
    assert (stream.source, stream.sink, stream.start, stream.field, stream.sink_max_len) == (
        "events", "events:predictions", "new", "data", 1_000_000)
    assert stream.dead_letter == "events:predictions:failed"
    assert stream.url == "redis://:pw@cache:6380/2"  # kept whole: the consumer connects with it
    shown = to_yaml(deployment)
    assert "redis://:***@cache:6380/2" in shown and ":pw@" not in shown
    assert Api.from_dict(deployment.apis[0].to_dict()) == deployment.apis[0]
    plain = load(tmp_path / "plain", api()).apis[0]
    assert "stream" not in plain.to_dict()  # an API without one keeps its version
