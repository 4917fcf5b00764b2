"""Prometheus metrics against a real server: what was sent is what /metrics counts.

Each test starts its own server, so every counter starts at zero and must move by exactly
the requests the test sent, under the right labels, from both front doors.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import EXAMPLES, ServerProcess
from models import value_input, write_repository
from tiffin.scheduler.context import RequestContext
from tiffin.scheduler.request import ModelKey
from tiffin.scheduler.statistics import InstanceState, LiveState, ModelStatistics
from tiffin.server.observability import Metrics
from tiffin.server.observability.gpu import Gpus, GpuSample

TIMEOUT = 10.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ServerProcess) -> Samples:
    """The server's metrics: (name, labels) -> value."""
    with urllib.request.urlopen(server.metrics_url, timeout=TIMEOUT) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return parse(reply.read().decode())


def parse(text: str) -> Samples:
    """Prometheus' text format, with prometheus_client's parser where it is installed."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return _parse(text)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _parse(text: str) -> Samples:
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, rest = head.partition("{")
        labels = []
        for pair in rest.rstrip("}").split('",') if rest else []:
            key, _, val = pair.partition("=")
            labels.append((key, val.strip('"')))
        samples[(name, frozenset(labels))] = float(value)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def inputs(module, rows: int = 1, width: int = 16) -> list:
    data = np.arange(rows * width, dtype=np.int32).reshape(rows, width)
    made = [module.InferInput(name, list(data.shape), "INT32") for name in ("INPUT0", "INPUT1")]
    for i in made:
        i.set_data_from_numpy(data)
    return made


@pytest.fixture
def server(make_server, example_onnx_copy: Path) -> Iterator[ServerProcess]:
    yield make_server(example_onnx_copy)


def test_requests_and_durations_count_what_was_sent(server: ServerProcess) -> None:
    grpc_client = grpcclient.InferenceServerClient(server.url)
    http_client = httpclient.InferenceServerClient(
        server.http_url, connection_timeout=TIMEOUT, network_timeout=TIMEOUT
    )
    before = scrape(server)
    model = {"model": "add_sub", "version": "1"}
    assert value(before, "tiffin_model_events_total", **model, event="loaded") == 1
    assert value(before, "tiffin_inference_count_total", **model) == 0

    for _ in range(3):
        grpc_client.infer("add_sub", inputs(grpcclient), client_timeout=TIMEOUT)
    for _ in range(2):
        http_client.infer("add_sub", inputs(httpclient, rows=2))
    with pytest.raises(InferenceServerException):  # 15 values where 16 are declared
        grpc_client.infer("add_sub", inputs(grpcclient, width=15), client_timeout=TIMEOUT)
    for _ in range(2):
        with pytest.raises(InferenceServerException):
            http_client.infer("add_sub", inputs(httpclient, width=15))
    with pytest.raises(InferenceServerException):
        grpc_client.infer("no_such_model", inputs(grpcclient), client_timeout=TIMEOUT)
    grpc_client.get_server_metadata()  # not an inference: not counted

    after = scrape(server)
    requests = {
        dict(labels)["protocol"] + " " + dict(labels)["status"]: n
        for (name, labels), n in after.items()
        if name == "tiffin_requests_total" and dict(labels)["model"] == "add_sub"
    }
    assert requests == {
        "grpc OK": 3,
        "rest OK": 2,
        "grpc INVALID_ARGUMENT": 1,
        "rest INVALID_ARGUMENT": 2,
    }
    for (name, labels), n in after.items():
        if name == "tiffin_requests_total" and dict(labels)["model"] == "no_such_model":
            assert dict(labels)["version"] == "" and dict(labels)["status"] != "OK" and n == 1
            break
    else:
        raise AssertionError("the request for an unknown model was not counted")

    # Every answered request has a latency; only the 5 that ran were queued and computed.
    assert value(after, "tiffin_request_duration_seconds_count", **model) == 8
    assert value(after, "tiffin_request_duration_seconds_bucket", **model, le="+Inf") == 8
    assert value(after, "tiffin_request_duration_seconds_bucket", **model, le="30") == 8
    assert value(after, "tiffin_request_duration_seconds_sum", **model) > 0
    for histogram in ("tiffin_queue_duration_seconds", "tiffin_compute_duration_seconds"):
        assert value(after, f"{histogram}_count", **model) == 5
        buckets = [
            n
            for (name, labels), n in after.items()
            if name == f"{histogram}_bucket" and dict(labels)["model"] == "add_sub"
        ]
        assert len(buckets) == 19 and buckets == sorted(buckets)  # cumulative, 50 µs .. +Inf
        assert value(after, f"{histogram}_bucket", **model, le="5e-05") <= 5

    # Items and batches: 3 requests of 1 row and 2 of 2 rows, sent one at a time.
    assert value(after, "tiffin_inference_count_total", **model) == 7
    executions = value(after, "tiffin_execution_count_total", **model)
    assert executions == 5
    assert value(after, "tiffin_batch_size_count", **model) == executions
    assert value(after, "tiffin_batch_size_sum", **model) == 7
    assert value(after, "tiffin_batch_size_bucket", **model, le="1") == 3
    assert value(after, "tiffin_batch_size_bucket", **model, le="2") == 5
    grpc_client.close()
    http_client.close()


def test_unload_and_load_are_events(make_server, example_onnx_copy: Path) -> None:
    server = make_server(
        example_onnx_copy, "--model-control-mode", "explicit", "--load-model", "add_sub"
    )
    client = grpcclient.InferenceServerClient(server.url)
    client.unload_model("add_sub")
    client.load_model("add_sub")
    samples = scrape(server)
    model = {"model": "add_sub", "version": "1"}
    assert value(samples, "tiffin_model_events_total", **model, event="loaded") == 2
    assert value(samples, "tiffin_model_events_total", **model, event="unloaded") == 1
    client.close()


def test_no_allow_metrics_serves_nothing(make_server, example_onnx_copy: Path) -> None:
    server = make_server(example_onnx_copy, "--no-allow-metrics")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.metrics_url, timeout=2)


def test_metrics_port_already_taken_fails_clearly(example_server: ServerProcess) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "tiffin.server.cli", "serve"),
            *("--model-repository", str(EXAMPLES), "--grpc-port", "0", "--http-port", "0"),
            *("--metrics-port", str(example_server.metrics_port)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{example_server.metrics_port}" in result.stderr


def test_only_metrics_is_served(example_server: ServerProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(example_server.metrics_url.replace("/metrics", "/other"), timeout=2)
    assert caught.value.code == 404


def test_counts_from_many_threads_add_up() -> None:
    """Each thread counts into its own shard; a scrape adds them all, none lost."""
    metrics = Metrics(lambda: [])

    def answer(n: int) -> None:
        for _ in range(n):
            context = RequestContext("grpc", "infer")
            context.model, context.version = "m", "3"
            metrics.intercept(context, lambda: None)
            t = context.timeline
            t.queued, t.batch_start = t.received + 1, t.received + 100_000  # 100 µs queued
            context.finish("OK")

    threads = [threading.Thread(target=answer, args=(500,)) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples = parse(metrics.render())
    model = {"model": "m", "version": "3"}
    assert value(samples, "tiffin_requests_total", **model, protocol="grpc", status="OK") == 8000
    assert value(samples, "tiffin_request_duration_seconds_count", **model) == 8000
    assert value(samples, "tiffin_queue_duration_seconds_bucket", **model, le="5e-05") == 0
    assert value(samples, "tiffin_queue_duration_seconds_bucket", **model, le="0.00025") == 8000
    assert value(samples, "tiffin_compute_duration_seconds_count", **model) == 0


def test_streamed_requests_are_counted(server: ServerProcess) -> None:
    """Requests on a ModelStreamInfer stream count like unary ones (operation stream_infer)."""
    model = {"model": "add_sub", "version": "1", "protocol": "grpc", "status": "OK"}
    before = value(scrape(server), "tiffin_requests_total", **model)
    answers: list = []
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: answers.append(error or result))
    for _ in range(3):
        client.async_stream_infer("add_sub", inputs(grpcclient))
    client.stop_stream()  # waits for the answers
    client.close()
    assert len(answers) == 3 and not any(isinstance(a, Exception) for a in answers)
    assert value(scrape(server), "tiffin_requests_total", **model) == before + 3


def test_endless_unknown_model_names_cannot_grow_the_metrics(server: ServerProcess) -> None:
    """A client naming a new model each time: after 100 names, they count as one label."""
    client = grpcclient.InferenceServerClient(server.url)
    for i in range(130):
        with pytest.raises(InferenceServerException):
            client.infer(f"nope_{i}", inputs(grpcclient), client_timeout=TIMEOUT)
    client.close()
    models = {
        dict(labels)["model"]
        for (name, labels), _ in scrape(server).items()
        if name == "tiffin_requests_total" and dict(labels)["version"] == ""
    }
    assert len(models) <= 101 and "(other)" in models


SLOW = """
backend: toy_backends:Slow
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [1]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [1]}]
dynamic_batching: {priority_levels: 2, default_priority_level: 2}
instance_group: [{kind: cpu}]
"""


def wait_for(server: ServerProcess, ready, timeout: float = TIMEOUT) -> Samples:
    """Scrapes until `ready(samples)`; those samples."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if ready(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never got there; last scrape: {samples}")
        time.sleep(0.02)


