"""ONNX APIs serve real onnxruntime sessions the way Cortex v0.11 did, handlers unchanged.

Models are built here: an iris LogisticRegression exported by skl2onnx (one float input of
shape [None, 4]) and small graphs made with the ``onnx`` helper API.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ONNX_IRIS_HANDLER
from onnx import TensorProto, helper
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from inferq.errors import PredictionError, PredictorError
from inferq.workers.onnx import OnnxPredictor
from inferq.workers.predictor import import_file

# Cortex v0.11's ONNX iris request handler (examples/sklearn/iris-classifier), verbatim.
LABELS = ["iris-setosa", "iris-versicolor", "iris-virginica"]


@pytest.fixture(scope="module")
def iris(tmp_path_factory):
    """(model path, fitted sklearn model, features) for an iris classifier exported to ONNX."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    features, labels = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=1000).fit(features, labels)
    exported = to_onnx(model, initial_types=[("input", FloatTensorType([None, 4]))])
    path = tmp_path_factory.mktemp("models") / "iris.onnx"
    path.write_bytes(exported.SerializeToString())
    return path, model, features.astype(np.float32)


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime this project supports
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def add_model(tmp_path_factory) -> Path:
    """sum = a + b, two float inputs of shape [None, 3]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        "add",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 3]) for n in ("a", "b")],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [None, 3])],
    )
    return _save(graph, tmp_path_factory.mktemp("models") / "add.onnx")


@pytest.fixture(scope="module")
def double_model(tmp_path_factory) -> Path:
    """twice = ids + ids, one int64 input with a symbolic batch dimension: ["batch", 2]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["ids", "ids"], ["twice"])],
        "double",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2])],
        [helper.make_tensor_value_info("twice", TensorProto.INT64, ["batch", 2])],
    )
    return _save(graph, tmp_path_factory.mktemp("models") / "double.onnx")


