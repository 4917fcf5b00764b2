"""The dynamic batcher: per-priority queues that an idle instance turns into its next batch.

A batch is cut when it reaches `max_batch_size` rows, when a preferred batch size is
reached, or when the oldest request has waited `max_queue_delay_microseconds`. A
request that carries several rows stays whole; requests whose shapes (beyond the batch
dimension) differ are not combined. Without `dynamic_batching` every request is its
own batch, in arrival order.

Requests leave a queue without running when their client's deadline passes
(DEADLINE_EXCEEDED), their queue timeout expires (REJECT: UNAVAILABLE; DELAY: they
move behind every request that has not expired), or their caller is cancelled.

The queues are shared between threads: front doors put requests from their own threads,
an inline instance's thread waits for its next batch with `wait_batch`, and a worker
instance's task on the event loop with `next_batch`. One lock guards them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any

from tiffin.protos.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    QueueFull,
    RequestTimeout,
    TiffinError,
)
from tiffin.protos.model_config import ModelConfig, QueuePolicy

from .pending import Pending
from .request import InferenceRequest, ModelKey
from .timers import TIMERS


def _int_parameter(request: InferenceRequest, key: str) -> int | None:
    value: Any = request.parameters.get(key)
    return None if value is None else int(value)


def _shape_key(pending: Pending) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((n, a.shape[1:]) for n, a in pending.request.inputs.items())


class DynamicBatcher:
    """Queues for one model version; `put` enqueues (any thread), `wait_batch` (a thread)
    and `next_batch` (a task on the event loop) wait for a batch."""

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
        self._queues: dict[int, deque[Pending]] = {lv: deque() for lv in self._policies}
        self._sizes = dict.fromkeys(self._policies, 0)
        self._lock = threading.Lock()
        # Serving threads waiting for a batch, and serving tasks on the event loop.
        self._arrived = threading.Condition(self._lock)
        self._threads_waiting = 0
        self._tasks_waiting = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._task_event: asyncio.Event | None = None
        self._wake_scheduled = False  # a wake of the waiting tasks is on its way to the loop
        self._closed: TiffinError | None = None  # why puts are refused, once they are
        self._serving = True

    def queued(self) -> int:
        return sum(self._sizes.values())

    def depths(self) -> dict[int, int]:
        """Requests waiting, by priority level."""
        return dict(self._sizes)

    # ---- putting requests in (any thread) ----------------------------------------------------

    def put(self, pending: Pending) -> None:
        """Queues a request. Raises QueueFull when its level's queue is at max_queue_size,
        and the error `close` was given once the queues are closed."""
        request = pending.request
        level = self._level_of(request)
        policy = self._policies[level]
        expiries: list[tuple[float, Any]] = []
        timeout_us = policy.default_timeout_microseconds
        requested = _int_parameter(request, "timeout")
        if requested is not None and requested > 0 and policy.allow_timeout_override:
            timeout_us = requested
        if timeout_us:
            action = self._reject if policy.timeout_action == "REJECT" else self._delay_entry
            expiries.append((request.arrival_ns / 1e9 + timeout_us / 1e6, action))
        if request.deadline is not None:
            expiries.append((request.deadline, self._deadline_passed))
        wake_tasks = False
        with self._lock:
            if self._closed is not None:
                raise self._closed
            if policy.max_queue_size and self._sizes[level] >= policy.max_queue_size:
                raise QueueFull(
                    f"Exceeds maximum queue size: model '{self._key.name}' already has "
                    f"{policy.max_queue_size} requests waiting at priority level {level}"
                )
            pending.level = level
            pending.queued = True
            pending.cancel_hook = self.cancel
            pending.timers = [TIMERS.at(when, action, pending) for when, action in expiries]
            self._queues[level].append(pending)
            self._sizes[level] += 1
            if self._threads_waiting:
                self._arrived.notify()
            elif self._tasks_waiting and not self._wake_scheduled:
                self._wake_scheduled = wake_tasks = True
        if wake_tasks:
            self._wake_tasks()
        if pending.cancelled:  # its caller went away before the hook was in place
            self.cancel(pending)

    def _level_of(self, request: InferenceRequest) -> int:
        priority = _int_parameter(request, "priority")
        if priority is not None and priority < 0:
            raise InvalidInput(f"priority must be >= 0, got {priority}")
        # As in Triton: 0, or a level the model does not have, means the default level.
        if not priority or priority > self._levels:
            return self._default_level
        return priority

    def _wake_tasks(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._set_task_event()
        else:
            loop.call_soon_threadsafe(self._set_task_event)

    def _set_task_event(self) -> None:  # on the loop
        with self._lock:
            self._wake_scheduled = False
        if self._task_event is not None:
            self._task_event.set()

    # ---- taking batches out -------------------------------------------------------------------

    def wait_batch(self) -> list[Pending] | None:
        """For a serving thread: blocks until the next batch (its requests have left the
        queue); None once `stop_serving` was called."""
        with self._lock:
            while self._serving:
                batch, wait = self._take()
                if batch:
                    return batch
                self._threads_waiting += 1
                try:
                    self._arrived.wait(wait)
                finally:
                    self._threads_waiting -= 1
            return None

    async def next_batch(self) -> list[Pending]:
        """For a serving task on the event loop: waits for the next batch."""
        if self._task_event is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._task_event = asyncio.Event()
        event = self._task_event
        while True:
            with self._lock:
                batch, wait = self._take()
                if batch:
                    return batch
                event.clear()
                self._tasks_waiting += 1
            try:
                if wait is None:
                    await event.wait()
                else:
                    try:
                        await asyncio.wait_for(event.wait(), wait)
                    except TimeoutError:
                        pass
            finally:
                with self._lock:
                    self._tasks_waiting -= 1

    def _take(self) -> tuple[list[Pending], float | None]:
        """Under the lock: the batch to run now, or none and how long until the oldest
        queued request's delay runs out (None: until a request arrives)."""
        plan, blocked = self._plan()
        if not plan:
            return plan, None
        if not self._combine:
            return self._dispatch(plan[:1]), None
        rows = sum(p.request.batch_size for p in plan)
        full = rows >= self._max_rows or blocked
        if self._preferred and rows >= self._preferred[0]:
            # Cut at the largest preferred size the queued rows reach exactly.
            cut, total = 0, 0
            for i, pending in enumerate(plan):
                total += pending.request.batch_size
                if total in self._preferred:
                    cut = i + 1
            if cut and (total >= self._preferred[-1] or full):
                return self._dispatch(plan[:cut]), None
        if full or not self._delay:
            return self._dispatch(plan), None
        oldest = min(p.request.arrival_ns for p in plan) / 1e9
        wait = oldest + self._delay - time.monotonic()
        if wait <= 0:
            return self._dispatch(plan), None
        return [], wait

    def _plan(self) -> tuple[list[Pending], bool]:
        """The requests the next batch would take now, in service order, and whether the
        request next in line was left out because it does not fit this batch."""
        plan: list[Pending] = []
        rows = 0
        shape = None
        for delayed in (False, True):
            for level in sorted(self._queues):
                queue = self._queues[level]
                while queue and not queue[0].queued:
                    queue.popleft()  # dropped while waiting
                for pending in queue:
                    if not pending.queued or pending.delayed != delayed:
                        continue
                    if plan:
                        if (
                            not self._combine
                            or rows + pending.request.batch_size > self._max_rows
                            or _shape_key(pending) != shape
                        ):
                            return plan, True
                    else:
                        shape = _shape_key(pending)
                    plan.append(pending)
                    rows += pending.request.batch_size
        return plan, False

    def _dispatch(self, batch: list[Pending]) -> list[Pending]:
        for pending in batch:
            self._leave(pending)
        return batch

    def _leave(self, pending: Pending) -> None:
        """Under the lock: the request stops counting against its queue."""
        if not pending.queued:
            return
        pending.queued = False
        pending.cancel_hook = None
        self._sizes[pending.level] -= 1
        for timer in pending.timers:
            timer.cancel()
        pending.timers = []

    # ---- requests that leave without running --------------------------------------------------

    def cancel(self, pending: Pending) -> None:
        """Its caller went away: it leaves the queue, answered as cancelled. A request
        already taken into a batch is left to finish."""
        self._drop(pending, Cancelled("the request was cancelled"))

    def _drop(self, pending: Pending, error: TiffinError) -> None:
        with self._lock:
            if not pending.queued:
                return
            self._leave(pending)
        pending.finish(None, error)

    def _reject(self, pending: Pending) -> None:  # on the timer thread
        self._drop(
            pending,
            RequestTimeout(
                f"Request timeout expired: the request waited in model '{self._key.name}''s "
                "queue longer than its timeout"
            ),
        )

    def _delay_entry(self, pending: Pending) -> None:  # on the timer thread
        with self._lock:
            if pending.queued:
                pending.delayed = True

    def _deadline_passed(self, pending: Pending) -> None:  # on the timer thread
        self._drop(
            pending,
            DeadlineExceeded(
                f"the client's deadline passed while the request waited for model "
                f"'{self._key.name}'"
            ),
        )

    def fail_all(self, error: TiffinError) -> None:
        """Fails every queued request (no instance can run them)."""
        with self._lock:
            failed = [p for queue in self._queues.values() for p in queue if p.queued]
            for pending in failed:
                self._leave(pending)
            for queue in self._queues.values():
                queue.clear()
        for pending in failed:
            pending.finish(None, error)

    # ---- closing --------------------------------------------------------------------------------

    def close(self, error: TiffinError) -> None:
        """From now on `put` raises `error`; what is queued stays to be served."""
        with self._lock:
            self._closed = error

    def stop_serving(self) -> None:
        """Serving threads return from `wait_batch` (None) instead of waiting."""
        with self._lock:
            self._serving = False
            self._arrived.notify_all()
