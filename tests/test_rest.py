"""The REST front door against real servers: tritonclient.http (sync and aio), curl, raw HTTP.

Covers the README tour over REST, Triton's binary tensor extension both ways, the same
bad-input checks tests/test_errors.py makes over gRPC (HTTP status and a message naming the
model and tensor), what a hostile client may send (sizes checked before anything is
allocated, and the server serving everyone else afterwards), load shedding and shutdown.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from conftest import EXAMPLES, ServerProcess

TIMEOUT = 10.0  # seconds, on every call: no test may hang on a server that never answers
INFER_HEADER = "Inference-Header-Content-Length"

SLOW_CONFIG = """
backend: toy_backends:Slow
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [1]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [1]}]
"""


# ---- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def client(example_server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(
        example_server.http_url, connection_timeout=TIMEOUT, network_timeout=TIMEOUT
    )
    yield c
    c.close()


def request(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request: status, headers, body."""
    host, port = url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        conn.close()


def post_json(url: str, path: str, document: object) -> tuple[int, dict]:
    status, _, body = request(
        url, "POST", path, json.dumps(document).encode(), {"Content-Type": "application/json"}
    )
    return status, json.loads(body) if body else {}


def expect_error(status: int, body: dict | bytes, code: int, *fragments: str) -> str:
    document = json.loads(body) if isinstance(body, bytes) else body
    assert status == code, f"{status}: {document}"
    message = document["error"]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def expect_client_error(call, code: int, *fragments: str) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    err = info.value
    assert err.status() == str(code), f"{err.status()}: {err.message()}"
    for fragment in fragments:
        assert fragment in err.message(), f"{fragment!r} not in {err.message()!r}"
    return err


def features_input(array: np.ndarray, binary: bool = True, datatype: str = "FP32"):
    tensor = httpclient.InferInput("features", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def int32_input(name: str, shape: list[int]) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, shape, "INT32")
    tensor.set_data_from_numpy(np.zeros(shape, np.int32))
    return tensor


def classifier_json(rows: int = 1, **extra) -> dict:
    tensor = {"name": "features", "shape": [rows, 4], "datatype": "FP32", "data": [1.0] * rows * 4}
    return {"inputs": [tensor], **extra}


def binary_body(header: dict, *parts: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(parts), {INFER_HEADER: str(len(head))}


def serves(url: str) -> None:
    """The server answers a well-formed inference over REST."""
    c = httpclient.InferenceServerClient(url, network_timeout=TIMEOUT)
    try:
        result = c.infer("classifier", [features_input(np.ones((2, 4), np.float32))])
        assert result.as_numpy("probabilities").shape == (2, 3)
    finally:
        c.close()


def raw_exchange(url: str, data: bytes, wait: float = TIMEOUT) -> bytes:
    """Sends bytes on a fresh connection; what the server answers before it closes or goes
    quiet."""
    host, port = url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        received = b""
        try:
            while b"\r\n\r\n" not in received or len(received) < 12:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except TimeoutError:
            pass
        return received


# ---- the README tour over REST ---------------------------------------------------------------


def test_tour_over_rest(client, example_server):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "tiffin" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("classifier")
    assert model["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert sorted(model["versions"]) == ["1", "2"]

    features = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    result = client.infer("classifier", [features_input(features)])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (5, 3)
    # The same numbers as over gRPC, from the same server.
    grpc_client = grpcclient.InferenceServerClient(example_server.url)
    tensor = grpcclient.InferInput("features", [5, 4], "FP32")
    tensor.set_data_from_numpy(features)
    expected = grpc_client.infer("classifier", [tensor]).as_numpy("probabilities")
    np.testing.assert_array_equal(probabilities, expected)
    older = client.infer("classifier", [features_input(features)], model_version="1")
    assert older.get_response()["model_version"] == "1"

    text = httpclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"hello", b"world"], dtype=object))
    assert list(client.infer("uppercase", [text]).as_numpy("upper")) == [b"HELLO", b"WORLD"]

    torch_result = client.infer("classifier_torch", [features_input(features)])
    np.testing.assert_allclose(
        torch_result.as_numpy("probabilities"),
        client.infer("classifier", [features_input(features)], model_version="1").as_numpy(
            "probabilities"
        ),
        rtol=1e-5,
        atol=1e-6,
    )

    record = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    pipeline = httpclient.InferInput("json", [1, 1], "BYTES")
    pipeline.set_data_from_numpy(np.array([[json.dumps(record).encode()]], dtype=object))
    labels = client.infer("classify_json", [pipeline])
    assert labels.as_numpy("labels").shape == labels.as_numpy("scores").shape

    config = client.get_model_config("classifier")
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [4]
    stats = client.get_inference_statistics("classifier", "2")["model_stats"][0]
    assert stats["inference_count"] >= 5 and isinstance(
        stats["inference_stats"]["success"]["ns"], int
    )
    index = client.get_model_repository_index()
    assert {"name": "classifier", "version": "2", "state": "READY"} in index


def test_json_and_binary_tensors_give_the_same_answer(client):
    features = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    binary = client.infer("classifier", [features_input(features)])
    as_json = client.infer(
        "classifier",
        [features_input(features, binary=False)],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)],
    )
    assert "data" in as_json.get_response()["outputs"][0]
    np.testing.assert_allclose(
        binary.as_numpy("probabilities"), as_json.as_numpy("probabilities"), rtol=1e-6
    )


def test_binary_outputs_carry_the_header(example_server):
    # No outputs named, binary_data_output: every output binary, after the JSON header.
    body, headers = binary_body(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [1, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 16},
                }
            ],
            "parameters": {"binary_data_output": True},
        },
        np.ones(4, np.float32).tobytes(),
    )
    status, reply_headers, reply = request(
        example_server.http_url, "POST", "/v2/models/classifier/infer", body, headers
    )
    assert status == 200
    length = int(reply_headers[INFER_HEADER])
    header = json.loads(reply[:length])
    (output,) = header["outputs"]
    assert output["parameters"]["binary_data_size"] == 12 == len(reply) - length
    assert np.frombuffer(reply[length:], np.float32).shape == (3,)

    # JSON only: no header, application/json.
    status, plain_headers, reply = request(
        example_server.http_url,
        "POST",
        "/v2/models/classifier/infer",
        json.dumps(classifier_json(id="json-1")).encode(),
    )
    assert status == 200 and INFER_HEADER not in plain_headers
    document = json.loads(reply)
    assert document["id"] == "json-1" and len(document["outputs"][0]["data"]) == 3


def test_nested_json_data_is_accepted(example_server):
    tensor = {"name": "features", "shape": [2, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]] * 2}
    status, document = post_json(
        example_server.http_url, "/v2/models/classifier/infer", {"inputs": [tensor]}
    )
    assert status == 200, document
    assert document["outputs"][0]["shape"] == [2, 3]


def test_aio_client(example_server):
    async def run() -> None:
        async with aioclient.InferenceServerClient(example_server.http_url) as c:
            assert await c.is_server_live() and await c.is_server_ready()
            assert await c.is_model_ready("classifier")
            tensor = aioclient.InferInput("features", [2, 4], "FP32")
            tensor.set_data_from_numpy(np.ones((2, 4), np.float32))
            results = await asyncio.gather(*(c.infer("classifier", [tensor]) for _ in range(8)))
            assert all(r.as_numpy("probabilities").shape == (2, 3) for r in results)
            assert (await c.get_model_metadata("uppercase"))["platform"] == "onnxruntime_onnx"

    asyncio.run(run())


def test_curl(example_server):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    base = f"http://{example_server.http_url}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [curl, "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=30
        )

    assert run(f"{base}/v2/health/ready").stdout.endswith("200")
    infer = run(
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(classifier_json(2)),
        f"{base}/v2/models/classifier/infer",
    )
    body, code = infer.stdout.rsplit("\n", 1)
    assert code == "200" and json.loads(body)["outputs"][0]["shape"] == [2, 3]
    missing = run(f"{base}/v2/models/nope")
    body, code = missing.stdout.rsplit("\n", 1)
    assert code == "400" and "Request for unknown model: 'nope'" in json.loads(body)["error"]


# ---- the errors tests/test_errors.py checks over gRPC ----------------------------------------


def test_unknown_model(client):
    ones = np.ones((1, 4), np.float32)
    for call in (
        lambda: client.infer("x", [features_input(ones)]),
        lambda: client.get_model_metadata("x"),
        lambda: client.get_model_config("x"),
    ):
        expect_client_error(call, 400, "Request for unknown model: 'x' is not found")
    status, _, body = request(client_url(client), "GET", "/v2/models/x/ready")
    expect_error(status, body, 400, "Request for unknown model: 'x' is not found")


def client_url(client: httpclient.InferenceServerClient) -> str:
    return client._parsed_url.netloc


def test_unknown_and_malformed_versions(client):
    ones = np.ones((1, 4), np.float32)
    expect_client_error(
        lambda: client.infer("classifier", [features_input(ones)], model_version="7"),
        404,
        "'classifier' version 7 is not found",
    )
    expect_client_error(
        lambda: client.get_model_metadata("classifier", "7"), 404, "version 7 is not found"
    )
    assert not client.is_model_ready("classifier", "7")
    expect_client_error(
        lambda: client.get_model_config("classifier", "abc"),
        400,
        "failed to get model version from specified version string 'abc'",
    )


def test_missing_input(client):
    expect_client_error(
        lambda: client.infer("add_sub", [int32_input("INPUT0", [1, 16])]),
        400,
        "'add_sub'",
        "missing required input(s) ['INPUT1']",
    )


def test_unknown_input(client):
    ones = np.ones((1, 4), np.float32)
    bogus = httpclient.InferInput("bogus", [1, 4], "FP32")
    bogus.set_data_from_numpy(ones)
    expect_client_error(
        lambda: client.infer("classifier", [features_input(ones), bogus]),
        400,
        "unexpected inference input 'bogus' for model 'classifier'",
    )


def test_wrong_datatype(client):
    expect_client_error(
        lambda: client.infer(
            "classifier", [features_input(np.ones((1, 4), np.float64), datatype="FP64")]
        ),
        400,
        "inference input 'features' data-type is 'FP64', but model 'classifier' expects 'FP32'",
    )


@pytest.mark.parametrize("shape, shown", [((4,), "[4]"), ((1, 5), "[1,5]")])
def test_wrong_shape(client, shape, shown):
    expect_client_error(
        lambda: client.infer("classifier", [features_input(np.ones(shape, np.float32))]),
        400,
        "unexpected shape for input 'features' for model 'classifier'. "
        f"Expected [-1,4], got {shown}",
    )


def test_batch_above_max_batch_size(client):
    expect_client_error(
        lambda: client.infer("classifier", [features_input(np.ones((9, 4), np.float32))]),
        400,
        "inference request batch-size must be <= 8 for 'classifier'",
    )


def test_binary_size_disagrees_with_the_shape(example_server):
    body, headers = binary_body(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [1, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 12},
                }
            ]
        },
        np.ones(3, np.float32).tobytes(),
    )
    status, _, reply = request(
        example_server.http_url, "POST", "/v2/models/classifier/infer", body, headers
    )
    expect_error(
        status,
        reply,
        400,
        "input byte size mismatch for input 'features' for model 'classifier'. Expected 16, got 12",
    )


def test_json_data_disagrees_with_the_shape(example_server):
    document = classifier_json()
    document["inputs"][0]["data"] = [1.0, 2.0, 3.0]
    status, reply = post_json(example_server.http_url, "/v2/models/classifier/infer", document)
    expect_error(status, reply, 400, "'features'", "'classifier'", "3 elements", "claims 4")


@pytest.mark.parametrize(
    "data, fragment",
    [
        (["a", "b", "c", "d"], "FP32 elements must be JSON numbers"),
        ([1, 2, 3, None], "FP32 elements must be JSON numbers"),
        ([[1, 2], [3, "4"]], "FP32 elements must be JSON numbers"),
        ([{"x": 1}] * 4, "FP32 elements must be JSON numbers"),
    ],
)
def test_json_data_of_the_wrong_type(example_server, data, fragment):
    document = classifier_json()
    document["inputs"][0]["data"] = data
    status, reply = post_json(example_server.http_url, "/v2/models/classifier/infer", document)
    expect_error(status, reply, 400, "input 'features' for model 'classifier'", fragment)


def test_json_integers_out_of_range(example_server):
    tensors = [
        {"name": name, "shape": [1, 16], "datatype": "INT32", "data": [2**40] * 16}
        for name in ("INPUT0", "INPUT1")
    ]
    status, reply = post_json(
        example_server.http_url, "/v2/models/add_sub/infer", {"inputs": tensors}
    )
    expect_error(status, reply, 400, "'INPUT0'", "'add_sub'", "out of the range of INT32")


def test_malformed_bytes_length_prefix(example_server):
    body, headers = binary_body(
        {
            "inputs": [
                {
                    "name": "text",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 7},
                }
            ]
        },
        (100).to_bytes(4, "little") + b"abc",
    )
    status, _, reply = request(
        example_server.http_url, "POST", "/v2/models/uppercase/infer", body, headers
    )
    expect_error(status, reply, 400, "'text'", "'uppercase'", "100", "3")


def test_unknown_requested_output(client):
    expect_client_error(
        lambda: client.infer(
            "classifier",
            [features_input(np.ones((1, 4), np.float32))],
            outputs=[httpclient.InferRequestedOutput("nope")],
        ),
        400,
        "unexpected inference output 'nope' for model 'classifier'",
    )


@pytest.mark.parametrize(
    "parameters, fragment",
    [
        ({"triton_foo": True}, "'triton_foo'"),
        ({"priority": "high"}, "invalid value type for 'priority' parameter"),
        ({"binary_data_output": "yes"}, "'binary_data_output'"),
        ({"nested": {"a": 1}}, "parameter 'nested'"),
    ],
)
def test_bad_request_parameters(example_server, parameters, fragment):
    status, reply = post_json(
        example_server.http_url,
        "/v2/models/classifier/infer",
        classifier_json(parameters=parameters),
    )
    expect_error(status, reply, 400, fragment)


def test_malformed_documents(example_server):
    url = example_server.http_url
    status, _, reply = request(url, "POST", "/v2/models/classifier/infer", b"{not json")
    expect_error(status, reply, 400, "not valid JSON", "'classifier'")
    status, reply = post_json(url, "/v2/models/classifier/infer", [1, 2])
    expect_error(status, reply, 400, "must be a JSON object")
    status, reply = post_json(url, "/v2/models/classifier/infer", {"inputs": {"features": 1}})
    expect_error(status, reply, 400, "unable to parse 'inputs'")
    tensor = {"name": "features", "shape": [1, -4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    status, reply = post_json(url, "/v2/models/classifier/infer", {"inputs": [tensor]})
    expect_error(status, reply, 400, "'shape'", "'features'")
    tensor = {"name": "features", "shape": [1, 4], "datatype": "FP32"}
    status, reply = post_json(url, "/v2/models/classifier/infer", {"inputs": [tensor]})
    expect_error(status, reply, 400, "'features'", "exactly one of 'data' and 'binary_data_size'")
    tensor = {"name": "features", "shape": [1, 4], "datatype": "FP16", "data": [1, 2, 3, 4]}
    status, reply = post_json(url, "/v2/models/classifier/infer", {"inputs": [tensor]})
    expect_error(status, reply, 400, "'features'")  # datatype first: FP32 expected


def test_routes_methods_and_features_not_offered(example_server):
    url = example_server.http_url
    status, _, body = request(url, "GET", "/v2/nothing/here")
    expect_error(status, body, 404, "Not Found")
    status, _, body = request(url, "GET", "/v2/models/classifier/infer")
    expect_error(status, body, 405, "Method Not Allowed")
    status, _, body = request(url, "POST", "/v2/health/live")
    expect_error(status, body, 405, "Method Not Allowed")
    status, _, body = request(url, "GET", "/v2/systemsharedmemory/status")
    expect_error(status, body, 501, "shared memory is not offered")
    status, reply = post_json(url, "/v2/repository/other/index", {})
    expect_error(status, reply, 400, "unknown repository 'other'")


# ---- hostile clients -------------------------------------------------------------------------


def test_declared_body_beyond_what_the_model_accepts_is_refused_unread(example_server):
    """A Content-Length the model cannot accept is answered before one body byte is sent."""
    head = (
        "POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {2**40}\r\n{INFER_HEADER}: 100\r\n\r\n"
    ).encode()
    reply = raw_exchange(example_server.http_url, head)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b"binary tensor data" in reply and b"model 'classifier'" in reply
    assert b"accepts at most" in reply
    # All JSON: bounded by the JSON factor over the same limit.
    head = (
        f"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {2**30}\r\n\r\n"
    ).encode()
    reply = raw_exchange(example_server.http_url, head)
    assert reply.startswith(b"HTTP/1.1 400") and b"bytes of JSON" in reply, reply[:300]
    serves(example_server.http_url)


def test_large_body_for_a_model_that_does_not_serve_is_refused_unread(example_server):
    head = b"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    reply = raw_exchange(example_server.http_url, head)
    assert reply.startswith(b"HTTP/1.1 400") and b"'nope' is not serving" in reply, reply[:300]


def test_expect_continue_is_answered_after_the_size_check(example_server):
    body = json.dumps(classifier_json()).encode()
    head = (
        "POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    host, port = example_server.http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(head)
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    too_big = head.replace(f"Content-Length: {len(body)}".encode(), b"Content-Length: 99999999")
    reply = raw_exchange(example_server.http_url, too_big)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]  # no 100: the body is never asked for


@pytest.mark.parametrize(
    "header_length, fragment",
    [("99999", "more than the"), ("abc", f"Unable to parse {INFER_HEADER}"), ("0", "raw binary")],
)
def test_bad_inference_header_length(example_server, header_length, fragment):
    body = json.dumps(classifier_json()).encode()
    status, _, reply = request(
        example_server.http_url,
        "POST",
        "/v2/models/classifier/infer",
        body,
        {INFER_HEADER: header_length},
    )
    assert status in (400, 501)
    expect_error(status, reply, status, fragment)


def test_binary_sizes_must_add_up_to_the_body(example_server):
    url = example_server.http_url
    header = {
        "inputs": [
            {
                "name": "features",
                "shape": [1, 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 16},
            }
        ]
    }
    body, headers = binary_body(header, np.ones(4, np.float32).tobytes(), b"extra")
    status, _, reply = request(url, "POST", "/v2/models/classifier/infer", body, headers)
    expect_error(status, reply, 400, "5 bytes of binary data that no input")
    body, headers = binary_body(header, np.ones(2, np.float32).tobytes())
    status, _, reply = request(url, "POST", "/v2/models/classifier/infer", body, headers)
    expect_error(status, reply, 400, "unexpected size for input 'features'", "only 8 bytes")
    # Binary without the header: there is no telling where the JSON ends.
    status, _, reply = request(
        url, "POST", "/v2/models/classifier/infer", json.dumps(header).encode()
    )
    expect_error(status, reply, 400, "'features'", INFER_HEADER)


def test_huge_claimed_shapes_allocate_nothing(example_server):
    url = example_server.http_url
    # uppercase takes BYTES of any length: the claim is checked against the data sent.
    tensor = {"name": "text", "shape": [10**12], "datatype": "BYTES", "data": ["a"]}
    status, reply = post_json(url, "/v2/models/uppercase/infer", {"inputs": [tensor]})
    expect_error(status, reply, 400, "'text'", "'uppercase'", "claims 1000000000000")
    body, headers = binary_body(
        {
            "inputs": [
                {
                    "name": "text",
                    "shape": [10**12],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 5},
                }
            ]
        },
        (1).to_bytes(4, "little") + b"a",
    )
    status, _, reply = request(url, "POST", "/v2/models/uppercase/infer", body, headers)
    expect_error(status, reply, 400, "'text'", "'uppercase'", "1000000000000")


def test_deeply_nested_data_is_refused(example_server):
    nested: list = [1.0]
    for _ in range(5000):
        nested = [nested]
    body = '{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":'
    body += "[" * 200 + "1" + "]" * 200 + "}]}"
    status, _, reply = request(
        example_server.http_url, "POST", "/v2/models/classifier/infer", body.encode()
    )
    expect_error(status, reply, 400, "'features'", "nested more than 100")
    deep = '{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":'
    deep += "[" * 100000 + "]" * 100000 + "}]}"
    status, _, reply = request(
        example_server.http_url, "POST", "/v2/models/classifier/infer", deep.encode()
    )
    expect_error(status, reply, 400, "not valid JSON")
    serves(example_server.http_url)


def test_too_many_or_too_long_headers_are_refused(example_server):
    flood = "".join(f"X-Flood-{i}: {i}\r\n" for i in range(500))
    reply = raw_exchange(
        example_server.http_url, f"GET /v2 HTTP/1.1\r\nHost: x\r\n{flood}\r\n".encode()
    )
    assert reply.split(b"\r\n")[0].endswith(b" 400 Bad Request"), reply[:200]
    assert b"Too many headers" in reply
    long_header = "X-Long: " + "a" * 100_000
    reply = raw_exchange(
        example_server.http_url, f"GET /v2 HTTP/1.1\r\nHost: x\r\n{long_header}\r\n\r\n".encode()
    )
    assert reply.split(b"\r\n")[0].split()[1].startswith(b"4"), reply[:200]
    serves(example_server.http_url)
    assert "Too many headers" not in example_server.log()  # a client's bytes: not logged


def test_chunked_body_beyond_the_limit_is_cut_off(example_server):
    host, port = example_server.http_url.rsplit(":", 1)
    head = (
        b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"a" * 65536
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(head)
        reply = b""
        try:
            for _ in range(200):  # 12.5 MiB, far beyond what classifier's JSON may be
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server answered and closed while we were still sending
        try:
            reply = sock.recv(65536)
        except OSError:
            pass
    assert reply.startswith(b"HTTP/1.1 400") and b"more than the" in reply, reply[:300]
    serves(example_server.http_url)


def test_compressed_bomb_is_cut_off(example_server):
    bomb = gzip.compress(b"0" * (256 << 20), compresslevel=9)  # 256 MiB of zeros
    assert len(bomb) < 1 << 20
    status, _, reply = request(
        example_server.http_url,
        "POST",
        "/v2/models/classifier/infer",
        bomb,
        {"Content-Encoding": "gzip"},
    )
    expect_error(status, reply, 400, "more than the")
    # A gzip request that fits is served (tritonclient's request_compression_algorithm).
    c = httpclient.InferenceServerClient(example_server.http_url, network_timeout=TIMEOUT)
    try:
        result = c.infer(
            "classifier",
            [features_input(np.ones((2, 4), np.float32))],
            request_compression_algorithm="gzip",
        )
        assert result.as_numpy("probabilities").shape == (2, 3)
    finally:
        c.close()


def test_server_still_serves_after_hostile_requests(example_server, client):
    """Runs after the tests above in this module: the session server has seen them all."""
    assert client.is_server_live() and client.is_model_ready("classifier")
    serves(example_server.http_url)
    grpc_client = grpcclient.InferenceServerClient(example_server.url)
    assert grpc_client.is_server_ready()


# ---- repository, load shedding, switching off, shutdown -------------------------------------


def test_load_and_unload_over_rest(make_server, example_onnx_copy):
    server = make_server(example_onnx_copy)
    c = httpclient.InferenceServerClient(server.http_url, network_timeout=30)
    try:
        c.unload_model("add_sub")
        index = {(m["name"], m.get("version")): m for m in c.get_model_repository_index()}
        assert index[("add_sub", "1")]["state"] == "UNAVAILABLE"
        assert not c.is_model_ready("add_sub")
        expect_client_error(
            lambda: c.infer("add_sub", [int32_input("INPUT0", [1, 16])]),
            404,
            "no available versions",
        )
        c.load_model("add_sub")
        assert c.is_model_ready("add_sub")
        expect_client_error(lambda: c.load_model("not_there"), 400, "not_there")
        # Triton's config override: loaded with it, on the repository's files.
        c.load_model("add_sub", config='{"max_batch_size": 2}')
        assert c.get_model_config("add_sub")["max_batch_size"] == 2
        c.load_model("add_sub")  # a plain reload goes back to config.yaml
        assert c.get_model_config("add_sub")["max_batch_size"] != 2
    finally:
        c.close()


@pytest.fixture
def slow_repo(tmp_path: Path) -> Path:
    (tmp_path / "models" / "slow" / "1").mkdir(parents=True)
    (tmp_path / "models" / "slow" / "config.yaml").write_text(SLOW_CONFIG)
    return tmp_path / "models"


def slow_body(seconds: float) -> bytes:
    tensor = {"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [seconds]}
    return json.dumps({"inputs": [tensor]}).encode()


def test_requests_beyond_max_inflight_get_429(make_server, slow_repo):
    server = make_server(slow_repo, "--http-max-inflight", "1")
    answers: list = []
    worker = threading.Thread(
        target=lambda: answers.append(
            request(server.http_url, "POST", "/v2/models/slow/infer", slow_body(1.5))
        )
    )
    worker.start()
    time.sleep(0.5)
    status, _, reply = request(server.http_url, "POST", "/v2/models/slow/infer", slow_body(0))
    expect_error(status, reply, 429, "--http-max-inflight")
    assert request(server.http_url, "GET", "/v2/health/ready")[0] == 200  # probes always pass
    assert request(server.http_url, "GET", "/v2/models/slow/ready")[0] == 200
    worker.join(30)
    assert answers[0][0] == 200


def test_allow_http_off(make_server, example_onnx_copy):
    server = make_server(example_onnx_copy, "--no-allow-http")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.http_port), timeout=2).close()
    assert "listening for HTTP" not in server.log()
    assert f"ready on gRPC {server.url} (" in server.log()


def test_sigterm_not_ready_first_then_503_and_in_flight_finish(slow_repo):
    server = ServerProcess(slow_repo)
    assert f"and HTTP {server.http_url}" in server.log()
    assert f"listening for HTTP on {server.http_url}" in server.log()
    answers: list = []
    worker = threading.Thread(
        target=lambda: answers.append(
            request(server.http_url, "POST", "/v2/models/slow/infer", slow_body(2.0))
        )
    )
    worker.start()
    time.sleep(0.5)  # the request (2 s in the backend) is now running
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert request(server.http_url, "GET", "/v2/health/ready")[0] == 400
    status, _, reply = request(server.http_url, "GET", "/v2/models/slow/ready")
    expect_error(status, reply, 400, "not ready")
    status, _, reply = request(server.http_url, "POST", "/v2/models/slow/infer", slow_body(0))
    expect_error(status, reply, 503, "shutting down")
    worker.join(30)
    status, _, reply = answers[0]
    assert status == 200, reply
    assert json.loads(reply)["outputs"][0]["data"] == [2.0]
    assert server.proc.wait(30) == 0, server.log()


def test_http_port_already_taken_fails_clearly(example_server):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiffin.server.cli",
            "serve",
            "--model-repository",
            str(EXAMPLES),
            "--grpc-port",
            "0",
            "--http-port",
            str(example_server.http_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{example_server.http_port}" in result.stderr
