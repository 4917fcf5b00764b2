"""OpenTelemetry tracing, received by a real OTLP/gRPC collector (a TraceService on loopback).

Requests carry W3C traceparents through real `serverctl serve` processes (gRPC and REST
front doors, a worker process, a pipeline); the spans the server exports are read back
from what the collector received.
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from conftest import ServerProcess, free_port
from models import value_input, write_repository

ECHO = """
backend: toy_backends:Echo
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [1]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [1]}]
dynamic_batching: {}
"""
# Holds requests up to 2 s until five have come, so that the test's five make one batch.
GATHERED = ECHO.replace("{}", "{max_queue_delay_microseconds: 2000000, preferred_batch_size: [5]}")
# Two echo steps: each step is a request to the echo model, batched with its other traffic.
TWICE = """
pipeline:
  steps:
    - model: echo
      inputs: {INPUT0: INPUT0}
      outputs: {OUTPUT0: middle}
    - model: echo
      inputs: {INPUT0: middle}
      outputs: {OUTPUT0: OUTPUT0}
"""
SERVER_KIND = trace_pb2.Span.SPAN_KIND_SERVER


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent, with its service name."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._spans: list[tuple[str, trace_pb2.Span]] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self._server.add_insecure_port(self.url)
        self._server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                attributes = {
                    a.key: a.value.string_value for a in resource_spans.resource.attributes
                }
                service = attributes.get("service.name", "")
                for scope_spans in resource_spans.scope_spans:
                    self._spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[trace_pb2.Span]:
        with self._lock:
            return [span for _, span in self._spans]

    def services(self) -> set[str]:
        with self._lock:
            return {service for service, _ in self._spans}

    def wait_for(
        self, enough: Callable[[list[trace_pb2.Span]], bool], timeout: float = 20.0
    ) -> list[trace_pb2.Span]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.spans()
            if enough(spans):
                return spans
            time.sleep(0.05)
        return self.spans()

    def stop(self) -> None:
        self._server.stop(0)


def attributes(span: trace_pb2.Span) -> dict[str, object]:
    found: dict[str, object] = {}
    for a in span.attributes:
        value = a.value
        found[a.key] = (
            value.int_value if value.WhichOneof("value") == "int_value" else value.string_value
        )
    return found


def traceparent(trace_id: str, sampled: bool = True) -> tuple[str, str]:
    """A W3C traceparent for `trace_id` from a fresh parent span: (header, parent span id)."""
    parent = secrets.token_hex(8)
    return f"00-{trace_id}-{parent}-{'01' if sampled else '00'}", parent


def infer_concurrently(calls: list[Callable[[], object]]) -> None:
    """Runs the calls at once (the gathered model batches them together)."""
    with futures.ThreadPoolExecutor(len(calls)) as pool:
        for result in [pool.submit(call) for call in calls]:
            result.result(timeout=60)


def grpc_infer(url: str, model: str, value: float, headers: dict[str, str]) -> None:
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(model, [value_input(value)], headers=headers)
        assert result.as_numpy("OUTPUT0").tolist() == [[value]]


def rest_infer(url: str, model: str, value: float, headers: dict[str, str]) -> None:
    tensor = httpclient.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[value]], np.float32))
    with httpclient.InferenceServerClient(url) as client:
        result = client.infer(model, [tensor], headers=headers)
        assert result.as_numpy("OUTPUT0").tolist() == [[value]]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tracing") / "models"
    inline = ECHO.replace("dynamic_batching: {}", "instance_group: [{kind: inline}]")
    write_repository(root, {"echo": ECHO, "gathered": GATHERED, "inline": inline})
    (root / "twice").mkdir()
    (root / "twice" / "config.yaml").write_text(TWICE)
    return root


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    receiver = Collector()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def traced(repository: Path, collector: Collector) -> Iterator[ServerProcess]:
    """A server tracing with Triton's default rate (1 in 1000), exporting every 100 ms."""
    server = ServerProcess(
        repository,
        "--trace-config",
        "mode=opentelemetry",
        "--trace-config",
        f"opentelemetry,url={collector.url}",
        "--trace-config",
        "opentelemetry,bsp_schedule_delay=100",
        env={"OTEL_SERVICE_NAME": "tiffin-under-test"},
    )
    yield server
    assert server.stop() == 0, server.log()


