"""End to end: `serverctl serve` on the examples, driven by tritonclient and our own clients."""

from __future__ import annotations

import asyncio
import queue

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import EXAMPLES
from tiffin.clients import AsyncInferenceClient, InferenceClient
from tiffin.protos import method_path, protocol

RNG = np.random.default_rng(1234)


def in_process(model: str, version: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(EXAMPLES / model / str(version) / "model.onnx"),
        options,
        providers=["CPUExecutionProvider"],
    )
    return session.run(None, feeds)


def features(batch: int) -> np.ndarray:
    return RNG.standard_normal((batch, 4)).astype(np.float32)


def triton_input(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.fixture
def client(example_server) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(example_server.url)


def test_health_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "tiffin"
    assert set(meta.extensions) == {
        "model_configuration",
        "statistics",
        "model_repository",
        "binary_tensor_data",
    }
    assert client.is_model_ready("classifier")
    assert client.is_model_ready("classifier", "1")


def test_model_metadata_has_batch_dimension(client):
    meta = client.get_model_metadata("classifier")
    assert sorted(meta.versions) == ["1", "2"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("features", "FP32", [-1, 4])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probabilities", "FP32", [-1, 3])
    ]
    # A model without batching shows its dims as they are.
    upper = client.get_model_metadata("uppercase")
    assert list(upper.inputs[0].shape) == [-1] and upper.versions == ["1"]


def test_model_config_fields_clients_read(client):
    config = client.get_model_config("classifier").config
    assert config.name == "classifier" and config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    assert [(i.name, list(i.dims)) for i in config.input] == [("features", [4])]
    assert config.input[0].data_type == tc.model_config_pb2.TYPE_FP32
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 200
    assert not config.HasField("sequence_batching")
    assert config.version_policy.latest.num_versions == 2
    assert config.instance_group[0].kind == tc.model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert client.get_model_config("uppercase").config.max_batch_size == 0


@pytest.mark.parametrize("version", [1, 2])
def test_infer_matches_onnxruntime_in_process(client, version):
    x = features(5)
    result = client.infer(
        "classifier",
        [triton_input("features", x, "FP32")],
        model_version=str(version),
        request_id="req-7",
    )
    expected = in_process("classifier", version, {"features": x})[0]
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)
    response = result.get_response()
    assert response.id == "req-7" and response.model_version == str(version)


def test_newest_version_serves_when_none_given(client):
    x = features(1)
    result = client.infer("classifier", [triton_input("features", x, "FP32")])
    assert result.get_response().model_version == "2"
    np.testing.assert_array_equal(
        result.as_numpy("probabilities"), in_process("classifier", 2, {"features": x})[0]
    )


def test_requested_output_selection(client):
    a = RNG.integers(-100, 100, (2, 16), dtype=np.int32)
    b = RNG.integers(-100, 100, (2, 16), dtype=np.int32)
    inputs = [triton_input("INPUT0", a, "INT32"), triton_input("INPUT1", b, "INT32")]
    only_diff = client.infer("add_sub", inputs, outputs=[tc.InferRequestedOutput("OUTPUT1")])
    assert [o.name for o in only_diff.get_response().outputs] == ["OUTPUT1"]
    np.testing.assert_array_equal(only_diff.as_numpy("OUTPUT1"), a - b)
    both = client.infer("add_sub", inputs)
    np.testing.assert_array_equal(both.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(both.as_numpy("OUTPUT1"), a - b)
    assert len(both.get_response().raw_output_contents) == 2


def test_bytes_tensors(client):
    text = np.array([b"hello", b"", "w\xf6rld".encode()], dtype=np.object_)
    result = client.infer("uppercase", [triton_input("text", text, "BYTES")])
    assert list(result.as_numpy("upper")) == [b"HELLO", b"", "W\xf6RLD".encode()]


def _raw_infer(url: str, request):
    pb = protocol()
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(
            method_path("ModelInfer"),
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        return call(request, timeout=10)


def test_typed_contents_inputs(example_server):
    pb = protocol()
    x = features(2)
    request = pb.ModelInferRequest(model_name="classifier", model_version="1")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[2, 4])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    response = _raw_infer(example_server.url, request)
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 3)
    np.testing.assert_array_equal(got, in_process("classifier", 1, {"features": x})[0])

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16]).contents.int_contents.extend(
            a.reshape(-1).tolist()
        )
    response = _raw_infer(example_server.url, request)
    assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[0], np.int32), 2 * a[0]
    )

    request = pb.ModelInferRequest(model_name="uppercase")
    request.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
        [b"ab", b"c"]
    )
    response = _raw_infer(example_server.url, request)
    assert response.raw_output_contents[0] == b"\x02\x00\x00\x00AB\x01\x00\x00\x00C"


