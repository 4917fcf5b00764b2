"""Prometheus metrics, read from what every request and batch already records.

Requests are counted in an `on_finish` callback that the "metrics" interceptor puts on
each inference call's context, from its timeline's stamps: nothing is timed a second time.
Batches (items, executions, batch sizes, the compute split) are read at scrape time from
the statistics each executor keeps anyway, and so is what is true now (queue depths,
requests in flight, instances' busy time and restarts), as are the processes' CPU, memory
and files (/proc) and the GPUs (NVML): the hot path pays a few additions per request and
takes no lock.

The text format is written here rather than with prometheus_client: its labelled
histograms cost several microseconds per request, a measurable share of a small model's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar

from tiffin.scheduler.context import RequestContext
from tiffin.scheduler.request import ModelKey
from tiffin.scheduler.statistics import BUCKETS, COMPUTE_STAGES, Histogram, ModelStatistics

from .drift import drift_families
from .gpu import Gpus
from .process import ProcessSample, sample

T = TypeVar("T")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Durations:
    """The histograms of one model version."""

    __slots__ = ("request", "queue", "compute")

    def __init__(self) -> None:
        self.request, self.queue, self.compute = Histogram(), Histogram(), Histogram()


UNSERVED_NAMES = 100
OTHER_MODEL = "(other)"


class _Shard:
    """What one thread counted: requests by labels, and durations by model version."""

    __slots__ = ("requests", "durations")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.durations: dict[tuple[str, str], _Durations] = {}


class Metrics:
    """The server's metrics: `intercept` goes in the chain's "metrics" slot, `model_event`
    is a registry subscriber, `render()` is the exposition text."""

    def __init__(
        self,
        statistics: Callable[[], Iterable[tuple[ModelKey, ModelStatistics]]],
        gpus: Gpus | None = None,
        shadows: Callable[[], Iterable[tuple[ModelKey, dict[str, int]]]] = lambda: (),
    ) -> None:
        self._statistics = statistics  # every serving version's statistics, read at scrape
        self._shadows = shadows  # shadow candidates' comparison counts, read at scrape
        self._gpus = gpus or Gpus()
        # Each thread that answers requests counts into a shard of its own, so that the hot
        # path takes no lock (64 handler threads would queue on one); a scrape adds them up.
        self._local = threading.local()
        self._shards: list[_Shard] = []
        self._lock = threading.Lock()  # guards the list of shards, the events and refusals
        self._events: dict[tuple[str, str, str], int] = {}
        self._refused: dict[tuple[str, str], int] = {}
        # Names of models no version served, as clients sent them: kept as labels up to
        # UNSERVED_NAMES, then counted as OTHER_MODEL, so that a client naming endless
        # models cannot grow the metrics without bound.
        self._unserved: set[str] = set()

    def _shard(self) -> _Shard:
        shard = _Shard()
        with self._lock:
            self._shards.append(shard)
        self._local.shard = shard
        return shard

    def intercept(self, context: RequestContext, proceed: Callable[[], T]) -> T:
        """The "metrics" interceptor: inference calls are counted once they are answered."""
        if context.operation in ("infer", "stream_infer"):
            context.on_finish.append(self._finished)
        return proceed()

    def _finished(self, context: RequestContext) -> None:
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        t = context.timeline
        model = context.model
        if not context.version and model not in self._unserved:
            model = self._unserved_label(model)
        counted = (model, context.version, context.front_door, context.status)
        requests = shard.requests
        requests[counted] = requests.get(counted, 0) + 1
        durations = shard.durations.get(counted[:2])
        if durations is None:
            durations = shard.durations[counted[:2]] = _Durations()
        durations.request.observe(t.sent - t.received)
        if t.queued and t.batch_start:
            durations.queue.observe(t.batch_start - t.queued)
        if t.compute_start and t.compute_end:
            durations.compute.observe(t.compute_end - t.compute_start)

    def _unserved_label(self, name: str) -> str:
        """The label for a model name no version served: the name while few are known."""
        with self._lock:
            if len(self._unserved) < UNSERVED_NAMES:
                self._unserved.add(name)
                return name
        return OTHER_MODEL

    def model_event(self, event: str, key: ModelKey) -> None:
        """A registry subscriber: counts loads, unloads, swaps and failures."""
        counted = (key.name, str(key.version), event)
        with self._lock:
            self._events[counted] = self._events.get(counted, 0) + 1

    def refused(self, protocol: str, reason: str) -> None:
        """A call a front door refused before it reached the interceptor chain (for
        example `capacity`: more calls in flight than the front door takes)."""
        counted = (protocol, reason)
        with self._lock:
            self._refused[counted] = self._refused.get(counted, 0) + 1

    def render(self) -> str:
        """Every metric in Prometheus' text exposition format."""
        with self._lock:
            shards = list(self._shards)
            events = dict(self._events)
            refused = dict(self._refused)
        # Shards are read while their threads count (each copy is one C call, so never
        # torn); a scrape may see a request being counted in one series and not yet in the
        # next, which the next scrape settles.
        requests: dict[tuple[str, str, str, str], int] = {}
        durations: dict[tuple[str, str], list[Histogram]] = {}
        for shard in shards:
            for key, n in list(shard.requests.items()):
                requests[key] = requests.get(key, 0) + n
            for pair, d in list(shard.durations.items()):
                merged = durations.setdefault(pair, [Histogram(), Histogram(), Histogram()])
                for into, h in zip(merged, (d.request, d.queue, d.compute), strict=True):
                    _add(into, h)
        lines: list[str] = []
        _header(lines, "tiffin_requests_total", "counter", "Inference requests answered.")
        for (model, version, protocol, status), n in sorted(requests.items()):
            labels = _labels(model=model, version=version, protocol=protocol, status=status)
            lines.append(f"tiffin_requests_total{{{labels}}} {n}")
        _header(
            lines,
            "tiffin_requests_refused_total",
            "counter",
            "Calls a front door refused before reading them (capacity).",
        )
        for (protocol, reason), n in sorted(refused.items()):
            labels = _labels(protocol=protocol, reason=reason)
            lines.append(f"tiffin_requests_refused_total{{{labels}}} {n}")
        for index, (name, what) in enumerate(
            (
                ("tiffin_request_duration_seconds", "From receiving a request to answering it."),
                ("tiffin_queue_duration_seconds", "From queueing a request to its batch start."),
                ("tiffin_compute_duration_seconds", "The backend's execution of its batch."),
            )
        ):
            _header(lines, name, "histogram", what)
            for (model, version), histograms in sorted(durations.items()):
                _histogram(lines, name, _labels(model=model, version=version), histograms[index])
        stats = sorted(self._statistics(), key=lambda s: (s[0].name, s[0].version))
        _render_batches(lines, stats)
        _render_now(lines, stats)
        _header(lines, "tiffin_model_events_total", "counter", "Model loads, unloads and swaps.")
        for (model, version, event), n in sorted(events.items()):
            labels = _labels(model=model, version=version, event=event)
            lines.append(f"tiffin_model_events_total{{{labels}}} {n}")
        _render_drift(lines, stats)
        _header(
            lines,
            "tiffin_shadow_comparisons_total",
            "counter",
            "Mirrored requests a shadow version answered, compared with the client's answer.",
        )
        for key, counts in sorted(self._shadows(), key=lambda s: (s[0].name, s[0].version)):
            for outcome, n in sorted(counts.items()):
                labels = _labels(model=key.name, version=str(key.version), outcome=outcome)
                lines.append(f"tiffin_shadow_comparisons_total{{{labels}}} {n}")
        _render_workers(lines, stats)
        _render_process(lines, sample(os.getpid()))
        self._render_gpus(lines)
        return "\n".join(lines) + "\n"

    def _render_gpus(self, lines: list[str]) -> None:
        """Nothing at all where there is no NVML: absent, not zero."""
        gpus = self._gpus.sample()
        if not gpus:
            return
        for name, kind, what, read in (
            (
                "tiffin_gpu_utilization_ratio",
                "gauge",
                "Share of the last sample period a kernel ran on the device (0 to 1).",
                lambda g: g.utilization_ratio,
            ),
            (
                "tiffin_gpu_memory_used_bytes",
                "gauge",
                "Device memory in use.",
                lambda g: g.memory_used_bytes,
            ),
            (
                "tiffin_gpu_memory_total_bytes",
                "gauge",
                "Device memory.",
                lambda g: g.memory_total_bytes,
            ),
        ):
            _header(lines, name, kind, what)
            for gpu in gpus:
                labels = _labels(gpu=str(gpu.index), gpu_uuid=gpu.uuid)
                lines.append(f"{name}{{{labels}}} {_number(read(gpu))}")