def test_a_batch_span_is_linked_to_every_request_it_served(
    traced: ServerProcess, collector: Collector
) -> None:
    """Four requests of one trace (three over gRPC, one over REST) meet in a batch: each has
    its request span under the caller's parent, with queue and encode children; the batch
    has one span, linked to the four, and the worker's compute span is its child. A request
    whose traceparent is not sampled is not traced."""
    trace_id = secrets.token_hex(16)
    parents = [traceparent(trace_id) for _ in range(4)]
    unsampled_id = secrets.token_hex(16)
    unsampled, _ = traceparent(unsampled_id, sampled=False)
    calls: list[Callable[[], object]] = [
        lambda h=h, v=float(i): grpc_infer(
            traced.url, "gathered", v, {"traceparent": h, "tracestate": "vendor=abc"}
        )
        for i, (h, _) in enumerate(parents[:3])
    ]
    rest_headers = {"traceparent": parents[3][0], "tracestate": "vendor=abc"}
    calls.append(lambda: rest_infer(traced.http_url, "gathered", 3.0, rest_headers))
    calls.append(lambda: grpc_infer(traced.url, "gathered", 4.0, {"traceparent": unsampled}))
    infer_concurrently(calls)

    def ours(spans: list[trace_pb2.Span]) -> list[trace_pb2.Span]:
        return [s for s in spans if s.trace_id.hex() == trace_id]

    spans = ours(
        collector.wait_for(
            lambda s: (
                len([x for x in ours(s) if x.name == "compute"]) >= 1
                and len([x for x in ours(s) if x.kind == SERVER_KIND]) == 4
            )
        )
    )
    requests = [s for s in spans if s.kind == SERVER_KIND]
    assert sorted(s.parent_span_id.hex() for s in requests) == sorted(p for _, p in parents)
    for span in requests:
        assert span.name == "infer"
        got = attributes(span)
        assert (got["tiffin.model"], got["tiffin.version"], got["tiffin.status"]) == (
            "gathered",
            "1",
            "OK",
        )
        assert span.trace_state == "vendor=abc"  # the caller's tracestate, carried on
        children = {s.name for s in spans if s.parent_span_id == span.span_id}
        assert {"decode", "queue", "encode"} <= children, children
    assert sorted(attributes(s)["tiffin.protocol"] for s in requests) == [
        "grpc",
        "grpc",
        "grpc",
        "rest",
    ]

    batches = [s for s in spans if s.name == "batch"]
    request_ids = {s.span_id for s in requests}
    linked = {link.span_id for b in batches for link in b.links}
    assert linked == request_ids, "every request span is linked from the batch that served it"
    assert len(batches) == 1, f"the four requests were not served by one batch: {len(batches)}"
    batch = batches[0]
    assert len(batch.links) == 4 and all(link.trace_id.hex() == trace_id for link in batch.links)
    assert batch.parent_span_id in request_ids
    assert attributes(batch)["tiffin.requests"] == 5  # the untraced request was in it too
    compute = [s for s in spans if s.name == "compute"]
    assert len(compute) == 1 and compute[0].parent_span_id == batch.span_id
    # The worker's call lies inside the batch, which lies inside each request.
    assert batch.start_time_unix_nano <= compute[0].start_time_unix_nano
    assert compute[0].end_time_unix_nano <= batch.end_time_unix_nano
    for span in requests:
        assert span.start_time_unix_nano <= batch.start_time_unix_nano
        assert batch.end_time_unix_nano <= span.end_time_unix_nano
    assert not [s for s in collector.spans() if s.trace_id.hex() == unsampled_id]
    assert collector.services() == {"tiffin-under-test"}  # OTEL_SERVICE_NAME


