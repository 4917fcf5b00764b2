"""Writes the example model repository's ONNX files, reproducibly (fixed seeds, no downloads).

    python examples/generate_models.py [OUTPUT_DIR]   # default: examples/model_repository

Models:
  classifier  FP32 features[4] -> MLP -> softmax probabilities[3]; versions 1 and 2 differ
              only in their seeded weights. Batches up to 8 (dynamic batching).
  add_sub     INT32 INPUT0[16], INPUT1[16] -> OUTPUT0 = sum, OUTPUT1 = difference.
  uppercase   BYTES text[-1] -> the same strings in upper case (no batch dimension).
The config.yaml files beside them are written by hand and committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # what ONNX opset 17 needs; newer IR versions are beyond onnxruntime 1.31


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="tiffin-examples",
    )
    onnx.checker.check_model(model)
    return model


def classifier(seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((4, 8)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w2 = rng.standard_normal((8, 3)).astype(np.float32)
    b2 = rng.standard_normal(3).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["features", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["h_relu"]),
        helper.make_node("Gemm", ["h_relu", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
        ],
    )
    return _model(graph)


def add_sub() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [
            helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 16])
            for n in ("INPUT0", "INPUT1")
        ],
        [
            helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 16])
            for n in ("OUTPUT0", "OUTPUT1")
        ],
    )
    return _model(graph)


def uppercase() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node(
                "StringNormalizer", ["text"], ["upper"], case_change_action="UPPER", locale="C"
            )
        ],  # "C": present on every machine (ASCII case only)
        "uppercase",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("upper", TensorProto.STRING, ["n"])],
    )
    return _model(graph)


def example_models() -> dict[str, onnx.ModelProto]:
    """Path inside the repository -> model."""
    return {
        "classifier/1/model.onnx": classifier(seed=1),
        "classifier/2/model.onnx": classifier(seed=2),
        "add_sub/1/model.onnx": add_sub(),
        "uppercase/1/model.onnx": uppercase(),
    }


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent / "model_repository"
    for relative, model in example_models().items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
