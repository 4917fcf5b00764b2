"""A real Prometheus scrapes a real server under a short load; PromQL over what it stored
agrees with the requests that were sent.

Prometheus scrapes every second. The test first waits until Prometheus has seen the model's
series (so that the increases that follow count every later request), then holds the
model's one instance with a slow batch while requests queue behind it at two priority
levels (long enough for scrapes to see them waiting), then sends a burst from 8 threads
that the batcher combines. Bounded: about 20 s, 60 s at most.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from conftest import ServerProcess, free_port
from models import value_input, write_repository

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the prometheus binary is not installed (Debian: apt-get install prometheus)",
)

TIMEOUT = 30.0
HOLD_SECONDS = 3.0  # the slow batch: three scrapes at least see the queue behind it
THREADS, PER_THREAD = 8, 25
# The Slow toy backend sleeps its batch's first value in seconds: 0 answers at once.
MODEL = """
backend: toy_backends:Slow
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [1]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [1]}]
dynamic_batching: {max_queue_delay_microseconds: 2000, priority_levels: 2}
instance_group: [{kind: cpu}]
"""
SLOW = '{model="slow"}'


class Prometheus:
    """A prometheus process scraping one target every second, and its query API."""

    def __init__(self, target: str, folder: Path) -> None:
        self.port = free_port()
        config = folder / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: tiffin\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n"
        )
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's series: (labels, value)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=5) as reply:
            answer = json.loads(reply.read())
        assert answer["status"] == "success", answer
        return [(r["metric"], float(r["value"][1])) for r in answer["data"]["result"]]

    def scalar(self, promql: str) -> float:
        """The value of a query that gives one series."""
        series = self.query(promql)
        assert len(series) == 1, f"{promql} gave {series}"
        return series[0][1]

    def wait(self, promql: str, done: Callable[[float], bool], timeout: float = TIMEOUT) -> float:
        """Polls a one-series query until `done(value)`; that value."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                series = self.query(promql)
                last = series
                if len(series) == 1 and done(series[0][1]):
                    return series[0][1]
            except (urllib.error.URLError, ConnectionError):
                pass  # still starting
            time.sleep(0.25)
        raise AssertionError(f"Prometheus never answered {promql} as hoped; last: {last}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def prometheus_and_server(
    make_server, tmp_path: Path
) -> Iterator[tuple[Prometheus, ServerProcess]]:
    server = make_server(write_repository(tmp_path / "models", {"slow": MODEL}))
    prometheus = Prometheus(f"127.0.0.1:{server.metrics_port}", tmp_path)
    try:
        yield prometheus, server
    finally:
        prometheus.stop()


