"""Admission: whether a request can still finish before its deadline.

An executor records how long each batch took and how many requests it carried. From the
requests already queued and the requests per second its live instances manage, `wait_seconds`
estimates how long a new request would wait and run. A request whose deadline comes
sooner is refused at once (RESOURCE_EXHAUSTED), and a batch leaves out the requests
whose deadline will pass before it can finish: compute spent on an answer nobody waits
for is taken from the requests that can still be answered in time.
"""

from __future__ import annotations

import time

from tiffin.protos.errors import DeadlineExceeded, Overloaded

from .request import InferenceRequest, ModelKey

# Share of the time left that the estimated wait may fill: the estimate is a mean, and a
# request admitted at the edge of its deadline misses it as often as not.
_HEADROOM = 0.75
# Weight of the newest batch in the moving estimates: enough to follow a change of load
# within a few dozen batches, little enough that one slow batch does not refuse traffic.
_SMOOTHING = 0.1


class ServiceRate:
    """Moving estimates of one model version's batch duration and requests per second."""

    def __init__(self, key: ModelKey) -> None:
        self._key = key
        self.batch_seconds = 0.0  # 0 until a batch has run: admit everything
        self.requests_per_second = 0.0
        # Per instance: when its last batch finished, if requests were waiting then.
        self._busy_since: dict[str, float] = {}

    def record(self, instance: str, requests: int, started: float, finished: float) -> None:
        """One batch of `requests` requests ran on `instance` from `started` to `finished`.

        While requests wait, the rate counts from the end of the instance's previous batch,
        so the time between batches (handing over, the event loop's other work) slows the
        estimate as it slows the queue."""
        begin = min(self._busy_since.pop(instance, started), started)
        self._update(requests, finished - begin)

    def backlog(self, instance: str, finished: float, waiting: bool) -> None:
        """Whether requests were waiting when `instance` finished a batch at `finished`."""
        if waiting:
            self._busy_since[instance] = finished
        else:
            self._busy_since.pop(instance, None)

    def _update(self, requests: int, seconds: float) -> None:
        seconds = max(seconds, 1e-6)
        if not self.batch_seconds:
            self.batch_seconds, self.requests_per_second = seconds, requests / seconds
            return
        self.batch_seconds += _SMOOTHING * (seconds - self.batch_seconds)
        self.requests_per_second += _SMOOTHING * (requests / seconds - self.requests_per_second)

    def wait_seconds(self, queued: int, instances: int) -> float:
        """How long a request arriving now would take to be answered: the queue ahead of
        it at the rate the live instances manage, plus its own batch."""
        if not self.requests_per_second:
            return 0.0
        return queued / (self.requests_per_second * max(instances, 1)) + self.batch_seconds

    def admit(self, deadline: float | None, queued: int, instances: int) -> None:
        """Raises Overloaded when a request with this deadline cannot be answered in time."""
        if deadline is None:
            return
        left = deadline - time.monotonic()
        wait = self.wait_seconds(queued, instances)
        if wait > left * _HEADROOM:
            raise Overloaded(
                f"model '{self._key.name}' version {self._key.version} cannot answer before "
                f"the request's deadline: about {wait * 1000:.0f} ms of work is queued ahead "
                f"of it and {max(left, 0) * 1000:.0f} ms are left; retry with backoff"
            )

    def too_late(self, request: InferenceRequest, now: float) -> DeadlineExceeded | None:
        """The error for a request about to run whose deadline will pass before its batch
        can finish, else None."""
        if request.deadline is None or (request.deadline - now) * _HEADROOM >= self.batch_seconds:
            return None
        return DeadlineExceeded(
            f"the request's deadline would pass before model '{self._key.name}' could "
            "finish it, so it was not started"
        )
