"""Admission estimates, from small factories: no sockets, no server."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tiffin.protos.errors import DeadlineExceeded, Overloaded
from tiffin.scheduler import InferenceRequest, ModelKey
from tiffin.scheduler.admission import ServiceRate

KEY = ModelKey("m", 1)


def request(seconds_left: float | None) -> InferenceRequest:
    deadline = None if seconds_left is None else time.monotonic() + seconds_left
    return InferenceRequest(KEY, {"x": np.zeros(1)}, ["y"], deadline=deadline)


def rate_of(requests_per_batch: int, batch_seconds: float) -> ServiceRate:
    rate = ServiceRate(KEY)
    for _ in range(50):
        rate.record("i0", requests_per_batch, 0.0, batch_seconds)
    return rate


def test_everything_is_admitted_until_a_batch_has_run():
    rate = ServiceRate(KEY)
    rate.admit(request(0.001).deadline, queued=10_000, instances=1)
    assert rate.too_late(request(0.0001), time.monotonic()) is None


def test_a_request_without_a_deadline_is_always_admitted():
    rate_of(1, 1.0).admit(None, queued=10_000, instances=1)


def test_wait_is_the_queue_at_the_measured_rate_plus_a_batch():
    rate = rate_of(10, 0.01)  # 1000 requests/s per instance
    assert rate.wait_seconds(queued=500, instances=1) == pytest.approx(0.51)
    assert rate.wait_seconds(queued=500, instances=2) == pytest.approx(0.26)


def test_a_request_that_cannot_finish_in_time_is_refused_at_once():
    rate = rate_of(10, 0.01)
    rate.admit(request(1.0).deadline, queued=500, instances=1)  # 0.51 s of work ahead: fits
    with pytest.raises(Overloaded) as caught:
        rate.admit(request(0.3).deadline, queued=500, instances=1)
    assert "cannot answer before the request's deadline" in caught.value.message
    assert "about 510 ms of work is queued" in caught.value.message


def test_a_batch_leaves_out_requests_whose_deadline_passes_before_it_finishes():
    rate = rate_of(1, 0.05)
    now = time.monotonic()
    assert rate.too_late(request(1.0), now) is None
    assert rate.too_late(request(None), now) is None
    error = rate.too_late(request(0.01), now)
    assert isinstance(error, DeadlineExceeded)
    assert "was not started" in error.message


def test_the_estimate_follows_a_change_of_speed_without_jumping_on_one_batch():
    rate = rate_of(1, 0.01)
    rate.record("i0", 1, 0.0, 1.0)  # one slow batch moves the estimate, but not all the way
    assert 0.01 < rate.batch_seconds < 0.2
    for _ in range(60):
        rate.record("i0", 1, 0.0, 0.1)
    assert rate.batch_seconds == pytest.approx(0.1, rel=0.05)


def test_while_requests_wait_the_time_between_batches_counts_against_the_rate():
    rate = ServiceRate(KEY)
    rate.record("i0", 10, 0.0, 0.01)
    assert rate.requests_per_second == pytest.approx(1000)
    rate.backlog("i0", 0.01, waiting=True)
    for i in range(60):  # 10 ms of work, then 10 ms before the next batch starts
        start = 0.02 + i * 0.02
        rate.record("i0", 10, start, start + 0.01)
        rate.backlog("i0", start + 0.01, waiting=True)
    assert rate.requests_per_second == pytest.approx(500, rel=0.05)
    rate.backlog("i0", 5.0, waiting=False)  # idle gaps do not count
    for _ in range(60):
        rate.record("i0", 10, 6.0, 6.01)
    assert rate.requests_per_second == pytest.approx(1000, rel=0.05)


def test_a_grpc_call_without_a_deadline_has_none() -> None:
    """gRPC reports a call without a deadline as 9.2e18 s away: the server treats it as no
    deadline (no timer per request, nothing admitted against it), and a real one as is."""
    from types import SimpleNamespace

    from tiffin.server.grpc.service import _call_context

    def context(remaining: float | None) -> SimpleNamespace:
        return SimpleNamespace(
            time_remaining=lambda: remaining,
            invocation_metadata=lambda: (),
            peer=lambda: "ipv4:127.0.0.1:5000",
        )

    assert _call_context(context(9.223372035058735e18), "infer", False).deadline is None  # type: ignore[arg-type]
    assert _call_context(context(None), "infer", False).deadline is None  # type: ignore[arg-type]
    bounded = _call_context(context(5.0), "infer", False).deadline  # type: ignore[arg-type]
    assert bounded is not None and 4.0 < bounded - time.monotonic() <= 5.0
