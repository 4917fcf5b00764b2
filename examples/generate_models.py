"""Writes the example model repository's model files, reproducibly (fixed seeds, no downloads).

    python examples/generate_models.py [OUTPUT_DIR]   # default: examples/model_repository

Models:
  classifier  FP32 features[4] -> MLP -> softmax probabilities[3]; versions 1 and 2 differ
              only in their seeded weights. Batches up to 8 (dynamic batching).
  add_sub     INT32 INPUT0[16], INPUT1[16] -> OUTPUT0 = sum, OUTPUT1 = difference.
  uppercase   BYTES text[-1] -> the same strings in upper case (no batch dimension).
  classifier_torch  the same network and weights as classifier version 1, written by PyTorch
              as a torch.export program (model.pt2); needs torch.
The config.yaml files (and the python models' model.py) beside them are written by hand.
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


def classifier_weights(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """w1 [4, 8], b1 [8], w2 [8, 3], b2 [3]: features @ w1 + b1 -> relu -> @ w2 + b2."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((4, 8)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w2 = rng.standard_normal((8, 3)).astype(np.float32)
    b2 = rng.standard_normal(3).astype(np.float32)
    return w1, b1, w2, b2


def classifier(seed: int) -> onnx.ModelProto:
    w1, b1, w2, b2 = classifier_weights(seed)
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


def classifier_torch() -> bytes:
    """classifier version 1 as a torch.export program with a dynamic batch dimension."""
    import io

    import torch

    w1, b1, w2, b2 = classifier_weights(seed=1)

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(4, 8)
            self.out = torch.nn.Linear(8, 3)
            with torch.no_grad():
                self.hidden.weight.copy_(torch.from_numpy(w1.T.copy()))
                self.hidden.bias.copy_(torch.from_numpy(b1))
                self.out.weight.copy_(torch.from_numpy(w2.T.copy()))
                self.out.bias.copy_(torch.from_numpy(b2))

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.out(torch.relu(self.hidden(features))), dim=-1)

    # The program records the module's import path; keep it the same however this file is run.
    Classifier.__module__, Classifier.__qualname__ = "tiffin_examples", "Classifier"
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        Classifier().eval(), (torch.zeros(2, 4),), dynamic_shapes={"features": {0: batch}}
    )
    for node in program.graph_module.graph.nodes:
        node.meta.pop("stack_trace", None)  # holds this machine's file paths
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def example_programs() -> dict[str, bytes]:
    """Path inside the repository -> file bytes of the models written by PyTorch."""
    return {"classifier_torch/1/model.pt2": classifier_torch()}


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
    for relative, data in example_programs().items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