def test_stream_infer_answers_in_order_with_ids_and_final_flag(example_server):
    client = tc.InferenceServerClient(example_server.url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = {}
    try:
        for i in range(20):
            x = features(1 + i % 4)
            sent[str(i)] = x
            client.async_stream_infer(
                "classifier",
                [triton_input("features", x, "FP32")],
                request_id=str(i),
                model_version="1",
            )
        got = [answers.get(timeout=10) for _ in range(20)]
    finally:
        client.stop_stream()
    assert [error for _, error in got] == [None] * 20
    ids = [result.get_response().id for result, _ in got]
    assert ids == [str(i) for i in range(20)]
    for result, _ in got:
        response = result.get_response()
        assert response.parameters["triton_final_response"].bool_param is True
        expected = in_process("classifier", 1, {"features": sent[response.id]})[0]
        np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)


def test_aio_tritonclient_infer_and_stream(example_server):
    async def main():
        client = tca.InferenceServerClient(example_server.url)
        try:
            x = features(3)
            unary = await client.infer("classifier", [triton_input("features", x, "FP32")])
            np.testing.assert_array_equal(
                unary.as_numpy("probabilities"), in_process("classifier", 2, {"features": x})[0]
            )

            async def requests():
                for i in range(5):
                    yield {
                        "model_name": "classifier",
                        "request_id": f"s{i}",
                        "inputs": [triton_input("features", x, "FP32")],
                    }

            ids = []
            async for result, error in client.stream_infer(requests()):
                assert error is None
                ids.append(result.get_response().id)
            assert ids == [f"s{i}" for i in range(5)]
        finally:
            await client.close()

    asyncio.run(main())


def test_statistics_count_requests(client):
    before = client.get_inference_statistics("classifier", "1").model_stats[0]
    for _ in range(3):
        client.infer(
            "classifier", [triton_input("features", features(2), "FP32")], model_version="1"
        )
    after = client.get_inference_statistics("classifier", "1").model_stats[0]
    assert after.name == "classifier" and after.version == "1"
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == 3
    assert after.inference_count - before.inference_count == 6
    assert after.execution_count - before.execution_count == 3
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert any(b.batch_size == 2 for b in after.batch_stats)
    everything = client.get_inference_statistics()
    assert {(s.name, s.version) for s in everything.model_stats} >= {
        ("classifier", "1"),
        ("classifier", "2"),
        ("add_sub", "1"),
        ("uppercase", "1"),
    }


def test_repository_index(client):
    index = client.get_model_repository_index()
    assert {(m.name, m.version, m.state) for m in index.models} == {
        ("add_sub", "1", "READY"),
        ("classifier", "1", "READY"),
        ("classifier", "2", "READY"),
        ("uppercase", "1", "READY"),
        ("classifier_torch", "1", "READY"),
        ("parse_measurements", "1", "READY"),
        ("top_labels", "1", "READY"),
        ("classify_json", "1", "READY"),
    }


def test_grpc_health_service_per_model(example_server):
    with grpc.insecure_channel(example_server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "classifier", "uppercase"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_reflection_lists_and_describes_services(example_server):
    with grpc.insecure_channel(example_server.url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="inference.GRPCInferenceService"
            ),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # the compiled inference.proto


def test_own_clients_beside_tritonclient(example_server):
    """tritonclient is imported (default descriptor pool) and our clients still work."""
    assert tc.service_pb2.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    x = features(2)
    with InferenceClient(example_server.url, timeout=10) as ours:
        assert ours.is_server_ready() and ours.is_model_ready("classifier")
        assert ours.model_config("classifier").max_batch_size == 8
        got = ours.infer("classifier", {"features": x}, version="1")["probabilities"]
        np.testing.assert_array_equal(got, in_process("classifier", 1, {"features": x})[0])
        text = ours.infer("uppercase", {"text": np.array([b"abc"], dtype=object)})["upper"]
        assert list(text) == [b"ABC"]

    async def main():
        async with AsyncInferenceClient(example_server.url, timeout=10) as aio:
            return await aio.infer("classifier", {"features": x}, version="1")

    np.testing.assert_array_equal(asyncio.run(main())["probabilities"], got)
