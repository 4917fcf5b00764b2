"""Prometheus metrics against a real server: what was sent is what /metrics counts.

Each test starts its own server, so every counter starts at zero and must move by exactly
the requests the test sent, under the right labels, from both front doors.
"""

from __future__ import annotations

import json
import shutil
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

from conftest import EXAMPLES, ServerProcess, free_port
from tiffin.scheduler.context import RequestContext
from tiffin.server.observability import Metrics

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
def server(make_server) -> Iterator[ServerProcess]:
    yield make_server(EXAMPLES)


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


def test_unload_and_load_are_events(make_server) -> None:
    server = make_server(EXAMPLES)
    client = grpcclient.InferenceServerClient(server.url)
    client.unload_model("add_sub")
    client.load_model("add_sub")
    samples = scrape(server)
    model = {"model": "add_sub", "version": "1"}
    assert value(samples, "tiffin_model_events_total", **model, event="loaded") == 2
    assert value(samples, "tiffin_model_events_total", **model, event="unloaded") == 1
    client.close()


def test_no_allow_metrics_serves_nothing(make_server) -> None:
    server = make_server(EXAMPLES, "--no-allow-metrics")
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


@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="the prometheus binary is not installed"
)
def test_prometheus_scrapes_it(server: ServerProcess, tmp_path: Path) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    for _ in range(4):
        client.infer("add_sub", inputs(grpcclient), client_timeout=TIMEOUT)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: tiffin\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.metrics_port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        promql = urllib.request.quote('sum(tiffin_requests_total{model="add_sub",status="OK"})')
        query = f"http://127.0.0.1:{port}/api/v1/query?query={promql}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(query, timeout=2) as reply:
                    result = json.loads(reply.read())["data"]["result"]
                if result:
                    assert float(result[0]["value"][1]) == 4
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        raise AssertionError("Prometheus never scraped the server")
    finally:
        prometheus.terminate()
        prometheus.wait(10)
        client.close()


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