def test_queue_depth_in_flight_busy_time_and_compute_split(make_server, tmp_path: Path) -> None:
    """While one slow batch runs, the requests behind it show by priority level, all of
    them in flight; afterwards the instance was busy for the slow batch's time and every
    request that ran has its compute input, infer and output times."""
    repo = write_repository(tmp_path / "models", {"slow": SLOW})
    server = make_server(repo)
    model = {"model": "slow", "version": "1"}
    instance = {**model, "instance": "slow_1_0"}
    client = grpcclient.InferenceServerClient(server.url)
    idle = scrape(server)
    assert value(idle, "tiffin_requests_in_flight", **model) == 0
    assert value(idle, "tiffin_queue_depth", **model, priority="1") == 0
    assert ("tiffin_queue_depth", frozenset({**model, "priority": "2"}.items())) in idle
    assert value(idle, "tiffin_instance_busy_seconds_total", **instance) == 0

    def send(seconds: float, priority: int = 0) -> None:
        client.infer("slow", [value_input(seconds)], priority=priority, client_timeout=TIMEOUT)

    first = threading.Thread(target=send, args=(0.8,))
    first.start()
    wait_for(server, lambda s: value(s, "tiffin_requests_in_flight", **model) == 1)
    behind = [threading.Thread(target=send, args=(0.0, p)) for p in (1, 2, 2)]
    for thread in behind:
        thread.start()
    waiting = wait_for(server, lambda s: value(s, "tiffin_requests_in_flight", **model) == 4)
    assert value(waiting, "tiffin_queue_depth", **model, priority="1") == 1
    assert value(waiting, "tiffin_queue_depth", **model, priority="2") == 2
    for thread in (first, *behind):
        thread.join()
    client.close()

    after = wait_for(server, lambda s: value(s, "tiffin_requests_in_flight", **model) == 0)
    assert value(after, "tiffin_queue_depth", **model, priority="1") == 0
    assert value(after, "tiffin_queue_depth", **model, priority="2") == 0
    busy = value(after, "tiffin_instance_busy_seconds_total", **instance)
    assert 0.8 <= busy < 5
    assert value(after, "tiffin_worker_restarts_total", **instance) == 0
    for stage in ("input", "infer", "output"):
        name = f"tiffin_compute_{stage}_duration_seconds"
        assert value(after, f"{name}_count", **model) == 4
        assert value(after, f"{name}_bucket", **model, le="+Inf") == 4
    # The slow request's own infer took 0.8 s; the three behind it took about nothing.
    infer = "tiffin_compute_infer_duration_seconds"
    assert 0.8 <= value(after, f"{infer}_sum", **model) < busy
    assert value(after, f"{infer}_bucket", **model, le="0.5") == 3
    # Inputs and outputs of one row are copies of a few bytes: well under 0.1 s each.
    assert value(after, "tiffin_compute_input_duration_seconds_bucket", **model, le="0.1") == 4
    assert value(after, "tiffin_compute_output_duration_seconds_bucket", **model, le="0.1") == 4