def _handler(tmp_path: Path, source: str, name: str = "handler.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return import_file(path, label=name)


def test_single_input_list_sample_predicts_like_sklearn(iris):
    path, model, features = iris
    predictor = OnnxPredictor(path, None, {}, api="iris")
    for row in features[[0, 60, 120]]:
        label, probabilities = predictor.predict(row.tolist())
        assert label == [int(model.predict(row[None])[0])]
        expected = model.predict_proba(row[None])[0]
        assert [probabilities[0][k] for k in range(3)] == pytest.approx(expected, abs=1e-5)
        json.dumps([label, probabilities])  # plain data, ready for the response


def test_v011_iris_request_handler_runs_unchanged(iris, tmp_path):
    path, model, features = iris
    handler = _handler(tmp_path, ONNX_IRIS_HANDLER)
    predictor = OnnxPredictor(path, handler, {}, api="iris")
    for row in features[[0, 60, 120]]:
        sample = dict(zip(("sepal_length", "sepal_width", "petal_length", "petal_width"),
                          row.tolist(), strict=True))
        assert predictor.predict(sample) == LABELS[int(model.predict(row[None])[0])]


def test_handler_gets_session_inputs_outputs_and_metadata(iris, tmp_path):
    path, _, features = iris
    handler = _handler(tmp_path, """
        seen = {}

        def pre_inference(sample, signature, metadata):
            seen["pre"] = ([(a.name, a.type, a.shape) for a in signature], metadata)
            return sample

        def post_inference(prediction, signature, metadata):
            seen["post"] = ([a.name for a in signature], type(prediction[0]).__name__)
            return {"label": int(prediction[0][0])}
    """, name="recording_handler.py")
    predictor = OnnxPredictor(path, handler, {"threshold": "0.5"}, api="iris")
    assert predictor.predict(features[0].tolist()) == {"label": 0}
    assert handler.seen["pre"] == ([("input", "tensor(float)", [None, 4])], {"threshold": "0.5"})
    # post_inference gets sess.run()'s raw list, numpy arrays included, as in v0.11
    assert handler.seen["post"] == (["output_label", "output_probability"], "ndarray")


def test_multi_input_model_takes_a_dict_keyed_by_input_names(add_model):
    predictor = OnnxPredictor(add_model, None, {}, api="add")
    assert predictor.predict({"a": [1, 2, 3], "b": [10, 20, 30]}) == [[[11.0, 22.0, 33.0]]]


def test_single_input_may_come_in_a_dict_under_its_name(double_model):
    predictor = OnnxPredictor(double_model, None, {}, api="double")
    assert predictor.predict({"ids": [3, 4]}) == [[[6, 8]]]


def test_symbolic_dimension_is_one_and_int64_input_is_converted(double_model):
    predictor = OnnxPredictor(double_model, None, {}, api="double")
    assert predictor.predict([[1, 2]]) == [[[2, 4]]]


def test_missing_key_names_it_and_the_expected_inputs(add_model):
    predictor = OnnxPredictor(add_model, None, {}, api="add")
    with pytest.raises(PredictionError) as caught:
        predictor.predict({"a": [1, 2, 3]})
    message = str(caught.value)
    assert message.startswith('api "add": ')
    assert 'missing key "b"' in message
    assert '"a", "b"' in message
    with pytest.raises(PredictionError, match='missing keys "a", "b"'):
        predictor.predict({"a": None})  # v0.11: a null value is a missing key


def test_multi_input_model_rejects_a_non_dict_sample(add_model):
    predictor = OnnxPredictor(add_model, None, {}, api="add")
    with pytest.raises(PredictionError, match='dictionary with keys "a", "b", got list'):
        predictor.predict([1, 2, 3])


def test_strings_into_a_float_input_name_input_dtype_and_shape(iris):
    predictor = OnnxPredictor(iris[0], None, {}, api="iris")
    with pytest.raises(PredictionError) as caught:
        predictor.predict(["a", "b", "c", "d"])
    message = str(caught.value)
    assert 'input "input"' in message
    assert "float32" in message and "[None, 4]" in message
    assert "could not convert string to float" in message


def test_wrong_number_of_values_names_the_shape(iris):
    predictor = OnnxPredictor(iris[0], None, {}, api="iris")
    with pytest.raises(PredictionError, match=r"got 3 value\(s\).*fit shape \[1, 4\]"):
        predictor.predict([1.0, 2.0, 3.0])


def test_array_of_the_wrong_kind_from_pre_inference_is_rejected(iris, tmp_path):
    handler = _handler(tmp_path, """
        import numpy as np

        def pre_inference(sample, signature, metadata):
            return np.array(sample)
    """, name="strings_handler.py")
    predictor = OnnxPredictor(iris[0], handler, {}, api="iris")
    with pytest.raises(PredictionError, match="expected dtype float32 but found <U1"):
        predictor.predict(["a", "b", "c", "d"])


def test_exception_in_a_handler_names_the_file_and_function(iris, tmp_path):
    handler = _handler(tmp_path, ONNX_IRIS_HANDLER, name="iris_handler.py")
    predictor = OnnxPredictor(iris[0], handler, {}, api="iris")
    with pytest.raises(PredictionError) as caught:
        predictor.predict({"sepal_length": 5.1})
    assert "iris_handler.py: pre_inference() raised KeyError: 'sepal_width'" in str(caught.value)


def test_handler_with_a_wrong_signature_fails_at_load_naming_the_file(iris, tmp_path):
    handler = _handler(tmp_path, """
        def pre_inference(sample, metadata):  # the pre-v0.10 signature
            return sample
    """, name="old_handler.py")
    with pytest.raises(PredictorError) as caught:
        OnnxPredictor(iris[0], handler, {}, api="iris", handler_label="src/old_handler.py")
    message = str(caught.value)
    assert message.startswith("src/old_handler.py: pre_inference(sample, metadata)")
    assert "pre_inference(sample, signature, metadata)" in message


def test_corrupt_model_file_fails_at_load_naming_the_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(PredictorError, match=r"^broken\.onnx: onnxruntime cannot load it"):
        OnnxPredictor(path, None, {}, api="broken")


def test_missing_onnxruntime_says_how_to_install_it(iris, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes the import fail
    with pytest.raises(PredictorError, match=r"pip install 'inferq\[onnx\]'"):
        OnnxPredictor(iris[0], None, {}, api="iris")
