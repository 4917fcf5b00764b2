"""Request bytes before any handler runs: size bounds and decoding that never raises."""

from __future__ import annotations

import numpy as np

from tiffin.protos import MAX_MESSAGE_BYTES, protocol
from tiffin.protos.model_config import ModelConfig
from tiffin.server.grpc.decoder import RequestDecoder, Undecodable, peek_model_name
from tiffin.server.limits import (
    PLAIN_REQUEST_MAX_BYTES,
    REQUEST_OVERHEAD_BYTES,
    max_request_bytes,
    message_limit,
)

pb = protocol()


def config(name: str, dims: list[int], datatype: str = "FP32", batch: int = 8) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": name,
            "backend": "onnxruntime",
            "max_batch_size": batch,
            "inputs": [{"name": "x", "datatype": datatype, "dims": dims}],
            "outputs": [{"name": "y", "datatype": datatype, "dims": dims}],
        }
    )


def request(model: str, payload: bytes) -> bytes:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    message.raw_input_contents.append(payload)
    return message.SerializeToString()


def test_the_model_name_is_read_from_the_head_of_the_bytes():
    assert peek_model_name(request("vector", b"")) == "vector"
    assert peek_model_name(request("m" * 300, b"")) == "m" * 300  # a two-byte length
    assert peek_model_name(b"") is None
    assert peek_model_name(b"\x12\x01x") is None  # starts with another field
    assert peek_model_name(b"\x0a\xff\xff") is None  # a length running past the end


def test_fixed_inputs_bound_a_request_by_their_largest_batch():
    # 8 rows of 4 FP32: 128 raw bytes, 320 as typed contents (varint room is per integer
    # type; FP32 is 4 bytes either way).
    assert max_request_bytes(config("v", [4])) == REQUEST_OVERHEAD_BYTES + 8 * 4 * 4
    assert max_request_bytes(config("i", [4], "INT32")) == REQUEST_OVERHEAD_BYTES + 8 * 4 * 10
    assert max_request_bytes(config("v", [-1])) is None
    assert max_request_bytes(config("t", [2], "BYTES")) is None


def test_the_transport_limit_is_the_largest_need_or_the_protocol_limit():
    fixed = [config("a", [4]), config("b", [1_000_000])]
    assert message_limit(fixed) == REQUEST_OVERHEAD_BYTES + 8 * 1_000_000 * 4
    assert message_limit([*fixed, config("c", [-1])]) == MAX_MESSAGE_BYTES
    # Never below what metadata and repository calls may send.
    assert message_limit([config("a", [4])]) == PLAIN_REQUEST_MAX_BYTES


def test_a_pipeline_without_declared_inputs_is_bounded_by_its_steps():
    pipeline = ModelConfig.model_validate(
        {
            "name": "p",
            "pipeline": {"steps": [{"model": "b", "inputs": {"x": "x"}, "outputs": {"y": "y"}}]},
        }
    )
    steps = [config("b", [1_000_000]), pipeline]
    assert message_limit(steps) == REQUEST_OVERHEAD_BYTES + 32_000_000
    assert message_limit([pipeline]) == MAX_MESSAGE_BYTES  # its step is not known


def test_the_decoder_refuses_oversized_and_undecodable_bodies_without_raising():
    decoder = RequestDecoder(pb.ModelInferRequest)
    decoder.limits = {"vector": REQUEST_OVERHEAD_BYTES + 128, "open": None}
    small = decoder(request("vector", np.zeros(4, np.float32).tobytes()))
    assert small.model_name == "vector"
    big = b"\0" * (REQUEST_OVERHEAD_BYTES + 1000)
    refused = decoder(request("vector", big))
    assert isinstance(refused, Undecodable)
    assert "model 'vector' accepts at most" in refused.reason
    assert decoder(request("open", big)).model_name == "open"
    unknown = decoder(request("m" * 1000, big))
    assert isinstance(unknown, Undecodable) and len(unknown.reason) < 300
    broken = decoder(b"\x0a\x05vec")
    assert isinstance(broken, Undecodable)
    assert "is not a valid ModelInferRequest" in broken.reason