def test_worker_restarts_and_worker_processes(make_server, tmp_path: Path) -> None:
    """A worker that dies is counted when it is started again, and the process metrics
    follow the new worker process."""
    crash = """
backend: toy_backends:Crash
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [1]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [1]}]
instance_group: [{kind: cpu}]
"""
    repo = write_repository(tmp_path / "models", {"crash": crash})
    server = make_server(repo)
    instance = {"model": "crash", "version": "1", "instance": "crash_1_0"}
    before = scrape(server)
    started = value(before, "tiffin_worker_start_time_seconds", **instance)
    assert abs(started - time.time()) < 120
    assert value(before, "tiffin_worker_resident_memory_bytes", **instance) > 1 << 20
    assert value(before, "tiffin_worker_open_fds", **instance) > 0
    assert value(before, "tiffin_worker_cpu_seconds_total", **instance) > 0
    assert value(before, "tiffin_worker_restarts_total", **instance) == 0

    client = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException):  # the toy backend kills its worker on 666
        client.infer("crash", [value_input(666.0)], client_timeout=TIMEOUT)
    after = wait_for(
        server,
        lambda s: (
            value(s, "tiffin_worker_restarts_total", **instance) == 1
            and ("tiffin_worker_start_time_seconds", frozenset(instance.items())) in s
        ),
        timeout=30,
    )
    assert value(after, "tiffin_worker_start_time_seconds", **instance) >= started
    client.infer("crash", [value_input(1.0)], client_timeout=TIMEOUT)  # the new worker serves
    client.close()


