"""Attacks on a running server, as a hostile client would make them (loopback, bounded).

Each test names the defect it guards against: a crash under a storm of failing streams,
streams starving health checks, unread streams growing memory, tiny requests claiming
huge tensors, oversized and undecodable bodies, and names that are not names.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServerProcess
from models import identity, write_model
from tiffin.protos import method_path, protocol

pb = protocol()

MODELS = {
    # A worker instance: the storm's requests cross processes, as in the report.
    "vector": (
        "max_batch_size: 8\ndynamic_batching: {}\ninstance_group: [{kind: cpu}]\n",
        lambda p: identity(p, "FP32", ("batch", 4)),
    ),
    "text": (
        "max_batch_size: 8\ninstance_group: [{kind: inline}]\n",
        lambda p: identity(p, "BYTES", ("batch", "n")),
    ),
    "blob": (
        "max_batch_size: 0\ninstance_group: [{kind: inline}]\n",
        lambda p: identity(p, "FP32", ("n",)),
    ),
}
SETTINGS = (
    "--grpc-threads",
    "48",
    "--max-streams",
    "24",
    "--max-streams-per-connection",
    "16",
    "--max-stream-inflight",
    "8",
    "--stream-idle-timeout-seconds",
    "3",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("hardening")
    for name, (config, build) in MODELS.items():
        write_model(repo, name, config, {1: build})
    server = ServerProcess(repo, *SETTINGS)
    yield server
    assert server.stop() == 0, server.log()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def vector_request(datatype: str = "FP32", rows: int = 1) -> object:
    msg = pb.ModelInferRequest(model_name="vector")
    msg.inputs.add(name="INPUT0", datatype=datatype, shape=[rows, 4])
    msg.raw_input_contents.append(np.zeros((rows, 4), np.float32).tobytes())
    return msg


def infer_stub(channel: grpc.Channel):
    return channel.unary_unary(
        method_path("ModelInfer"),
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=pb.ModelInferResponse.FromString,
    )


def stream_stub(channel: grpc.Channel):
    return channel.stream_stream(
        method_path("ModelStreamInfer"),
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )


def health_ok(url: str, count: int = 16, timeout: float = 2.0) -> int:
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        ok = 0
        for _ in range(count):
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
                ok += reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                pass
        return ok


def infer_ok(url: str, count: int = 16) -> int:
    with grpc.insecure_channel(url) as channel:
        call = infer_stub(channel)
        ok = 0
        for _ in range(count):
            try:
                call(vector_request(), timeout=5)
                ok += 1
            except grpc.RpcError:
                pass
        return ok


def assert_serving(server: ServerProcess) -> None:
    assert server.proc.poll() is None, server.log()
    assert health_ok(server.url) == 16
    assert infer_ok(server.url) == 16


def test_storm_of_failing_streams_does_not_crash_the_server(server):
    """8 threads open streams with triton_grpc_error: true, each sending a request with a
    wrong datatype among valid ones, for 20 s. This crashed the server with SIGSEGV within
    15 s (protobuf messages freed by the garbage collector on a stream's reader thread)."""
    bad, good = vector_request("INT32"), vector_request()
    order = [bad] + [good] * 20
    stop = time.monotonic() + 20
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def storm() -> None:
        with grpc.insecure_channel(server.url) as channel:
            call = stream_stub(channel)
            while time.monotonic() < stop and server.proc.poll() is None:
                try:
                    for _ in call(
                        iter(order), metadata=[("triton_grpc_error", "true")], timeout=10
                    ):
                        pass
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    outcomes[code] = outcomes.get(code, 0) + 1

    workers = [threading.Thread(target=storm) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert server.proc.poll() is None, f"the server died: {server.log()[-3000:]}"
    assert set(outcomes) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, outcomes
    print(f"\nstorm outcomes: {outcomes}")
    assert outcomes.get("INVALID_ARGUMENT", 0) > 100, outcomes
    assert_serving(server)


def test_idle_streams_cannot_starve_health_or_unary_calls(server):
    """More idle streams than the server allows: the extra ones are refused at once, health
    and unary calls keep working, and the idle ones are closed after the idle timeout. With
    one thread per stream and no cap, 256 idle streams locked out every call."""
    pid = server.proc.pid
    # A local subchannel pool each: four connections, not one shared by the four channels.
    channels = [
        grpc.insecure_channel(server.url, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(4)
    ]
    release = threading.Event()
    outcomes: list[str] = []
    lock = threading.Lock()

    def idle_stream(channel: grpc.Channel) -> None:
        def requests() -> Iterator:
            release.wait(30)  # sends nothing: an idle stream
            return
            yield

        try:
            for _ in stream_stub(channel)(requests(), timeout=30):
                pass
            code = "OK"
        except grpc.RpcError as exc:
            code = f"{exc.code().name}: {exc.details()}"
        with lock:
            outcomes.append(code)

    try:
        openers = [threading.Thread(target=idle_stream, args=(channels[i % 4],)) for i in range(40)]
        for opener in openers:
            opener.start()
        time.sleep(1.0)
        assert health_ok(server.url) == 16
        assert infer_ok(server.url) == 16
        # 40 streams against a cap of 24 (16 a connection): the 16 over it were refused.
        refused = [o for o in outcomes if o.startswith("RESOURCE_EXHAUSTED")]
        assert len(refused) == 16, outcomes
        assert all("streams open" in o for o in refused), refused
        assert threads(pid) < 48 + 24 + 40, threads(pid)
        for opener in openers:
            opener.join(10)  # the idle timeout (3 s) closes the others
        closed = [o for o in outcomes if o.startswith("UNAVAILABLE")]
        assert len(closed) == 24, outcomes
        assert "without a request" in closed[0]
    finally:
        release.set()
        for channel in channels:
            channel.close()
    assert_serving(server)


def test_a_stream_whose_client_never_reads_cannot_grow_memory(server):
    """1 MiB requests on one stream whose responses are never read: the server stops reading
    once its window is full, so memory stays bounded (it grew by 3.6 GB in 4 s before)."""
    pid = server.proc.pid
    payload = np.zeros(256 * 1024, np.float32)
    message = pb.ModelInferRequest(model_name="blob")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[payload.size])
    message.raw_input_contents.append(payload.tobytes())
    sent = 0
    stop = threading.Event()

    def requests() -> Iterator:
        nonlocal sent
        while not stop.is_set() and sent < 5000:
            sent += 1
            yield message

    before = rss_mb(pid)
    with grpc.insecure_channel(server.url) as channel:
        call = stream_stub(channel)(requests(), timeout=30)  # responses are never read
        time.sleep(4)
        grown = rss_mb(pid) - before
        stalled_at = sent
        time.sleep(1)
        assert sent == stalled_at, "the client could go on sending: nothing pushed back"
        stop.set()
        call.cancel()
    # window 8 + transport buffers, 1 MiB each way
    assert sent < 200, sent
    assert grown < 250, f"RSS grew by {grown:.0f} MB"
    assert_serving(server)


@pytest.mark.parametrize("count", [2**26, 2**29, 2**40])
def test_tiny_requests_claiming_huge_tensors_allocate_nothing(server, count):
    """A 40-byte BYTES request whose shape claims 2**26 elements cost 513 MB; 2**29 got the
    server OOM-killed; 2**40 answered INTERNAL "Unable to allocate 8.00 TiB"."""
    pid = server.proc.pid
    before = rss_mb(pid)
    message = pb.ModelInferRequest(model_name="text")
    message.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, count])
    message.raw_input_contents.append(b"\x04\x00\x00\x00abcd" * 4)
    with grpc.insecure_channel(server.url) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            infer_stub(channel)(message, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"claims {count} BYTES elements" in caught.value.details()
    assert rss_mb(pid) - before < 20


def test_fixed_shape_claims_are_checked_before_decoding(server):
    """Element counts and batch sizes are checked against the config and the bytes sent."""
    with grpc.insecure_channel(server.url) as channel:
        call = infer_stub(channel)
        message = vector_request(rows=1)
        message.inputs[0].shape[:] = [2**40, 4]
        with pytest.raises(grpc.RpcError) as caught:
            call(message, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch-size must be <= 8" in caught.value.details()
        message = pb.ModelInferRequest(model_name="blob")
        message.inputs.add(name="INPUT0", datatype="FP32", shape=[2**40])
        message.raw_input_contents.append(b"\0" * 16)
        with pytest.raises(grpc.RpcError) as caught:
            call(message, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "byte size mismatch" in caught.value.details()


PROBE = """
import signal, sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
slowest = 0.0
def report(*_):
    print(slowest, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, report)
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(sys.argv[1]))
while True:
    start = time.monotonic()
    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    slowest = max(slowest, time.monotonic() - start)
    time.sleep(0.01)
"""


def test_oversized_body_is_refused_before_parsing(server):
    """A model whose inputs are fixed accepts requests up to what its largest batch needs:
    a 64 MB body for `vector` (8 x 4 FP32) is refused unparsed, and health checks go on.
    (This repository has models of variable size, so gRPC receives the body whole first.)"""
    pid = server.proc.pid
    message = vector_request()
    message.raw_input_contents[0] = b"\0" * (64 << 20)
    body = message.SerializeToString()
    # The prober is a process of its own: this one holds its GIL while sending 64 MB.
    prober = subprocess.Popen(
        [sys.executable, "-c", PROBE, server.url], stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(0.5)
        with grpc.insecure_channel(
            server.url, options=[("grpc.max_send_message_length", 2**31 - 1)]
        ) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                infer_stub(channel)(body, timeout=30)
        time.sleep(0.5)
    finally:
        prober.terminate()
    slowest = float(prober.communicate(timeout=10)[0].split()[-1])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'vector' accepts at most" in caught.value.details()
    assert slowest < 1.0, f"a health check took {slowest:.2f} s"
    time.sleep(0.5)
    assert rss_mb(pid) < 1500


def test_a_repository_of_fixed_size_models_never_receives_a_huge_body(tmp_path):
    """When every model's inputs have fixed dims, gRPC itself refuses a request larger than
    the largest batch (at least 4 MiB, for other calls) from its length prefix: a 256 MiB
    body costs the server no memory and stalls nobody (a 1 GiB body stalled health checks
    for 6 s and left 2 GB held)."""
    config, build = MODELS["vector"]
    write_model(tmp_path, "vector", config, {1: build})
    fixed = ServerProcess(tmp_path)
    try:
        assert "request messages may be up to 4194304 bytes" in fixed.log()
        before = rss_mb(fixed.proc.pid)
        message = vector_request()
        message.raw_input_contents[0] = b"\0" * (256 << 20)
        with grpc.insecure_channel(
            fixed.url, options=[("grpc.max_send_message_length", 2**31 - 1)]
        ) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                infer_stub(channel)(message.SerializeToString(), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in caught.value.details()
        assert rss_mb(fixed.proc.pid) - before < 20
        assert infer_ok(fixed.url) == 16
    finally:
        assert fixed.stop() == 0


def test_undecodable_bodies_are_invalid_argument_without_a_traceback(server):
    """Bytes that are not a ModelInferRequest: INVALID_ARGUMENT (was INTERNAL, with a
    400-byte traceback logged and ~18 KB kept per request)."""
    pid = server.proc.pid
    with grpc.insecure_channel(server.url) as channel:
        call = infer_stub(channel)
        for _ in range(200):  # warm up allocator pools before measuring
            with pytest.raises(grpc.RpcError):
                call(b"\xff\xff\xff", timeout=5)
        before = rss_mb(pid)
        for _ in range(2000):
            with pytest.raises(grpc.RpcError) as caught:
                call(b"\x0a\x05vec", timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not a valid ModelInferRequest" in caught.value.details()
        grown = rss_mb(pid) - before
    assert grown < 10, f"RSS grew by {grown:.1f} MB over 2000 undecodable requests"
    assert "Traceback" not in server.log()


def test_names_and_versions_are_checked_as_names(server):
    client = tc.InferenceServerClient(server.url)
    with pytest.raises(Exception) as caught:
        client.get_model_metadata("m" * (1 << 20))
    assert len(str(caught.value)) < 1000
    assert "is not found" in str(caught.value)
    for version in (" 1", "\u0661", "1 ", "+1", "99999999999999999999"):
        with pytest.raises(Exception) as caught:
            client.get_model_metadata("vector", version)
        assert "failed to get model version" in str(caught.value), version
    assert client.get_model_metadata("vector", "1").name == "vector"