def test_each_pipeline_step_is_a_child_span(traced: ServerProcess, collector: Collector) -> None:
    """A pipeline request's steps are children of its span, and each step's batch is linked
    to its step."""
    trace_id = secrets.token_hex(16)
    header, parent = traceparent(trace_id)
    grpc_infer(traced.url, "twice", 7.0, {"traceparent": header})

    def ours(spans: list[trace_pb2.Span]) -> list[trace_pb2.Span]:
        return [s for s in spans if s.trace_id.hex() == trace_id]

    spans = ours(
        collector.wait_for(
            lambda s: (
                len([x for x in ours(s) if x.name == "compute"]) >= 2
                and any(x.kind == SERVER_KIND for x in ours(s))
            )
        )
    )
    (request,) = [s for s in spans if s.kind == SERVER_KIND]
    assert request.parent_span_id.hex() == parent
    assert attributes(request)["tiffin.model"] == "twice"
    steps = sorted(
        (s for s in spans if s.parent_span_id == request.span_id and s.name.startswith("step")),
        key=lambda s: s.name,
    )
    assert [s.name for s in steps] == ["step 1", "step 2"]
    assert all(attributes(s)["tiffin.model"] == "echo" for s in steps)
    assert steps[0].end_time_unix_nano <= steps[1].start_time_unix_nano
    batches = [s for s in spans if s.name == "batch"]
    for step in steps:
        (batch,) = [b for b in batches if any(link.span_id == step.span_id for link in b.links)]
        assert batch.parent_span_id == step.span_id
        assert any(s.name == "compute" and s.parent_span_id == batch.span_id for s in spans)
        assert any(s.name == "queue" and s.parent_span_id == step.span_id for s in spans)


def test_streamed_and_inline_requests_are_traced(
    traced: ServerProcess, collector: Collector
) -> None:
    """Each request of a ModelStreamInfer stream has its span under the stream's
    traceparent; an inline instance's compute (in the server process) has its span too."""
    trace_id = secrets.token_hex(16)
    header, parent = traceparent(trace_id)
    answers: queue.SimpleQueue[object] = queue.SimpleQueue()
    with grpcclient.InferenceServerClient(traced.url) as client:
        client.start_stream(
            lambda result, error: answers.put(error or result), headers={"traceparent": header}
        )
        for value in (1.0, 2.0):
            client.async_stream_infer("inline", [value_input(value)])
        for _ in range(2):
            answer = answers.get(timeout=30)
            assert not isinstance(answer, Exception), answer
        client.stop_stream()

    def ours(spans: list[trace_pb2.Span]) -> list[trace_pb2.Span]:
        return [s for s in spans if s.trace_id.hex() == trace_id]

    spans = ours(
        collector.wait_for(
            lambda s: (
                len([x for x in ours(s) if x.name == "compute"]) >= 2
                and len([x for x in ours(s) if x.name == "encode"]) >= 2
            )
        )
    )
    requests = [s for s in spans if s.kind == SERVER_KIND]
    assert [s.name for s in requests] == ["stream_infer", "stream_infer"]
    assert all(s.parent_span_id.hex() == parent for s in requests)
    assert all(attributes(s)["tiffin.model"] == "inline" for s in requests)
    for request in requests:
        assert any(s.name == "encode" and s.parent_span_id == request.span_id for s in spans)
        (batch,) = [
            b
            for b in spans
            if b.name == "batch" and any(link.span_id == request.span_id for link in b.links)
        ]
        assert any(s.name == "compute" and s.parent_span_id == batch.span_id for s in spans)