def test_process_metrics_describe_the_server(example_server: ServerProcess) -> None:
    samples = scrape(example_server)
    assert abs(value(samples, "process_start_time_seconds") - time.time()) < 3600
    assert value(samples, "process_resident_memory_bytes") > 10 << 20
    assert value(samples, "process_virtual_memory_bytes") >= value(
        samples, "process_resident_memory_bytes"
    )
    assert 0 < value(samples, "process_open_fds") <= value(samples, "process_max_fds")
    assert value(samples, "process_cpu_seconds_total") > 0
    # Workers too: the python backend's models run in worker processes of their own.
    workers = {
        dict(labels)["model"]
        for (name, labels), _ in samples.items()
        if name == "tiffin_worker_resident_memory_bytes"
    }
    assert {"top_labels", "parse_measurements"} <= workers


def test_now_is_read_from_the_statistics_when_scraped() -> None:
    """Gauges come from each version's live state at scrape time, not from requests."""
    stats = ModelStatistics()
    stats.live_state = lambda: LiveState(
        queue_depth={1: 3, 2: 0},
        in_flight=5,
        instances=[InstanceState("m_2_0", busy_ns=1_500_000_000, restarts=2)],
    )
    stats.record_execution(4, 2, 100_000, 3_000_000, 20_000)  # 100 µs, 3 ms, 20 µs
    stats.record_execution(1, 1, 0, 1, 0, split=False)  # not split: not in the histograms
    samples = parse(Metrics(lambda: [(ModelKey("m", 2), stats.snapshot())]).render())
    model = {"model": "m", "version": "2"}
    instance = {**model, "instance": "m_2_0"}
    assert value(samples, "tiffin_queue_depth", **model, priority="1") == 3
    assert value(samples, "tiffin_requests_in_flight", **model) == 5
    assert value(samples, "tiffin_instance_busy_seconds_total", **instance) == 1.5
    assert value(samples, "tiffin_worker_restarts_total", **instance) == 2
    infer = "tiffin_compute_infer_duration_seconds"
    assert value(samples, f"{infer}_count", **model) == 2  # per request, as Triton counts
    assert value(samples, f"{infer}_bucket", **model, le="0.0025") == 0
    assert value(samples, f"{infer}_bucket", **model, le="0.005") == 2
    assert value(samples, f"{infer}_sum", **model) == pytest.approx(0.006)
    assert value(samples, "tiffin_compute_input_duration_seconds_bucket", **model, le="0.0001") == 2
    # An inline instance (pid 0) has no worker process to describe.
    assert not any(name.startswith("tiffin_worker_cpu") for name, _ in samples)


def test_refused_calls_are_counted() -> None:
    metrics = Metrics(lambda: [])
    for _ in range(3):
        metrics.refused("rest", "capacity")
    samples = parse(metrics.render())
    assert value(samples, "tiffin_requests_refused_total", protocol="rest", reason="capacity") == 3


class _OneGpu(Gpus):
    def sample(self) -> list[GpuSample]:
        return [GpuSample(0, "GPU-1234", 0.25, 1 << 30, 80 << 30)]


def test_gpu_metrics_only_where_nvml_reports_devices(monkeypatch) -> None:
    samples = parse(Metrics(lambda: [], gpus=_OneGpu()).render())
    gpu = {"gpu": "0", "gpu_uuid": "GPU-1234"}
    assert value(samples, "tiffin_gpu_utilization_ratio", **gpu) == 0.25
    assert value(samples, "tiffin_gpu_memory_used_bytes", **gpu) == 1 << 30
    assert value(samples, "tiffin_gpu_memory_total_bytes", **gpu) == 80 << 30
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no nvidia-ml-py: importing it fails
    without = Metrics(lambda: []).render()
    assert "tiffin_gpu" not in without and "process_open_fds" in without  # simply absent


@pytest.mark.gpu
def test_gpu_metrics_on_a_gpu() -> None:
    pynvml = pytest.importorskip("pynvml", reason="needs nvidia-ml-py (the gpu extra)")
    try:
        pynvml.nvmlInit()
        devices = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no NVML driver: {exc}")
    if not devices:
        pytest.skip("no GPU")
    samples = parse(Metrics(lambda: []).render())
    totals = [n for (name, _), n in samples.items() if name == "tiffin_gpu_memory_total_bytes"]
    ratios = [n for (name, _), n in samples.items() if name == "tiffin_gpu_utilization_ratio"]
    assert len(totals) == len(ratios) == devices
    assert all(n > 0 for n in totals) and all(0 <= r <= 1 for r in ratios)
