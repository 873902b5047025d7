"""The bundled example project configs/examples/iris: its predictor, its model and its config."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import load_iris  # noqa: E402  (after the skip when it is missing)
from sklearn.linear_model import LogisticRegression  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "examples" / "iris"
MODEL = EXAMPLE / "model.json"


def _import(path: Path, name: str):
    """Import a file as a fresh module without leaving __pycache__ in the example project."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


def _metadata() -> dict:
    config = yaml.safe_load((EXAMPLE / "cortex.yaml").read_text())
    return next(r for r in config if r["kind"] == "api")["predictor"].get("metadata") or {}


@pytest.fixture()
def predictor():
    module = _import(EXAMPLE / "predictor.py", "iris_example_predictor")
    module.init(str(MODEL), _metadata())
    return module


@pytest.fixture(scope="module")
def iris():
    return load_iris()


def _sample(row) -> dict:
    keys = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    return {k: float(v) for k, v in zip(keys, row, strict=True)}


def test_shipped_sample_is_setosa(predictor):
    sample = json.loads((EXAMPLE / "sample.json").read_text())
    assert sample == {"sepal_length": 5.2, "sepal_width": 3.6, "petal_length": 1.4,
                      "petal_width": 0.3}
    prediction = predictor.predict(sample, _metadata())
    assert prediction == "setosa"
    json.dumps(prediction)  # JSON-serialisable, as the contract requires


@pytest.mark.parametrize("index, species", [(0, "setosa"), (50, "versicolor"), (100, "virginica")])
def test_one_sample_per_species(predictor, iris, index, species):
    assert iris.target_names[iris.target[index]] == species
    assert predictor.predict(_sample(iris.data[index]), {}) == species


def test_agrees_with_scikit_learn_on_the_full_data(predictor, iris):
    ours = np.array([predictor.predict(_sample(row), {}) for row in iris.data])
    truth = iris.target_names[iris.target]
    assert (ours == truth).mean() >= 0.95

    train = _import(EXAMPLE / "train.py", "iris_example_train")
    reference = LogisticRegression(**train.PARAMS).fit(iris.data, iris.target)
    theirs = iris.target_names[reference.predict(iris.data)]
    assert (ours == theirs).all()

    model = json.loads(MODEL.read_text())
    assert model["classes"] == list(iris.target_names)
    assert model["features"] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    assert model["training_accuracy"] == pytest.approx(reference.score(iris.data, iris.target),
                                                       abs=1e-6)


def test_keys_may_come_in_any_order_and_as_ints(predictor):
    sample = {"petal_width": 2, "petal_length": 6, "sepal_width": 3, "sepal_length": 7}
    assert predictor.predict(sample, {}) == "virginica"


def test_missing_feature_is_named(predictor):
    sample = {"sepal_length": 5.2, "sepal_width": 3.6, "petal_length": 1.4}
    with pytest.raises(ValueError, match="missing feature: petal_width"):
        predictor.predict(sample, {})
    with pytest.raises(ValueError, match="missing features: sepal_width, petal_width"):
        predictor.predict({"sepal_length": 5.2, "petal_length": 1.4}, {})


@pytest.mark.parametrize("bad", [[5.2, 3.6, 1.4, 0.3], "setosa", None])
def test_sample_must_be_an_object(predictor, bad):
    with pytest.raises(TypeError, match="expected a JSON object"):
        predictor.predict(bad, {})


@pytest.mark.parametrize("value", ["5.2", None, True, float("nan")])
def test_non_numeric_feature_is_named(predictor, value):
    sample = {"sepal_length": value, "sepal_width": 3.6, "petal_length": 1.4, "petal_width": 0.3}
    with pytest.raises((TypeError, ValueError), match="feature sepal_length must be a"):
        predictor.predict(sample, {})


def test_init_accepts_a_folder_or_none_and_checks_the_format(tmp_path):
    module = _import(EXAMPLE / "predictor.py", "iris_example_predictor_init")
    with pytest.raises(RuntimeError, match="before init"):
        module.predict({}, {})
    module.init(str(EXAMPLE), None)  # a downloaded folder holding model.json
    module.init(None, {})  # no model: the bundled model.json
    with pytest.raises(ValueError, match="model_format"):
        module.init(str(MODEL), {"model_format": "something-else"})


def test_train_reproduces_model_json(tmp_path):
    """The shipped model is what train.py makes (to the last digits BLAS may vary in)."""
    out = tmp_path / "model.json"
    subprocess.run(
        [sys.executable, "-B", str(EXAMPLE / "train.py"), "--output", str(out)],
        check=True, capture_output=True, text=True, timeout=120,
    )
    made, shipped = json.loads(out.read_text()), json.loads(MODEL.read_text())
    assert made.keys() == shipped.keys()
    for key in made:
        if key in ("coef", "intercept"):
            assert np.allclose(made[key], shipped[key], atol=1e-4), key
        elif isinstance(made[key], float):
            assert made[key] == pytest.approx(shipped[key], abs=1e-4), key
        else:
            assert made[key] == shipped[key], key


def test_cortex_yaml_uses_only_v011_keys():
    config = yaml.safe_load((EXAMPLE / "cortex.yaml").read_text())
    assert [r["kind"] for r in config] == ["deployment", "api"]
    assert config[0] == {"kind": "deployment", "name": "iris"}
    api = config[1]
    assert set(api) <= {"kind", "name", "endpoint", "predictor", "onnx", "tracker", "compute"}
    assert api["name"] == "classifier"
    assert set(api["predictor"]) <= {"path", "model", "python_path", "metadata"}
    assert (EXAMPLE / api["predictor"]["path"]).is_file()
    assert (EXAMPLE / api["predictor"]["model"]).is_file()
    assert api["tracker"] == {"model_type": "classification"}
    assert api["compute"] == {"min_replicas": 1, "max_replicas": 2, "cpu": "200m"}
    assert (EXAMPLE / "requirements.txt").read_text().split() == ["numpy"]


def test_cortex_yaml_loads_with_inferq():
    from inferq.configs import load_project

    deployment = load_project(EXAMPLE)
    (api,) = deployment.apis
    assert (deployment.name, api.name, api.endpoint) == ("iris", "classifier", "/iris/classifier")
    assert api.compute.cpu == 200 and (api.compute.min_replicas, api.compute.max_replicas) == (1, 2)
    assert api.predictor.model == "model.json"