def test_rate_traces_one_request_in_n_and_spans_are_flushed_at_shutdown(
    repository: Path, collector: Collector
) -> None:
    """rate=3: of nine requests without a traceparent, three are traced. The exporter sends
    every 5 s (its default), yet what is queued reaches the collector when the server stops.
    The collector comes from the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT variable."""
    server = ServerProcess(
        repository,
        "--trace-config",
        "mode=opentelemetry",
        "--trace-config",
        "rate=3",
        env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://{collector.url}"},
    )
    before = {s.trace_id for s in collector.spans()}
    try:
        for i in range(9):
            grpc_infer(server.url, "echo", float(i), {})
    finally:
        assert server.stop() == 0, server.log()
    spans = collector.wait_for(lambda s: False, timeout=1.0)
    requests = [s for s in spans if s.kind == SERVER_KIND and s.trace_id not in before]
    assert len(requests) == 3
    assert len({s.trace_id for s in requests}) == 3  # each a root of its own trace
    assert all(not s.parent_span_id for s in requests)


def test_tracing_is_off_by_default(repository: Path, tmp_path: Path) -> None:
    """Without --trace-config nothing is exported, even to a collector the environment
    names and for a request that asks to be traced, and OpenTelemetry is never imported
    (the interpreter's import log, PYTHONPROFILEIMPORTTIME, names every module it imports;
    a traced server's names OpenTelemetry's)."""
    receiver = Collector()
    environment = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.url}",
        "PYTHONPROFILEIMPORTTIME": "1",
    }
    try:
        server = ServerProcess(repository, env=environment)
        header, _ = traceparent(secrets.token_hex(16))
        for i in range(3):
            grpc_infer(server.url, "echo", float(i), {"traceparent": header})
        grpc_infer(server.url, "twice", 1.0, {"traceparent": header})
        log = server.log()
        assert server.stop() == 0, log
        time.sleep(0.5)
        assert receiver.spans() == []
        assert "import time:" in log and "opentelemetry" not in log
        assert "tiffin.access" not in log  # the access log is off by default too

        traced = ServerProcess(repository, "--trace-config", "mode=opentelemetry", env=environment)
        log = traced.log()
        assert traced.stop() == 0, log
        assert "opentelemetry.sdk.trace" in log
    finally:
        receiver.stop()


def test_bad_trace_config_is_refused_naming_the_flag(repository: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiffin.server.cli",
            "serve",
            "--model-repository",
            str(repository),
            "--trace-config",
            "mode=triton",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 2
    assert "--trace-config" in result.stderr and "mode=opentelemetry" in result.stderr


def test_trace_config_items_as_triton_spells_them_and_as_the_variable_splits_them() -> None:
    from tiffin.server.observability.trace_config import parse_trace_config

    flags = parse_trace_config(
        ["mode=opentelemetry", "rate=5", "opentelemetry,url=collector.example:4317"]
    )
    assert (flags.enabled, flags.rate, flags.url) == (True, 5, "https://collector.example:4317")
    # TIFFIN_TRACE_CONFIG=mode=opentelemetry,url=127.0.0.1:4317 reaches the parser split
    # at its commas.
    variable = parse_trace_config(["mode=opentelemetry", "url=127.0.0.1:4317", "opentelemetry"])
    assert (variable.enabled, variable.rate, variable.url) == (True, 1000, "http://127.0.0.1:4317")
    assert not parse_trace_config([]).enabled
    assert not parse_trace_config(["mode=opentelemetry", "level=OFF"]).enabled
    resource = parse_trace_config(["opentelemetry,resource=deployment.environment=prod"])
    assert resource.resource == {"deployment.environment": "prod"}
    for bad, says in (
        (["rate=0"], "rate=0 must be a whole number of at least 1"),
        (["mode=triton"], "mode=triton is not offered"),
        (["level=TENSORS"], "tensors are never traced"),
        (["colour=blue"], "'colour=blue' is not understood"),
        (["url=nowhere"], "must be HOST:PORT"),
    ):
        with pytest.raises(ValueError, match=says):
            parse_trace_config(bad)
