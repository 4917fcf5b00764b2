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

# Weight of the newest batch in the moving estimates: enough to follow a change of load
# within a few dozen batches, little enough that one slow batch does not refuse traffic.
_SMOOTHING = 0.1


class ServiceRate:
    """Moving estimates of one model version's batch duration and requests per second."""

    def __init__(self, key: ModelKey) -> None:
        self._key = key
        self.batch_seconds = 0.0  # 0 until a batch has run: admit everything
        self.requests_per_second = 0.0

    def record(self, requests: int, seconds: float) -> None:
        """One batch of `requests` requests took `seconds` on one instance."""
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

    def admit(self, request: InferenceRequest, queued: int, instances: int) -> None:
        """Raises Overloaded when the request cannot be answered before its deadline."""
        if request.deadline is None:
            return
        left = request.deadline - time.monotonic()
        wait = self.wait_seconds(queued, instances)
        if wait > left:
            raise Overloaded(
                f"model '{self._key.name}' version {self._key.version} cannot answer before "
                f"the request's deadline: about {wait * 1000:.0f} ms of work is queued ahead "
                f"of it and {max(left, 0) * 1000:.0f} ms are left; retry with backoff"
            )

    def too_late(self, request: InferenceRequest, now: float) -> DeadlineExceeded | None:
        """The error for a request about to run whose deadline will pass before its batch
        can finish, else None."""
        if request.deadline is None or request.deadline - now >= self.batch_seconds:
            return None
        return DeadlineExceeded(
            f"the request's deadline would pass before model '{self._key.name}' could "
            "finish it, so it was not started"
        )
