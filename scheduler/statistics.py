"""Per-model-version counters in the shape of Triton's ModelStatistics."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

# The request-level durations Tiffin measures, by their Triton names.
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_execution(
        self, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One backend execution that served `requests` requests with `batch_size` rows."""
        with self._lock:
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
            return copy
