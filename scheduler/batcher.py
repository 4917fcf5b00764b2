"""The dynamic batcher: per-priority queues that an idle instance turns into its next batch.

A batch is cut when it reaches `max_batch_size` rows, when a preferred batch size is
reached, or when the oldest request has waited `max_queue_delay_microseconds`. A
request that carries several rows stays whole; requests whose shapes (beyond the batch
dimension) differ are not combined. Without `dynamic_batching` every request is its
own batch, in arrival order.

Requests leave a queue without running when their client's deadline passes
(DEADLINE_EXCEEDED), their queue timeout expires (REJECT: UNAVAILABLE; DELAY: they
move behind every request that has not expired), or their caller is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tiffin.protos.errors import DeadlineExceeded, InvalidInput, QueueFull, RequestTimeout
from tiffin.protos.model_config import ModelConfig, QueuePolicy

from .request import InferenceRequest, InferenceResponse, ModelKey


@dataclass(eq=False)
class Entry:
    """A queued request and the future its caller awaits."""

    request: InferenceRequest
    future: asyncio.Future[InferenceResponse]
    level: int
    delayed: bool = False  # its queue timeout expired under timeout_action DELAY
    queued: bool = True  # False once dispatched or dropped
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    @property
    def shape_key(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return tuple((n, a.shape[1:]) for n, a in self.request.inputs.items())


def _int_parameter(request: InferenceRequest, key: str) -> int | None:
    value: Any = request.parameters.get(key)
    return None if value is None else int(value)


class DynamicBatcher:
    """Queues for one model version; `put` enqueues, `next_batch` waits for a batch."""

    def __init__(self, key: ModelKey, config: ModelConfig) -> None:
        self._key = key
        settings = config.dynamic_batching
        self._combine = settings is not None and config.batching
        self._max_rows = config.max_batch_size or 1
        self._preferred = sorted(settings.preferred_batch_size) if settings else []
        self._delay = settings.max_queue_delay_microseconds / 1e6 if settings else 0.0
        self._levels = max(settings.priority_levels, 1) if settings else 1
        self._default_level = (
            settings.default_priority_level or self._levels
            if settings and settings.priority_levels
            else 1
        )
        default_policy = settings.default_queue_policy if settings else QueuePolicy()
        self._policies = {
            level: (
                settings.priority_queue_policy.get(level, default_policy)
                if settings
                else default_policy
            )
            for level in range(1, self._levels + 1)
        }
        self._queues: dict[int, deque[Entry]] = {lv: deque() for lv in self._policies}
        self._sizes = dict.fromkeys(self._policies, 0)
        self._arrived = asyncio.Event()

    def queued(self) -> int:
        return sum(self._sizes.values())

    def depths(self) -> dict[int, int]:
        """Requests waiting, by priority level."""
        return dict(self._sizes)

    def put(self, request: InferenceRequest) -> asyncio.Future[InferenceResponse]:
        """Enqueues a request; raises QueueFull when its level's queue is at max_queue_size."""
        loop = asyncio.get_running_loop()
        level = self._level_of(request)
        policy = self._policies[level]
        if policy.max_queue_size and self._sizes[level] >= policy.max_queue_size:
            raise QueueFull(
                f"Exceeds maximum queue size: model '{self._key.name}' already has "
                f"{policy.max_queue_size} requests waiting at priority level {level}"
            )
        entry = Entry(request, loop.create_future(), level)
        timeout_us = policy.default_timeout_microseconds
        requested = _int_parameter(request, "timeout")
        if requested is not None and requested > 0 and policy.allow_timeout_override:
            timeout_us = requested
        if timeout_us:
            expires = request.arrival_ns / 1e9 + timeout_us / 1e6
            action = self._reject if policy.timeout_action == "REJECT" else self._delay_entry
            entry.timers.append(loop.call_at(_loop_time(loop, expires), action, entry))
        if request.deadline is not None:
            entry.timers.append(
                loop.call_at(_loop_time(loop, request.deadline), self._deadline_passed, entry)
            )
        entry.future.add_done_callback(lambda _: self._leave(entry))
        self._queues[level].append(entry)
        self._sizes[level] += 1
        self._arrived.set()
        return entry.future

    def _level_of(self, request: InferenceRequest) -> int:
        priority = _int_parameter(request, "priority")
        if priority is not None and priority < 0:
            raise InvalidInput(f"priority must be >= 0, got {priority}")
        # As in Triton: 0, or a level the model does not have, means the default level.
        if not priority or priority > self._levels:
            return self._default_level
        return priority

    async def next_batch(self) -> list[Entry]:
        """Waits for the next batch; its entries have left the queue."""
        while True:
            plan, blocked = self._plan()
            if not plan:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if not self._combine:
                return self._dispatch(plan[:1])
            rows = sum(e.request.batch_size for e in plan)
            oldest = min(e.request.arrival_ns for e in plan) / 1e9
            wait = oldest + self._delay - time.monotonic()
            full = rows >= self._max_rows or blocked
            if self._preferred and rows >= self._preferred[0]:
                # Cut at the largest preferred size the queued rows reach exactly.
                cut, total = 0, 0
                for i, entry in enumerate(plan):
                    total += entry.request.batch_size
                    if total in self._preferred:
                        cut = i + 1
                if cut and (total >= self._preferred[-1] or full):
                    return self._dispatch(plan[:cut])
            if full or wait <= 0:
                return self._dispatch(plan)
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except TimeoutError:
                pass

    def _plan(self) -> tuple[list[Entry], bool]:
        """The entries the next batch would take now, in service order, and whether the
        request next in line was left out because it does not fit this batch."""
        plan: list[Entry] = []
        rows = 0
        for delayed in (False, True):
            for level in sorted(self._queues):
                queue = self._queues[level]
                while queue and not queue[0].queued:
                    queue.popleft()  # dropped while waiting
                for entry in queue:
                    if not entry.queued or entry.delayed != delayed:
                        continue
                    if plan and (
                        not self._combine
                        or rows + entry.request.batch_size > self._max_rows
                        or entry.shape_key != plan[0].shape_key
                    ):
                        return plan, True
                    plan.append(entry)
                    rows += entry.request.batch_size
        return plan, False

    def _dispatch(self, entries: list[Entry]) -> list[Entry]:
        for entry in entries:
            self._leave(entry)
        return entries

    def _leave(self, entry: Entry) -> None:
        """The entry stops counting against its queue (dispatched, failed or cancelled)."""
        if not entry.queued:
            return
        entry.queued = False
        self._sizes[entry.level] -= 1
        for timer in entry.timers:
            timer.cancel()

    def _reject(self, entry: Entry) -> None:
        if entry.queued and not entry.future.done():
            entry.future.set_exception(
                RequestTimeout(
                    f"Request timeout expired: the request waited in model '{self._key.name}''s "
                    "queue longer than its timeout"
                )
            )

    def _delay_entry(self, entry: Entry) -> None:
        entry.delayed = True

    def _deadline_passed(self, entry: Entry) -> None:
        if entry.queued and not entry.future.done():
            entry.future.set_exception(
                DeadlineExceeded(
                    f"the client's deadline passed while the request waited for model "
                    f"'{self._key.name}'"
                )
            )

    def fail_all(self, error: Exception) -> None:
        """Fails every queued request (no instance can run them)."""
        for queue in self._queues.values():
            for entry in list(queue):
                if entry.queued and not entry.future.done():
                    entry.future.set_exception(error)
            queue.clear()


def _loop_time(loop: asyncio.AbstractEventLoop, monotonic_seconds: float) -> float:
    """Converts a time.monotonic() instant to the loop's clock."""
    return loop.time() + (monotonic_seconds - time.monotonic())
