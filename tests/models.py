"""Small ONNX models and model repositories built inside tests (fixed seeds, no files committed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import tritonclient.grpc as tc
from onnx import TensorProto, helper

# A toy Echo model (tests/toy_backends.py) run inline: OUTPUT0 = INPUT0, FP32 [2], batch 8.
ECHO = """\
backend: toy_backends:Echo
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [2]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [2]}]
instance_group: [{kind: inline}]
"""

IR_VERSION = 8  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def identity(path: Path, datatype: str = "FP32", shape: list = ("batch", 4)) -> Path:
    """OUTPUT0 = INPUT0."""
    t = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity",
        [helper.make_tensor_value_info("INPUT0", t, list(shape))],
        [helper.make_tensor_value_info("OUTPUT0", t, list(shape))],
    )
    return _save(graph, path)


def write_model(repo: Path, name: str, config: str, versions: dict[int, callable]) -> Path:
    """Writes repo/name/config.yaml and, per version, the file its builder makes."""
    folder = repo / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config)
    for version, build in versions.items():
        build(folder / str(version) / "model.onnx")
    return folder


def write_repository(root: Path, configs: dict[str, str]) -> Path:
    """A repository of file-less models (toy backends, proxies): name -> config.yaml text,
    each with an empty version folder 1."""
    for name, config in configs.items():
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "config.yaml").write_text(config)
    return root


def value_input(*values: float) -> tc.InferInput:
    """INPUT0 for the toy backends: FP32, one value per row."""
    array = np.array(values, np.float32).reshape(-1, 1)
    tensor = tc.InferInput("INPUT0", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor
