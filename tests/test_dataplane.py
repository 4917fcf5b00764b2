"""The in-process tier: the data plane, its interceptor chain and the gRPC front door run in
the test process (inline instances, no server subprocess), so these checks take
milliseconds and can reach inside: request contexts, timelines, the chain's slots."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from models import write_repository
from tiffin.protos import method_path, protocol
from tiffin.protos.errors import TiffinError
from tiffin.scheduler.context import STAGES, RequestContext
from tiffin.server import Server, ServerSettings
from tiffin.server.interceptors import SLOTS
from tiffin.server.validation import WireRequest, WireTensor

ECHO = """
backend: toy_backends:Echo
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [1]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [1]}]
dynamic_batching: {}
instance_group: [{kind: inline}]
"""
pb = protocol()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = write_repository(tmp_path_factory.mktemp("plane") / "models", {"echo": ECHO})
    settings = ServerSettings(
        model_repository=Path(repo),
        grpc_port=0,
        allow_http=False,
        metrics_port=0,
        allowed_backends="toy_backends",
    )
    server = Server(settings)
    server.start()
    yield server
    server.stop(5)


def echo_request(*values: float, model: str = "echo") -> WireRequest:
    data = np.array(values, np.float32).reshape(-1, 1)
    return WireRequest(model, "", [WireTensor("INPUT0", "FP32", list(data.shape), data.tobytes())])


def context(operation: str = "infer") -> RequestContext:
    return RequestContext("test", operation)


def test_infer_answers_and_stamps_the_timeline_in_order(server: Server) -> None:
    call = context()
    started = server.plane.infer(call, echo_request(1.5, 2.5))
    response = started.pending.wait()
    call.finish("OK")
    assert response.outputs["OUTPUT0"].tolist() == [[1.5], [2.5]]
    stamps = [getattr(call.timeline, stage) for stage in STAGES]
    assert all(stamps), dict(zip(STAGES, stamps, strict=True))
    assert stamps == sorted(stamps)
    assert call.model == "echo" and call.status == "OK"


def test_statistics_read_the_queue_time_from_the_timeline(server: Server) -> None:
    def queue_count() -> int:
        ((_, stats),) = server.plane.statistics(context("statistics"), "echo", "1")
        return stats.queue.count

    before = queue_count()
    server.plane.infer(context(), echo_request(1.0)).pending.wait()
    assert queue_count() == before + 1


def test_validation_errors_come_out_of_the_chain_as_tiffin_errors(server: Server) -> None:
    request = echo_request(1.0)
    request.inputs[0].datatype = "INT32"
    with pytest.raises(TiffinError) as info:
        server.plane.infer(context(), request)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'INPUT0'" in info.value.message


def test_model_ready_is_a_probe(server: Server) -> None:
    assert server.plane.model_ready(context("model_ready"), "echo", "")
    assert not server.plane.model_ready(context("model_ready"), "echo", "9")
    with pytest.raises(TiffinError) as info:
        server.plane.model_ready(context("model_ready"), "nope", "")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


class Recorder:
    """An interceptor that records what passes, and refuses calls for one model."""

    def __init__(self, refuse: str = "") -> None:
        self.seen: list[tuple[str, str, str]] = []
        self.refuse = refuse

    def __call__(self, call: RequestContext, proceed: Callable[[], Any]) -> Any:
        self.seen.append((call.front_door, call.operation, call.model))
        if call.model and call.model == self.refuse:
            from tiffin.protos.errors import InvalidInput

            raise InvalidInput(f"model '{call.model}' is refused by the test interceptor")
        return proceed()


@pytest.fixture
def installed(server: Server) -> Iterator[Callable[[str, Any], None]]:
    """Installs interceptors for one test; the slots are emptied afterwards."""
    slots: list[str] = []

    def install(slot: str, interceptor: Any) -> None:
        server.plane.chain.install(slot, interceptor)
        slots.append(slot)

    yield install
    for slot in slots:
        server.plane.chain.install(slot, lambda call, proceed: proceed())


def channel_call(server: Server, rpc: str, request: Any, response_cls: Any) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(
            method_path(rpc),
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        return call(request, timeout=10)


def infer_message(value: float, model: str = "echo") -> Any:
    msg = pb.ModelInferRequest(model_name=model)
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    msg.raw_input_contents.append(np.array([[value]], np.float32).tobytes())
    return msg


def test_every_grpc_call_passes_the_chain_with_its_operation(server: Server, installed) -> None:
    recorder = Recorder()
    installed("authentication", recorder)
    channel_call(server, "ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse)
    channel_call(
        server, "ModelMetadata", pb.ModelMetadataRequest(name="echo"), pb.ModelMetadataResponse
    )
    channel_call(server, "ModelInfer", infer_message(3.0), pb.ModelInferResponse)
    assert recorder.seen == [
        ("grpc", "ready", ""),
        ("grpc", "model_metadata", "echo"),
        ("grpc", "infer", "echo"),
    ]


def test_an_interceptor_refusal_is_the_callers_status(server: Server, installed) -> None:
    installed("authorization", Recorder(refuse="echo"))
    with pytest.raises(grpc.RpcError) as info:
        channel_call(server, "ModelInfer", infer_message(1.0), pb.ModelInferResponse)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "refused by the test interceptor" in info.value.details()


def test_a_bug_in_the_chain_is_internal_and_the_stream_goes_on(server: Server, installed) -> None:
    """No exception is swallowed: a streamed request that hits a bug gets its own error
    response, and the requests after it on the same stream are answered."""

    def buggy(call: RequestContext, proceed: Callable[[], Any]) -> Any:
        if call.operation == "stream_infer" and call.metadata.get("x-bug") == "yes":
            bug_on = getattr(buggy, "next", 0)
            buggy.next = bug_on + 1  # type: ignore[attr-defined]
            if bug_on == 1:  # the second request of the stream
                raise KeyError("a bug")
        return proceed()

    installed("metrics", buggy)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = channel.stream_stream(
            method_path("ModelStreamInfer"),
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        requests = [infer_message(float(i)) for i in range(3)]
        for i, msg in enumerate(requests):
            msg.id = str(i)
        responses = list(stream(iter(requests), metadata=(("x-bug", "yes"),), timeout=10))
    assert [r.infer_response.id for r in responses] == ["0", "1", "2"]
    assert responses[0].error_message == "" and responses[2].error_message == ""
    assert "stream_infer failed: 'a bug'" in responses[1].error_message


def test_slots_are_named_and_ordered(server: Server) -> None:
    assert SLOTS[0] == "errors"
    with pytest.raises(ValueError, match="unknown interceptor slot"):
        server.plane.chain.install("nope", lambda call, proceed: proceed())
