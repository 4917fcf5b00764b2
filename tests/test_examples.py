"""The committed example models are exactly what examples/generate_models.py writes."""

from __future__ import annotations

import runpy

import onnx
import pytest

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
