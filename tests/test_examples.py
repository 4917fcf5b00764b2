"""The example repository: its committed models are exactly what examples/generate_models.py
writes, and the torch, python and pipeline examples answer as the README tour says."""

from __future__ import annotations

import json
import runpy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from conftest import EXAMPLES, ROOT

GENERATOR = runpy.run_path(str(ROOT / "examples" / "generate_models.py"))


@pytest.mark.parametrize("relative", sorted(GENERATOR["example_models"]()))
def test_example_model_is_reproducible(relative):
    regenerated = GENERATOR["example_models"]()[relative]
    committed = onnx.load(EXAMPLES / relative)
    assert committed.graph == regenerated.graph
    assert committed.ir_version == regenerated.ir_version
    assert list(committed.opset_import) == list(regenerated.opset_import)


def test_classifier_versions_differ():
    models = GENERATOR["example_models"]()
    assert models["classifier/1/model.onnx"].graph != models["classifier/2/model.onnx"].graph


@pytest.mark.parametrize("relative", sorted(GENERATOR["example_programs"]()))
def test_example_torch_program_is_reproducible(relative):
    assert (EXAMPLES / relative).read_bytes() == GENERATOR["example_programs"]()[relative]


MEASUREMENTS = [
    {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3},
    {"sepal_length": -2.0, "sepal_width": 0.5, "petal_length": 0.1, "petal_width": 4.0},
]
LABELS = np.array(["setosa", "versicolor", "virginica"])


def classifier_v1(features: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(EXAMPLES / "classifier" / "1" / "model.onnx"), options, ["CPUExecutionProvider"]
    )
    return session.run(None, {"features": features})[0]


def json_input(records: list[dict]) -> tc.InferInput:
    texts = np.array([[json.dumps(r).encode()] for r in records], dtype=np.object_)
    tensor = tc.InferInput("json", list(texts.shape), "BYTES")
    tensor.set_data_from_numpy(texts)
    return tensor


def test_torch_example_answers_as_classifier_version_1(example_server):
    client = tc.InferenceServerClient(example_server.url)
    features = np.random.default_rng(7).standard_normal((5, 4)).astype(np.float32)
    tensor = tc.InferInput("features", [5, 4], "FP32")
    tensor.set_data_from_numpy(features)
    answer = client.infer("classifier_torch", [tensor]).as_numpy("probabilities")
    np.testing.assert_allclose(answer, classifier_v1(features), rtol=1e-5, atol=1e-6)


def test_pipeline_example_json_to_top_labels(example_server):
    client = tc.InferenceServerClient(example_server.url)
    result = client.infer("classify_json", [json_input(MEASUREMENTS)])
    features = np.array([list(r.values()) for r in MEASUREMENTS], dtype=np.float32)
    probabilities = classifier_v1(features)
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :2]
    assert result.as_numpy("labels").astype(str).tolist() == LABELS[best].tolist()
    np.testing.assert_allclose(
        result.as_numpy("scores"), np.take_along_axis(probabilities, best, axis=1), rtol=1e-6
    )


def test_pipeline_example_names_the_step_that_rejects_bad_json(example_server):
    client = tc.InferenceServerClient(example_server.url)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("classify_json", [json_input([{"sepal_length": 1.0}])])
    assert raised.value.status() == "StatusCode.INTERNAL"
    message = raised.value.message()
    assert "pipeline 'classify_json' step 1 (model 'parse_measurements')" in message
    assert "the measurements lack sepal_width, petal_length, petal_width" in message
