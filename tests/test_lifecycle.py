"""Server lifecycle: graceful shutdown, loading and unloading models, start-up failures."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from conftest import EXAMPLES, ServerProcess

SLOW_CONFIG = """
backend: toy_backends:Slow
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [1]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [1]}]
"""


def slow_input(seconds: float = 1.5) -> tc.InferInput:
    """A request that the Slow toy backend takes `seconds` to answer."""
    tensor = tc.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), seconds, np.float32))
    return tensor


@pytest.fixture
def slow_repo(tmp_path: Path) -> Path:
    (tmp_path / "models" / "slow" / "1").mkdir(parents=True)
    (tmp_path / "models" / "slow" / "config.yaml").write_text(SLOW_CONFIG)
    return tmp_path / "models"


def test_sigterm_finishes_in_flight_requests(slow_repo):
    server = ServerProcess(slow_repo)
    client = tc.InferenceServerClient(server.url)
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["result"] = client.infer("slow", [slow_input()], client_timeout=60)
        except InferenceServerException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.5)  # the request (1.5 s in the backend) is now running
    server.proc.send_signal(signal.SIGTERM)
    worker.join(60)
    assert server.proc.wait(60) == 0, server.log()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].as_numpy("OUTPUT0").tolist() == [[1.5]]
    assert "shutting down" in server.log()


def test_requests_after_shutdown_began_are_refused(slow_repo):
    server = ServerProcess(slow_repo)
    client = tc.InferenceServerClient(server.url)
    worker = threading.Thread(
        target=lambda: client.infer("slow", [slow_input()], client_timeout=60)
    )
    worker.start()
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(InferenceServerException) as info:
        tc.InferenceServerClient(server.url).infer("slow", [slow_input(0)], client_timeout=10)
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    worker.join(60)
    assert server.proc.wait(60) == 0


def test_load_and_unload_models(make_server, example_onnx_copy):
    server = make_server(example_onnx_copy)
    client = tc.InferenceServerClient(server.url)
    client.unload_model("add_sub")
    index = {
        (m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models
    }
    assert index[("add_sub", "1")] == ("UNAVAILABLE", "unloaded")
    with pytest.raises(InferenceServerException) as info:
        client.infer("add_sub", [])
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no available versions" in info.value.message()
    assert client.is_model_ready("classifier")  # the others keep serving

    client.load_model("add_sub")
    assert client.is_model_ready("add_sub")

    # A new model folder appears and is loaded on request.
    shutil.copytree(EXAMPLES / "uppercase", example_onnx_copy / "shout")
    client.load_model("shout")
    text = tc.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hi"], dtype=object))
    assert list(client.infer("shout", [text]).as_numpy("upper")) == [b"HI"]

    with pytest.raises(InferenceServerException) as info:
        client.load_model("not_there")
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "not_there" in info.value.message()


def test_reload_picks_up_a_new_version(make_server, example_onnx_copy):
    server = make_server(example_onnx_copy)
    client = tc.InferenceServerClient(server.url)
    shutil.copytree(example_onnx_copy / "classifier" / "2", example_onnx_copy / "classifier" / "3")
    client.load_model("classifier")
    assert sorted(client.get_model_metadata("classifier").versions) == ["2", "3"]
    assert not client.is_model_ready("classifier", "1")  # latest 2: 1 is no longer served


def test_port_already_taken_fails_clearly(example_server):
    port = example_server.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiffin.server.cli",
            "serve",
            "--model-repository",
            str(EXAMPLES),
            "--grpc-port",
            port,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stdout + result.stderr


def test_missing_repository_fails_clearly(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiffin.server.cli",
            "serve",
            "--model-repository",
            str(tmp_path / "nope"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "is not a folder" in result.stdout + result.stderr


def test_long_stream_does_not_grow_server_memory(example_server):
    """A stream holds only its unfinished requests (perf_analyzer keeps one open per worker)."""
    import queue as queue_module

    def rss_mb() -> float:
        status = open(f"/proc/{example_server.proc.pid}/status").read()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    client = tc.InferenceServerClient(example_server.url)
    answers: queue_module.Queue = queue_module.Queue()
    client.start_stream(lambda result, error: answers.put(error))
    tensor = tc.InferInput("features", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))

    def burst(count: int) -> None:
        for i in range(count):
            client.async_stream_infer("classifier", [tensor], request_id=str(i))
            if i % 64 == 63:
                assert [answers.get(timeout=10) for _ in range(64)] == [None] * 64

    try:
        burst(1024)
        before = rss_mb()
        burst(8192)  # kept futures grew the server by about 4 MB per 1000 requests
        growth = rss_mb() - before
    finally:
        client.stop_stream()
    assert growth < 12, f"server memory grew {growth:.1f} MB over 8192 streamed requests"


def _open_stream(url: str, requests: list) -> tuple[threading.Thread, list, threading.Event]:
    """A ModelStreamInfer call that sends `requests`, then stays open (sending nothing) until
    the returned event is set; the thread collects each response or the final error."""
    from tiffin.protos import method_path, protocol

    pb = protocol()
    received: list = []
    release = threading.Event()

    def messages():
        yield from requests
        release.wait(60)

    def run() -> None:
        import grpc

        with grpc.insecure_channel(url) as channel:
            call = channel.stream_stream(
                method_path("ModelStreamInfer"),
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.ModelStreamInferResponse.FromString,
            )
            try:
                for response in call(messages(), timeout=60):
                    received.append(response)
            except grpc.RpcError as exc:
                received.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, received, release


def _slow_request(seconds: float):
    from tiffin.protos import protocol

    message = protocol().ModelInferRequest(model_name="slow", id="in-flight")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    message.raw_input_contents.append(np.full((1, 1), seconds, np.float32).tobytes())
    return message


def test_sigterm_ends_an_idle_stream_at_once(slow_repo):
    """An idle stream no longer holds shutdown for the whole grace period (30 s)."""
    server = ServerProcess(slow_repo)
    thread, received, release = _open_stream(server.url, [])
    try:
        time.sleep(0.5)  # the stream is open
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0, server.log()
        took = time.monotonic() - started
        thread.join(10)
    finally:
        release.set()
    assert took < 2.0, f"shutdown took {took:.1f} s"
    (error,) = received
    assert error.code().name == "UNAVAILABLE"
    assert "shutting down" in error.details()


def test_sigterm_answers_what_a_stream_has_in_flight_then_ends_it(slow_repo):
    server = ServerProcess(slow_repo)
    thread, received, release = _open_stream(server.url, [_slow_request(1.0)])
    try:
        time.sleep(0.4)  # the request is running
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0, server.log()
        thread.join(10)
    finally:
        release.set()
    answer, error = received
    assert answer.infer_response.id == "in-flight" and not answer.error_message
    assert np.frombuffer(answer.infer_response.raw_output_contents[0], np.float32) == [1.0]
    assert error.code().name == "UNAVAILABLE" and "shutting down" in error.details()