def _render_batches(lines: list[str], stats: list[tuple[ModelKey, ModelStatistics]]) -> None:
    """Items, executions, batch sizes and the compute split, counted as batches ran."""
    _header(lines, "tiffin_inference_count_total", "counter", "Items (batch rows) served.")
    for key, s in stats:
        lines.append(f"tiffin_inference_count_total{{{_key_labels(key)}}} {s.inference_count}")
    _header(lines, "tiffin_execution_count_total", "counter", "Backend executions (batches).")
    for key, s in stats:
        lines.append(f"tiffin_execution_count_total{{{_key_labels(key)}}} {s.execution_count}")
    _header(lines, "tiffin_batch_size", "histogram", "Rows in each backend execution.")
    for key, s in stats:
        labels = _key_labels(key)
        executions = {size: b.compute_infer.count for size, b in s.batches.items()}
        cumulative = 0
        for bound in BATCH_BUCKETS:
            cumulative += sum(n for size, n in executions.items() if _bucket(size) == bound)
            lines.append(f'tiffin_batch_size_bucket{{{labels},le="{bound}"}} {cumulative}')
        total = sum(executions.values())
        lines.append(f'tiffin_batch_size_bucket{{{labels},le="+Inf"}} {total}')
        rows = sum(size * n for size, n in executions.items())
        lines.append(f"tiffin_batch_size_sum{{{labels}}} {rows}")
        lines.append(f"tiffin_batch_size_count{{{labels}}} {total}")
    for stage in COMPUTE_STAGES:
        name = f"tiffin_{stage}_duration_seconds"
        what = _COMPUTE_HELP[stage]
        _header(lines, name, "histogram", what)
        for key, s in stats:
            _histogram(lines, name, _key_labels(key), s.compute[stage])


_COMPUTE_HELP = {
    "compute_input": "Gathering a request's batch inputs (into a worker's shared memory).",
    "compute_infer": "The backend's call on a request's batch.",
    "compute_output": "Copying a request's outputs out (a worker's: through shared memory).",
}


def _render_now(lines: list[str], stats: list[tuple[ModelKey, ModelStatistics]]) -> None:
    """What each version is doing at this scrape: queues, in flight, instances."""
    _header(
        lines, "tiffin_queue_depth", "gauge", "Requests waiting for a batch, by priority level."
    )
    for key, s in stats:
        for level, queued in sorted(s.live.queue_depth.items()):
            labels = _labels(model=key.name, version=str(key.version), priority=str(level))
            lines.append(f"tiffin_queue_depth{{{labels}}} {queued}")
    _header(lines, "tiffin_requests_in_flight", "gauge", "Requests queued or running.")
    for key, s in stats:
        lines.append(f"tiffin_requests_in_flight{{{_key_labels(key)}}} {s.live.in_flight}")
    _header(
        lines,
        "tiffin_instance_busy_seconds_total",
        "counter",
        "Time each instance spent running batches; its rate is the busy ratio.",
    )
    for key, s in stats:
        for i in s.live.instances:
            labels = _instance_labels(key, i.name)
            lines.append(f"tiffin_instance_busy_seconds_total{{{labels}}} {i.busy_ns / 1e9:.9g}")
    _header(
        lines,
        "tiffin_worker_restarts_total",
        "counter",
        "Attempts to start an instance's worker process again after it exited.",
    )
    for key, s in stats:
        for i in s.live.instances:
            lines.append(
                f"tiffin_worker_restarts_total{{{_instance_labels(key, i.name)}}} {i.restarts}"
            )


def _render_drift(lines: list[str], stats: list[tuple[ModelKey, ModelStatistics]]) -> None:
    """Drift scores and class shares of the versions with monitoring (computed by their
    monitors when their statistics are read, at most once a second)."""
    for family in drift_families(stats):
        _header(lines, family.name, family.kind, family.what)
        for labels, value in family.samples:
            lines.append(f"{family.name}{{{_labels(**labels)}}} {_number(float(value))}")


