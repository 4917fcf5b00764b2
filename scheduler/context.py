"""What every request carries from the front door to its answer: who, until when, and when.

A front door makes the context when a call arrives; each stage stamps the timeline once
(`Timeline.stamp`), and statistics, metrics and tracing all read the same stamps, so
nothing is measured twice. Times are `time.monotonic_ns()`; 0 means "not reached".

A traced request also carries its `Trace` on the timeline (the one object the front door,
the scheduler and a pipeline's steps all hold); while tracing is off it is None, and each
stage pays one None check for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

# The stages of a request, in the order it passes them.
STAGES = ("received", "queued", "batch_start", "compute_start", "compute_end", "sent")


class BatchTrace(Protocol):
    """The span of one batch execution, linked to the span of every traced request in it."""

    # W3C traceparent of the batch's span: it travels to the worker with the batch.
    traceparent: str

    def end(self, end: int, status: str, compute: tuple[int, int] | None) -> None:
        """Ends the span at `end`; `compute` is when the backend's call began and ended."""


class Trace(Protocol):
    """A traced request's span as the scheduler and the front doors use it (made by
    server/observability/tracing.py); times are time.monotonic_ns()."""

    def record(self, name: str, start: int, end: int) -> None:
        """Records a finished child span (encode, for example)."""

    def step(self, name: str, model: str) -> Trace:
        """Starts the child span of a pipeline step; the step's own request carries it."""

    def batch(
        self, served: list[Trace], start: int, attributes: dict[str, str | int]
    ) -> BatchTrace:
        """Starts the span of a batch serving `served` (this request among them)."""

    def end(self, timeline: Timeline, status: str) -> None:
        """Records the queue wait the timeline shows and ends the span (at `sent`, or now)."""


class Timeline:
    """When a request reached each stage (monotonic nanoseconds; 0: not reached), and its
    Trace while it is traced."""

    __slots__ = (*STAGES, "trace")

    def __init__(self, received: int = 0) -> None:
        self.received = received or time.monotonic_ns()
        self.queued = self.batch_start = self.compute_start = self.compute_end = self.sent = 0
        self.trace: Trace | None = None

    def stamp(self, stage: str, at: int = 0) -> int:
        """Records that the request reached `stage` now (or `at`); returns the time."""
        at = at or time.monotonic_ns()
        setattr(self, stage, at)
        return at

    def between(self, start: str, end: str) -> int:
        """Nanoseconds from one stage to a later one; 0 when either was not reached."""
        a, b = getattr(self, start), getattr(self, end)
        return b - a if a and b else 0

    def as_dict(self) -> dict[str, int]:
        return {stage: getattr(self, stage) for stage in STAGES}


class RequestContext:
    """One call as it passes through the server.

    `front_door` is "grpc" or "rest"; `operation` the data plane operation ("infer",
    "model_metadata", ...); `metadata` the caller's headers or gRPC metadata (lower-case
    keys); `peer` the caller's address as the front door saw it; `client_certificate`
    the subject of the client's verified TLS certificate ("" without mutual TLS);
    `principal` who the caller is once authenticated ("" while nothing authenticates)
    with `roles` and `allowed_models` saying what it may do; `trace` the caller's trace
    context (traceparent and friends, empty while nothing traces). `on_finish` callbacks
    run once, with the final status name, when the call is answered.
    """

    __slots__ = (
        "front_door",
        "operation",
        "metadata",
        "id",
        "model",
        "version",
        "deadline",
        "peer",
        "client_certificate",
        "principal",
        "roles",
        "allowed_models",
        "trace",
        "timeline",
        "on_finish",
        "status",
    )

    def __init__(
        self,
        front_door: str,
        operation: str,
        metadata: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> None:
        self.front_door = front_door
        self.operation = operation
        self.metadata: Mapping[str, str] = metadata or {}
        self.id = ""
        self.model = ""
        self.version = ""  # the version serving it, once resolved
        self.deadline = deadline  # time.monotonic() after which the caller no longer waits
        self.peer = ""
        self.client_certificate = ""
        self.principal = ""
        self.roles: frozenset[str] = frozenset()
        self.allowed_models: frozenset[str] = frozenset()  # empty: every model
        self.trace: dict[str, str] = {}
        self.timeline = Timeline()
        self.on_finish: list[Callable[[RequestContext], None]] = []
        self.status = ""  # "OK" or the status code's name, once answered

    def finish(self, status: str) -> None:
        """The call is answered with `status`: stamps `sent` and runs the callbacks once."""
        if self.status:
            return
        self.status = status
        self.timeline.stamp("sent")
        for callback in self.on_finish:
            callback(self)
