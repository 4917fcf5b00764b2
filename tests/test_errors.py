"""Every way a request can go wrong, against a real server: gRPC status code and message.

The codes and wording follow Triton (shared/PROTOCOL.md §0, §3.2, §3.3, §3.5, §6). Requests
that `tritonclient.grpc` can express go through it; malformed ones it would refuse locally
are built as raw protobuf with our own messages and sent on a plain channel.
"""

from __future__ import annotations

import queue
import struct
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess
from models import identity, write_model
from tiffin.protos import method_path, protocol

CALL_TIMEOUT = 10.0  # seconds, on every RPC: no test may hang on a server that never answers

pb = protocol()


# ---- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def client(example_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(example_server.url)
    yield c
    c.close()


def expect_client_error(call, code: grpc.StatusCode, *fragments: str) -> InferenceServerException:
    """Runs a tritonclient call that must fail with `code` and a message holding `fragments`."""
    with pytest.raises(InferenceServerException) as info:
        call()
    err = info.value
    assert err.status() == str(code), f"{err.status()}: {err.message()}"
    for fragment in fragments:
        assert fragment in err.message(), f"{fragment!r} not in {err.message()!r}"
    return err


def raw_rpc(url: str, rpc: str, request, response_cls=None):
    """One unary call with our own protobuf messages; returns the response or raises RpcError."""
    if response_cls is None:
        response_cls = getattr(pb, rpc + "Response")
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(
            method_path(rpc),
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        return call(request, timeout=CALL_TIMEOUT)


def expect_raw_error(
    url: str, rpc: str, request, code: grpc.StatusCode, *fragments: str
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        raw_rpc(url, rpc, request)
    err = info.value
    assert err.code() == code, f"{err.code()}: {err.details()}"
    for fragment in fragments:
        assert fragment in err.details(), f"{fragment!r} not in {err.details()!r}"
    return err


def raw_infer(url: str, request):
    return raw_rpc(url, "ModelInfer", request)


def expect_infer_error(
    url: str, request, *fragments: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
) -> grpc.RpcError:
    return expect_raw_error(url, "ModelInfer", request, code, *fragments)


def classifier_request(batch: int = 1, request_id: str = "") -> object:
    """A well-formed raw ModelInferRequest for the example classifier."""
    request = pb.ModelInferRequest(model_name="classifier", id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=[batch, 4])
    request.raw_input_contents.append(np.ones((batch, 4), np.float32).tobytes())
    return request


def add_sub_request(batch: int = 1) -> object:
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[batch, 16])
        request.raw_input_contents.append(np.arange(batch * 16, dtype=np.int32).tobytes())
    return request


def classifier_inputs(
    array: np.ndarray, datatype: str = "FP32", name: str = "features"
) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return [tensor]


def int32_input(name: str, shape: list[int]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, shape, "INT32")
    tensor.set_data_from_numpy(np.zeros(shape, np.int32))
    return tensor


def client_infer(client: grpcclient.InferenceServerClient, model: str, inputs, **kwargs):
    return client.infer(model, inputs, client_timeout=CALL_TIMEOUT, **kwargs)


def assert_classifier_serves(url: str) -> None:
    c = grpcclient.InferenceServerClient(url)
    try:
        result = client_infer(c, "classifier", classifier_inputs(np.ones((2, 4), np.float32)))
        assert result.as_numpy("probabilities").shape == (2, 3)
    finally:
        c.close()


# ---- unknown models and versions --------------------------------------------------------------


UNKNOWN_MODEL_CALLS = {
    "ModelInfer": lambda c: client_infer(c, "x", classifier_inputs(np.ones((1, 4), np.float32))),
    "ModelReady": lambda c: c.is_model_ready("x", client_timeout=CALL_TIMEOUT),
    "ModelMetadata": lambda c: c.get_model_metadata("x", client_timeout=CALL_TIMEOUT),
    "ModelConfig": lambda c: c.get_model_config("x", client_timeout=CALL_TIMEOUT),
}


@pytest.mark.parametrize("rpc", sorted(UNKNOWN_MODEL_CALLS))
def test_unknown_model_is_invalid_argument(client, rpc):
    expect_client_error(
        lambda: UNKNOWN_MODEL_CALLS[rpc](client),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Request for unknown model: 'x' is not found",
    )


def test_unknown_model_ready_is_an_error_not_false(example_server):
    # ModelReady on an unknown name is an error, never ready=false (PROTOCOL §0.1).
    expect_raw_error(
        example_server.url,
        "ModelReady",
        pb.ModelReadyRequest(name="x"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Request for unknown model: 'x' is not found",
    )


VERSIONED_CALLS = {
    "ModelInfer": lambda c, v: client_infer(
        c, "classifier", classifier_inputs(np.ones((1, 4), np.float32)), model_version=v
    ),
    "ModelReady": lambda c, v: c.is_model_ready("classifier", v, client_timeout=CALL_TIMEOUT),
    "ModelMetadata": lambda c, v: c.get_model_metadata(
        "classifier", v, client_timeout=CALL_TIMEOUT
    ),
    "ModelConfig": lambda c, v: c.get_model_config("classifier", v, client_timeout=CALL_TIMEOUT),
}


@pytest.mark.parametrize("rpc", sorted(set(VERSIONED_CALLS) - {"ModelReady"}))
def test_unknown_explicit_version_is_not_found(client, rpc):
    expect_client_error(
        lambda: VERSIONED_CALLS[rpc](client, "7"),
        grpc.StatusCode.NOT_FOUND,
        "'classifier' version 7 is not found",
    )


def test_model_ready_answers_false_for_a_version_that_does_not_serve(client):
    """ModelReady is a probe: a known model's missing version is not ready, not an error."""
    assert not client.is_model_ready("classifier", "7", client_timeout=CALL_TIMEOUT)


@pytest.mark.parametrize("version", ["abc", "-1", "1.0"])
@pytest.mark.parametrize("rpc", sorted(VERSIONED_CALLS))
def test_non_integer_version_is_invalid_argument(client, rpc, version):
    expect_client_error(
        lambda: VERSIONED_CALLS[rpc](client, version),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"failed to get model version from specified version string '{version}'",
    )


# ---- repositories with broken models ----------------------------------------------------------


GOOD_CONFIG = "backend: onnxruntime\nmax_batch_size: 8\n"


def identity_request(model: str, version: str = "") -> object:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return request


def test_broken_models_have_no_available_versions(tmp_path, make_server):
    repo = tmp_path / "models"
    write_model(repo, "good", GOOD_CONFIG, {1: identity})
    # A misspelt field: the config does not validate, the model as a whole is UNAVAILABLE.
    write_model(repo, "bad_config", GOOD_CONFIG + "max_batch_sise: 4\n", {1: identity})
    # A version folder without its model file: that version is UNAVAILABLE.
    write_model(repo, "no_file", GOOD_CONFIG, {})
    (repo / "no_file" / "1").mkdir()
    # A model file that is not ONNX at all.
    write_model(repo, "garbage_file", GOOD_CONFIG, {})
    (repo / "garbage_file" / "1").mkdir()
    (repo / "garbage_file" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    # A model folder without config.yaml.
    identity(repo / "no_config" / "1" / "model.onnx")
    server = make_server(repo)

    for model in ("bad_config", "no_file", "garbage_file", "no_config"):
        expect_infer_error(
            server.url,
            identity_request(model),
            f"Request for unknown model: '{model}' has no available versions",
            code=grpc.StatusCode.NOT_FOUND,
        )
        assert not raw_rpc(server.url, "ModelReady", pb.ModelReadyRequest(name=model)).ready
        expect_raw_error(
            server.url,
            "ModelMetadata",
            pb.ModelMetadataRequest(name=model),
            grpc.StatusCode.NOT_FOUND,
            f"'{model}' has no available versions",
        )

    c = grpcclient.InferenceServerClient(server.url)
    try:
        index = c.get_model_repository_index(as_json=True, client_timeout=CALL_TIMEOUT)
        entries = {m["name"]: m for m in index["models"]}
        assert entries["good"]["state"] == "READY"
        assert entries["bad_config"]["state"] == "UNAVAILABLE"
        assert "config.yaml" in entries["bad_config"]["reason"]
        assert "max_batch_sise" in entries["bad_config"]["reason"]
        assert entries["no_file"]["state"] == "UNAVAILABLE"
        assert "model.onnx" in entries["no_file"]["reason"]
        assert entries["garbage_file"]["state"] == "UNAVAILABLE"
        assert "garbage_file/1/model.onnx" in entries["garbage_file"]["reason"]
        assert entries["no_config"]["state"] == "UNAVAILABLE"
        assert "config.yaml" in entries["no_config"]["reason"]

        # The healthy model of the same repository still serves.
        tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        data = np.arange(4, dtype=np.float32).reshape(1, 4)
        tensor.set_data_from_numpy(data)
        result = client_infer(c, "good", [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    finally:
        c.close()


def test_explicit_version_that_is_unavailable(tmp_path, make_server):
    repo = tmp_path / "models"
    write_model(repo, "multi", GOOD_CONFIG + "version_policy:\n  all: {}\n", {1: identity})
    (repo / "multi" / "2").mkdir()  # version 2 exists but has no model.onnx
    server = make_server(repo)

    expect_infer_error(
        server.url,
        identity_request("multi", "2"),
        "Request for unknown model: 'multi' version 2 is not at ready state",
        code=grpc.StatusCode.UNAVAILABLE,
    )
    request = pb.ModelReadyRequest(name="multi", version="2")
    assert not raw_rpc(server.url, "ModelReady", request).ready
    # Without a version, the ready version 1 serves.
    response = raw_infer(server.url, identity_request("multi"))
    assert response.model_version == "1"
    assert raw_rpc(server.url, "ModelReady", pb.ModelReadyRequest(name="multi", version="1")).ready


# ---- malformed inference requests -------------------------------------------------------------


def test_missing_input(client):
    expect_client_error(
        lambda: client_infer(client, "add_sub", [int32_input("INPUT0", [1, 16])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'add_sub'",
        "missing required input(s) ['INPUT1']",
    )


def test_unknown_input(client):
    inputs = classifier_inputs(np.ones((1, 4), np.float32))
    inputs += classifier_inputs(np.ones((1, 4), np.float32), name="bogus")
    expect_client_error(
        lambda: client_infer(client, "classifier", inputs),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unexpected inference input 'bogus' for model 'classifier'",
    )


def test_same_input_twice(example_server):
    request = classifier_request()
    request.inputs.add(name="features", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    expect_infer_error(example_server.url, request, "'features'", "'classifier'", "twice")


def test_wrong_datatype(client):
    inputs = classifier_inputs(np.ones((1, 4), np.float64), datatype="FP64")
    expect_client_error(
        lambda: client_infer(client, "classifier", inputs),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inference input 'features' data-type is 'FP64', but model 'classifier' expects 'FP32'",
    )


@pytest.mark.parametrize(
    "shape, shown",
    [
        ((4,), "[4]"),  # rank: the batch dimension is missing
        ((1, 4, 1), "[1,4,1]"),  # rank: one too many
        ((1, 5), "[1,5]"),  # size of a fixed dimension
    ],
)
def test_wrong_shape(client, shape, shown):
    inputs = classifier_inputs(np.ones(shape, np.float32))
    expect_client_error(
        lambda: client_infer(client, "classifier", inputs),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unexpected shape for input 'features' for model 'classifier'. "
        f"Expected [-1,4], got {shown}",
    )


def test_wrong_shape_without_batching(client):
    # uppercase has max_batch_size 0: its shape is [-1] exactly, so rank 2 is wrong.
    tensor = grpcclient.InferInput("text", [1, 2], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=np.object_))
    expect_client_error(
        lambda: client_infer(client, "uppercase", [tensor]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unexpected shape for input 'text' for model 'uppercase'. Expected [-1], got [1,2]",
    )


def test_batch_above_max_batch_size(client):
    inputs = classifier_inputs(np.ones((9, 4), np.float32))
    expect_client_error(
        lambda: client_infer(client, "classifier", inputs),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inference request batch-size must be <= 8 for 'classifier'",
    )


def test_batch_size_disagreement_between_inputs(client):
    inputs = [int32_input("INPUT0", [2, 16]), int32_input("INPUT1", [3, 16])]
    expect_client_error(
        lambda: client_infer(client, "add_sub", inputs),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'INPUT1' has batch size 3",
        "has 2",
        "'add_sub'",
    )


def test_raw_byte_size_mismatch(example_server):
    request = classifier_request()
    request.raw_input_contents[0] = np.ones(3, np.float32).tobytes()
    expect_infer_error(
        example_server.url,
        request,
        "input byte size mismatch for input 'features' for model 'classifier'. Expected 16, got 12",
    )


def test_fewer_raw_contents_than_inputs(example_server):
    request = add_sub_request()
    del request.raw_input_contents[1]
    expect_infer_error(
        example_server.url,
        request,
        "unable to find data for input tensor 'INPUT1' for model 'add_sub' in request",
    )


def test_more_raw_contents_than_inputs(example_server):
    request = classifier_request()
    request.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    expect_infer_error(
        example_server.url, request, "'classifier'", "2 raw_input_contents entries", "only 1 inputs"
    )


def test_typed_contents_with_wrong_field(example_server):
    request = pb.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, 4])
    tensor.contents.int_contents.extend([1, 2, 3, 4])
    expect_infer_error(
        example_server.url, request, "'features'", "'classifier'", "fp32_contents", "int_contents"
    )


def test_typed_contents_with_wrong_element_count(example_server):
    request = pb.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    expect_infer_error(
        example_server.url, request, "'features'", "'classifier'", "expected 4 elements", "got 3"
    )


def test_typed_contents_accepted(example_server):
    # The counterpart of the two tests above: the right field and count are served.
    request = pb.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    response = raw_infer(example_server.url, request)
    assert [o.name for o in response.outputs] == ["probabilities"]


def test_raw_and_typed_contents_mixed(example_server):
    request = pb.ModelInferRequest(model_name="add_sub")
    typed = request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    typed.contents.int_contents.extend(range(16))
    request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    request.raw_input_contents.append(np.zeros(16, np.int32).tobytes())
    # Triton: "contents field must not be specified when using raw_input_contents for
    # 'INPUT0' for model 'add_sub'".
    expect_infer_error(
        example_server.url,
        request,
        "contents field must not be specified when using raw_input_contents",
        "'INPUT0'",
        "'add_sub'",
    )


def test_malformed_bytes_length_prefix(example_server):
    request = pb.ModelInferRequest(model_name="uppercase")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", 100) + b"abc")  # claims 100, has 3
    expect_infer_error(example_server.url, request, "'text'", "'uppercase'", "100", "3")


def test_unknown_requested_output(client):
    inputs = classifier_inputs(np.ones((1, 4), np.float32))
    outputs = [grpcclient.InferRequestedOutput("nope")]
    expect_client_error(
        lambda: client_infer(client, "classifier", inputs, outputs=outputs),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unexpected inference output 'nope' for model 'classifier'",
    )


# ---- request parameters -----------------------------------------------------------------------


def test_reserved_triton_parameter_rejected(example_server):
    request = classifier_request()
    request.parameters["triton_foo"].bool_param = True
    expect_infer_error(example_server.url, request, "'triton_foo'")


def test_enable_empty_final_response_accepted_on_unary(example_server):
    # perf_analyzer's C++ client puts it on every request (PROTOCOL §0.5).
    request = classifier_request(request_id="with-flag")
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    response = raw_infer(example_server.url, request)
    assert response.id == "with-flag"
    assert [o.name for o in response.outputs] == ["probabilities"]


def test_priority_with_string_value_rejected(example_server):
    request = classifier_request()
    request.parameters["priority"].string_param = "high"
    expect_infer_error(example_server.url, request, "invalid value type for 'priority' parameter")


# ---- transport limits -------------------------------------------------------------------------


def test_message_over_size_limit(make_server, example_onnx_copy):
    server = make_server(example_onnx_copy, "--max-message-bytes", "1048576")
    c = grpcclient.InferenceServerClient(server.url)
    try:
        big = grpcclient.InferInput("text", [1], "BYTES")
        big.set_data_from_numpy(np.array([b"a" * (2 * 1024 * 1024)], dtype=np.object_))
        expect_client_error(
            lambda: client_infer(c, "uppercase", [big]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
            "vs. 1048576",
        )
        # The server keeps serving, on the same channel and on a fresh one.
        small = grpcclient.InferInput("text", [2], "BYTES")
        small.set_data_from_numpy(np.array([b"ab", b"cd"], dtype=np.object_))
        result = client_infer(c, "uppercase", [small])
        assert list(result.as_numpy("upper")) == [b"AB", b"CD"]
    finally:
        c.close()
    assert_classifier_serves(server.url)


# ---- streaming ---------------------------------------------------------------------------------


def test_stream_error_is_in_band_and_stream_stays_usable(client):
    results: queue.Queue = queue.Queue()
    client.start_stream(
        callback=lambda result, error: results.put((result, error)), stream_timeout=30
    )
    try:
        good = classifier_inputs(np.ones((1, 4), np.float32))
        bad = classifier_inputs(np.ones((1, 5), np.float32))
        client.async_stream_infer("classifier", good, request_id="good-1")
        client.async_stream_infer("classifier", bad, request_id="bad-1")
        client.async_stream_infer("classifier", good, request_id="good-2")
        received = [results.get(timeout=CALL_TIMEOUT) for _ in range(3)]
    finally:
        client.stop_stream()

    # Non-decoupled responses come back in request order.
    (first, first_err), (second, second_err), (third, third_err) = received
    assert first_err is None and third_err is None
    assert first.get_response().id == "good-1"
    assert third.get_response().id == "good-2"
    assert first.as_numpy("probabilities").shape == (1, 3)
    assert second is None
    assert isinstance(second_err, InferenceServerException)
    assert second_err.status() is None  # in-band, not a gRPC status
    assert (
        "unexpected shape for input 'features' for model 'classifier'. Expected [-1,4], got [1,5]"
    ) in second_err.message()


def test_raw_stream_error_carries_request_id(example_server):
    bad = classifier_request(request_id="bad-1")
    bad.inputs[0].shape[:] = [1, 5]
    bad.raw_input_contents[0] = np.ones((1, 5), np.float32).tobytes()
    unknown = pb.ModelInferRequest(model_name="x", id="unknown-1")
    requests = [
        classifier_request(request_id="good-1"),
        bad,
        unknown,
        classifier_request(request_id="good-2"),
    ]

    with grpc.insecure_channel(example_server.url) as channel:
        stream = channel.stream_stream(
            method_path("ModelStreamInfer"),
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        call = stream(iter(requests), timeout=CALL_TIMEOUT)
        responses = list(call)  # ends when the server closes the call after our half-close
        assert call.code() == grpc.StatusCode.OK

    assert [r.infer_response.id for r in responses] == ["good-1", "bad-1", "unknown-1", "good-2"]
    good1, bad1, unknown1, good2 = responses
    for ok in (good1, good2):
        assert ok.error_message == ""
        assert ok.infer_response.model_name == "classifier"
        assert [o.name for o in ok.infer_response.outputs] == ["probabilities"]
    assert "unexpected shape for input 'features' for model 'classifier'" in bad1.error_message
    assert "Request for unknown model: 'x' is not found" in unknown1.error_message
    for response in responses:
        final = response.infer_response.parameters["triton_final_response"]
        assert final.WhichOneof("parameter_choice") == "bool_param" and final.bool_param


# ---- and after all of that ---------------------------------------------------------------------


def test_server_still_serves_after_errors(example_server, client):
    """Runs last in this module: the session server has seen every error above."""
    assert client.is_server_live(client_timeout=CALL_TIMEOUT)
    assert client.is_model_ready("classifier", client_timeout=CALL_TIMEOUT)
    assert_classifier_serves(example_server.url)
    inputs = [int32_input("INPUT0", [2, 16]), int32_input("INPUT1", [2, 16])]
    result = client_infer(client, "add_sub", inputs)
    assert result.as_numpy("OUTPUT0").shape == (2, 16)
    text = grpcclient.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"tiffin"], dtype=np.object_))
    assert list(client_infer(client, "uppercase", [text]).as_numpy("upper")) == [b"TIFFIN"]