def _render_workers(lines: list[str], stats: list[tuple[ModelKey, ModelStatistics]]) -> None:
    """The worker processes' CPU, memory and files (instances running inline have none)."""
    workers = [
        (_instance_labels(key, i.name), found)
        for key, s in stats
        for i in s.live.instances
        if i.pid and (found := sample(i.pid)) is not None
    ]
    for name, kind, what, read in _PROCESS_FIGURES:
        worker_name = name.replace("process_", "tiffin_worker_", 1)
        _header(lines, worker_name, kind, what.replace("The server", "A worker"))
        for labels, found in workers:
            lines.append(f"{worker_name}{{{labels}}} {_number(read(found))}")


def _render_process(lines: list[str], found: ProcessSample | None) -> None:
    """The server process, under prometheus_client's standard names."""
    if found is None:
        return  # no /proc here
    for name, kind, what, read in _PROCESS_FIGURES:
        _header(lines, name, kind, what)
        lines.append(f"{name} {_number(read(found))}")


_PROCESS_FIGURES: tuple[tuple[str, str, str, Callable[[ProcessSample], float]], ...] = (
    (
        "process_cpu_seconds_total",
        "counter",
        "The server process's user and system CPU time, in seconds.",
        lambda p: p.cpu_seconds,
    ),
    (
        "process_resident_memory_bytes",
        "gauge",
        "The server process's resident memory.",
        lambda p: p.resident_bytes,
    ),
    (
        "process_virtual_memory_bytes",
        "gauge",
        "The server process's virtual memory.",
        lambda p: p.virtual_bytes,
    ),
    (
        "process_open_fds",
        "gauge",
        "The server process's open file descriptors.",
        lambda p: p.open_fds,
    ),
    (
        "process_max_fds",
        "gauge",
        "The server process's limit of open file descriptors.",
        lambda p: p.max_fds,
    ),
    (
        "process_start_time_seconds",
        "gauge",
        "When the server process started, in seconds since the Unix epoch.",
        lambda p: p.start_time_seconds,
    ),
)


def _bucket(size: int) -> int:
    """The smallest batch-size bound that holds `size` (0: past them all)."""
    return next((b for b in BATCH_BUCKETS if size <= b), 0)


def _header(lines: list[str], name: str, kind: str, what: str) -> None:
    lines.append(f"# HELP {name} {what}")
    lines.append(f"# TYPE {name} {kind}")


def _histogram(lines: list[str], name: str, labels: str, histogram: Histogram) -> None:
    cumulative = 0
    for bound, n in zip(BUCKETS, histogram.counts, strict=False):
        cumulative += n
        lines.append(f'{name}_bucket{{{labels},le="{bound:g}"}} {cumulative}')
    cumulative += histogram.counts[-1]
    lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {cumulative}')
    lines.append(f"{name}_sum{{{labels}}} {histogram.total_ns / 1e9:.9g}")
    lines.append(f"{name}_count{{{labels}}} {cumulative}")


def _add(into: Histogram, other: Histogram) -> None:
    """Adds `other` (another thread's, still counting: copied in one C call each) to `into`."""
    counts = other.counts.copy()
    into.counts = [a + b for a, b in zip(into.counts, counts, strict=True)]
    into.total_ns += other.total_ns


def _number(value: float) -> str:
    """Every digit (`:g` would round a byte count or a start time to six)."""
    return repr(value)


def _key_labels(key: ModelKey) -> str:
    return _labels(model=key.name, version=str(key.version))


def _instance_labels(key: ModelKey, instance: str) -> str:
    return _labels(model=key.name, version=str(key.version), instance=instance)


def _labels(**values: str) -> str:
    return ",".join(f'{k}="{_escaped(v)}"' for k, v in values.items())


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class MetricsEndpoint:
    """`GET /metrics` on its own port and thread (a small http.server: scrapes are rare)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Binds and serves; returns the port (the one picked when `port` is 0)."""
        render = self._metrics.render

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # a scrape every few seconds is not worth a log line

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
