"""Every datatype the ONNX Runtime backend supports round-trips, raw and as typed contents."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto

from conftest import ServerProcess
from models import ONNX_TYPES, identity, write_model
from tiffin.clients.codec import read_response
from tiffin.protos import method_path, protocol
from tiffin.protos.datatypes import DATATYPES

RNG = np.random.default_rng(7)
TYPES = sorted(ONNX_TYPES)  # BF16: onnxruntime's Python API has no numpy type for it


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BYTES":
        return np.array(
            [
                bytes(RNG.integers(0, 128, i % 5, dtype=np.uint8))
                for i in range(int(np.prod(shape)))
            ],
            dtype=np.object_,
        ).reshape(shape)
    if datatype == "BOOL":
        return RNG.integers(0, 2, shape).astype(bool)
    dtype = DATATYPES[datatype].numpy
    if dtype.kind == "f":
        return RNG.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


@pytest.fixture(scope="module")
def typed_server(tmp_path_factory):
    repo: Path = tmp_path_factory.mktemp("datatypes")
    for datatype in TYPES:
        write_model(
            repo,
            f"identity_{datatype.lower()}",
            "max_batch_size: 8\n",
            {1: partial(identity, datatype=datatype, shape=("batch", 3))},
        )
    server = ServerProcess(repo)
    yield server
    assert server.stop() == 0, server.log()


@pytest.mark.parametrize("datatype", TYPES)
def test_raw_round_trip_with_tritonclient(typed_server, datatype):
    client = tc.InferenceServerClient(typed_server.url)
    data = sample(datatype, (2, 3))
    tensor = tc.InferInput("INPUT0", [2, 3], datatype)
    tensor.set_data_from_numpy(data)
    out = client.infer(f"identity_{datatype.lower()}", [tensor]).as_numpy("OUTPUT0")
    assert out.shape == (2, 3)
    np.testing.assert_array_equal(out, data)


@pytest.mark.parametrize("datatype", [t for t in TYPES if DATATYPES[t].contents_field])
def test_typed_contents_round_trip(typed_server, datatype):
    pb = protocol()
    data = sample(datatype, (1, 3))
    request = pb.ModelInferRequest(model_name=f"identity_{datatype.lower()}")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=[1, 3])
    values = [v for v in data.reshape(-1)]
    getattr(tensor.contents, DATATYPES[datatype].contents_field).extend(
        values if datatype == "BYTES" else [v.item() for v in values]
    )
    with grpc.insecure_channel(typed_server.url) as channel:
        response = channel.unary_unary(
            method_path("ModelInfer"),
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )(request, timeout=10)
    assert response.outputs[0].datatype == datatype
    np.testing.assert_array_equal(read_response(response)["OUTPUT0"], data)


def test_bfloat16_model_is_refused_with_its_reason(tmp_path):
    from tiffin.server.repository import read_model

    folder = write_model(
        tmp_path,
        "bf16",
        "max_batch_size: 8\n",
        {1: lambda path: identity(path, datatype="FP32", shape=("batch", 3))},
    )
    model = onnx_with_type(folder / "1" / "model.onnx", TensorProto.BFLOAT16)
    assert model.exists()
    (version,) = read_model(folder).versions
    assert version.config is None
    assert "bfloat16" in version.error and "FP16 or FP32" in version.error


def onnx_with_type(path: Path, elem_type: int) -> Path:
    import onnx

    model = onnx.load(path)
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.elem_type = elem_type
    onnx.save(model, path)
    return path
