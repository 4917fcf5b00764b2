"""Per-model-version counters in the shape of Triton's ModelStatistics, the histograms of
the compute split, and what the version is doing now (queues, in flight, instances)."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

from .drift import DriftReport

# The request-level durations Tiffin measures, by their Triton names.
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


# Histogram bounds in seconds; from 50 µs (a small model's queue wait or copy) to 30 s (a
# large model's request).
BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_BOUNDS_NS = [round(b * 1e9) for b in BUCKETS]
# The stages of a batch's compute, by Triton's names: copying inputs in, the backend's
# call, copying outputs out.
COMPUTE_STAGES = ("compute_input", "compute_infer", "compute_output")


class Histogram:
    """Counts per bucket of BUCKETS (the last one past every bound) and the sum, in ns."""

    __slots__ = ("counts", "total_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS_NS) + 1)
        self.total_ns = 0

    def observe(self, ns: int) -> None:
        self.counts[bisect_left(_BOUNDS_NS, ns)] += 1
        self.total_ns += ns

    def observe_many(self, ns: int, count: int) -> None:
        """`count` observations of `ns` each (the requests of one batch)."""
        self.counts[bisect_left(_BOUNDS_NS, ns)] += count
        self.total_ns += ns * count

    def copy(self) -> Histogram:
        copy = Histogram()
        copy.counts, copy.total_ns = self.counts.copy(), self.total_ns
        return copy


@dataclass
class InstanceState:
    """One model instance as it is now."""

    name: str
    busy_ns: int = 0  # time spent running batches since the version loaded
    restarts: int = 0  # attempts to start its worker process again after it exited
    pid: int = 0  # its worker process; 0 when it runs in the server process (inline)


@dataclass
class LiveState:
    """What a model version is doing at the moment it is asked."""

    queue_depth: dict[int, int] = field(default_factory=dict)  # priority level -> queued
    in_flight: int = 0  # requests queued or running
    instances: list[InstanceState] = field(default_factory=list)


@dataclass
class Duration:
    """A cumulative count and total nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchDurations:
    """Compute time of executions of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStatistics:
    """What Triton reports for a model version; see its statistics extension."""

    last_inference_ms: int = 0
    inference_count: int = 0  # batch rows served
    execution_count: int = 0  # backend executions
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)
    # Per-request histograms of the compute stages (COMPUTE_STAGES), for executions whose
    # split was measured.
    compute: dict[str, Histogram] = field(
        default_factory=lambda: {stage: Histogram() for stage in COMPUTE_STAGES}
    )
    # Filled by snapshot() from `live_state`, which the executor sets: read when asked,
    # so that requests pay nothing for it.
    live: LiveState = field(default_factory=LiveState)
    live_state: Callable[[], LiveState] | None = field(default=None, repr=False)
    # Filled by snapshot() from `drift_report`, set by a version with monitoring.
    drift: DriftReport | None = None
    drift_report: Callable[[], DriftReport] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_execution(
        self,
        batch_size: int,
        requests: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        split: bool = True,
    ) -> None:
        """One backend execution that served `requests` requests with `batch_size` rows.

        `split` is False where input, infer and output were not measured apart (a
        forwarded request, a pipeline): those stay out of the compute histograms."""
        with self._lock:
            if split:
                self.compute["compute_input"].observe_many(input_ns, requests)
                self.compute["compute_infer"].observe_many(infer_ns, requests)
                self.compute["compute_output"].observe_many(output_ns, requests)
            self.last_inference_ms = time.time_ns() // 1_000_000
            self.inference_count += batch_size
            self.execution_count += 1
            # Per-request stage durations, as Triton reports them.
            self.compute_input.add(input_ns * requests, requests)
            self.compute_infer.add(infer_ns * requests, requests)
            self.compute_output.add(output_ns * requests, requests)
            batch = self.batches.setdefault(batch_size, BatchDurations())
            batch.compute_input.add(input_ns)
            batch.compute_infer.add(infer_ns)
            batch.compute_output.add(output_ns)

    def record_queue(self, ns: int) -> None:
        with self._lock:
            self.queue.add(ns)

    def record_outcome(self, ok: bool, ns: int) -> None:
        """A request finished, successfully or not, `ns` after it arrived."""
        with self._lock:
            (self.success if ok else self.fail).add(ns)

    def snapshot(self) -> ModelStatistics:
        """A consistent copy, for reporting from another thread."""
        with self._lock:
            copy = ModelStatistics(
                last_inference_ms=self.last_inference_ms,
                inference_count=self.inference_count,
                execution_count=self.execution_count,
            )
            for name in DURATIONS:
                d = getattr(self, name)
                setattr(copy, name, Duration(d.count, d.ns))
            copy.batches = {
                size: BatchDurations(
                    *(
                        Duration(x.count, x.ns)
                        for x in (b.compute_input, b.compute_infer, b.compute_output)
                    )
                )
                for size, b in self.batches.items()
            }
            copy.compute = {stage: h.copy() for stage, h in self.compute.items()}
        # Outside the lock: the live state is the executor's, read as it is now.
        if self.live_state is not None:
            copy.live = self.live_state()
        if self.drift_report is not None:
            copy.drift = self.drift_report()
        return copy