def in_flight(server: ServerProcess) -> float:
    """tiffin_requests_in_flight of the model, read from the server directly."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith('tiffin_requests_in_flight{model="slow"'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def until(done: Callable[[], bool], failure: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(failure)
        time.sleep(0.01)


def test_prometheus_sees_what_was_sent(prometheus_and_server) -> None:
    prometheus, server = prometheus_and_server
    began = time.monotonic()
    client = grpcclient.InferenceServerClient(server.url)

    def send(seconds: float = 0.0, priority: int = 0) -> None:
        client.infer("slow", [value_input(seconds)], priority=priority, client_timeout=TIMEOUT)

    # One request, then Prometheus's scrapes from before the load: increases count from here.
    send()
    prometheus.wait(f"sum(tiffin_requests_total{SLOW})", lambda n: n == 1)

    # The instance held by a slow batch; 3 requests at priority 1 and 2 at 2 wait behind it.
    hold = threading.Thread(target=send, args=(HOLD_SECONDS,))
    hold.start()
    until(lambda: in_flight(server) == 1, "the slow batch never ran")
    waiting = [threading.Thread(target=send, args=(0.0, p)) for p in (1, 1, 1, 2, 2)]
    for thread in waiting:
        thread.start()
    until(lambda: in_flight(server) == 6, "the requests behind it never queued")
    for thread in (hold, *waiting):
        thread.join()

    # A burst the batcher combines: 8 clients at once, 25 requests each.
    def burst() -> None:
        own = grpcclient.InferenceServerClient(server.url)
        for _ in range(PER_THREAD):
            own.infer("slow", [value_input(0.0)], client_timeout=TIMEOUT)
        own.close()

    threads = [threading.Thread(target=burst) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    sent = 1 + 1 + 5 + THREADS * PER_THREAD  # 207, all answered OK

    # Once Prometheus has scraped the last of them, every series below is final.
    total = prometheus.wait(f"sum(tiffin_requests_total{SLOW})", lambda n: n == sent)
    seen: dict[str, float] = {"sum(tiffin_requests_total)": total}

    def check(promql: str) -> float:
        seen[promql] = prometheus.scalar(promql)
        return seen[promql]

    assert check('sum(tiffin_requests_total{model="slow",status="OK"})') == sent
    # Counted from the first scrape on: every request after the first, with Prometheus's
    # extrapolation to the window's edges (never below what it saw).
    increase = check(f"sum(increase(tiffin_requests_total{SLOW}[1m]))")
    assert sent - 1 <= increase <= 2 * sent
    assert check(f"sum(rate(tiffin_requests_total{SLOW}[1m]))") > 0

    # Latency: most requests answer at once, the 6 held ones (3% of them) after 2 to 3 s.
    p50 = check(
        "histogram_quantile(0.5, sum by (le) "
        f"(rate(tiffin_request_duration_seconds_bucket{SLOW}[1m])))"
    )
    p99 = check(
        "histogram_quantile(0.99, sum by (le) "
        f"(rate(tiffin_request_duration_seconds_bucket{SLOW}[1m])))"
    )
    assert p50 < 0.5 and 1.0 <= p99 <= 5.0  # in the held ones' buckets, 1 s .. 5 s
    assert check(f"sum(tiffin_request_duration_seconds_count{SLOW})") == sent
    queue_p99 = check(
        "histogram_quantile(0.99, sum by (le) "
        f"(rate(tiffin_queue_duration_seconds_bucket{SLOW}[1m])))"
    )
    assert queue_p99 >= 1.0  # the 5 that waited behind the slow batch

    # Batches: every row counted once, and the burst combined (fewer batches than rows).
    rows = check(f"sum(tiffin_batch_size_sum{SLOW})")
    batches = check(f"sum(tiffin_batch_size_count{SLOW})")
    assert rows == sent == check(f"sum(tiffin_inference_count_total{SLOW})")
    assert batches == check(f"sum(tiffin_execution_count_total{SLOW})")
    assert batches < sent
    assert check('sum(tiffin_batch_size_bucket{model="slow",le="8"})') == batches
    assert check('sum(tiffin_batch_size_bucket{model="slow",le="+Inf"})') == batches

    # What the scrapes saw while the slow batch ran, and that nothing is left now.
    assert check('max_over_time(tiffin_queue_depth{model="slow",priority="1"}[1m])') == 3
    assert check('max_over_time(tiffin_queue_depth{model="slow",priority="2"}[1m])') == 2
    assert check(f"max_over_time(tiffin_requests_in_flight{SLOW}[1m])") == 6
    assert check(f"tiffin_requests_in_flight{SLOW}") == 0
    assert check(f"sum(tiffin_queue_depth{SLOW})") == 0

    # The one instance was busy at least for the slow batch; its busy ratio is a ratio.
    assert check(f"tiffin_instance_busy_seconds_total{SLOW}") >= HOLD_SECONDS
    assert 0 < check(f"rate(tiffin_instance_busy_seconds_total{SLOW}[1m])") <= 1
    assert check(f"tiffin_worker_restarts_total{SLOW}") == 0

    # The compute split: every request has its three stages; the slow one's infer was 3 s.
    for stage in ("input", "infer", "output"):
        assert check(f"tiffin_compute_{stage}_duration_seconds_count{SLOW}") == sent
    assert check(f"tiffin_compute_infer_duration_seconds_sum{SLOW}") >= HOLD_SECONDS

    # The server's own process and its worker, as Prometheus stored them.
    assert check('process_resident_memory_bytes{job="tiffin"}') > 10 << 20
    assert check('process_open_fds{job="tiffin"}') > 0
    assert check(f"tiffin_worker_resident_memory_bytes{SLOW}") > 1 << 20
    assert check(f"rate(tiffin_worker_cpu_seconds_total{SLOW}[1m])") >= 0

    # Every scrape parsed: Prometheus accepted the whole exposition each time.
    assert check('up{job="tiffin"}') == 1
    print("\n".join(f"{promql} = {v:g}" for promql, v in seen.items()))
    assert time.monotonic() - began < 60
