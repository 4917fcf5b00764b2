"""One model version: its dynamic batcher and its instances, each taking a batch when idle."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np

from tiffin.backends import use_compute_cpus
from tiffin.protos.errors import BackendError, InvalidInput, ModelNotReady, TiffinError
from tiffin.protos.model_config import ModelConfig

from .admission import ServiceRate
from .batcher import DynamicBatcher
from .context import BatchTrace, Trace
from .drift import DriftMonitor
from .instance import Execution, InlineInstance, Instance
from .instance_choice import InstanceChooser, with_choice
from .pending import Pending
from .request import InferenceRequest, InferenceResponse, ModelKey
from .statistics import InstanceState, LiveState, ModelStatistics

log = logging.getLogger(__name__)


class Executor(Protocol):
    """What the scheduler asks of every kind of model version it serves."""

    key: ModelKey
    config: ModelConfig
    statistics: ModelStatistics

    async def start(self) -> None:
        """Loads what the version needs; raises if it cannot serve."""

    def enqueue(self, request: InferenceRequest) -> asyncio.Future[InferenceResponse]:
        """Queues a request; the future of its response. Raises when it cannot be queued."""

    async def stop(self) -> None:
        """Finishes queued and running requests, then releases everything."""


class ModelExecutor:
    """Serves one model version. A request fails alone: results are per request.

    Front doors queue requests from their own threads (`submit`); the event loop's callers
    (pipelines, warm-up) use `enqueue`. An inline instance serves from a thread of its
    own, which takes each batch from the queue, runs it and answers its requests: a
    request crosses threads twice, with no event loop in its way. A worker instance
    serves from a task on the event loop, which the worker's pipe wakes.
    """

    def __init__(
        self,
        key: ModelKey,
        config: ModelConfig,
        instances: list[Instance],
        monitor: DriftMonitor | None = None,
        chooser: InstanceChooser | None = None,
    ) -> None:
        self.key = key
        self.statistics = ModelStatistics()
        self.config = config
        self._output_order = [t.name for t in config.outputs]
        self._batcher = DynamicBatcher(key, config)
        self._rate = ServiceRate(key)
        self._instances = instances
        self._tasks: list[asyncio.Task[None]] = []
        self._threads: list[threading.Thread] = []
        # Serving tasks parked in next_batch (nothing taken from the queue yet), by instance
        # name, and those of them interrupted because their instance died while idle.
        self._idle: dict[str, asyncio.Task[None]] = {}
        self._interrupted: set[str] = set()
        # Why requests cannot wait for an instance (see instances_changed), or None.
        self._no_instance: ModelNotReady | None = None
        # Batches and requests running, and per instance the nanoseconds spent running
        # batches and when its current batch began; changed by every serving thread.
        self._counting = threading.Lock()
        self._running = 0
        self._running_requests = 0
        self._busy_ns: dict[str, int] = {}
        self._busy_since: dict[str, int] = {}
        self.statistics.live_state = self.live_state
        self._monitor = monitor
        self._chooser = chooser
        if monitor is not None:
            self.statistics.drift_report = monitor.report

    def live_state(self) -> LiveState:
        """Queues, requests in flight and instances as they are now (read from any thread:
        each value is read whole; a scrape may see one batch's start and not its end)."""
        now = time.monotonic_ns()
        busy_since = dict(self._busy_since)
        return LiveState(
            queue_depth=self._batcher.depths(),
            in_flight=self._batcher.queued() + self._running_requests,
            instances=[
                InstanceState(
                    name=i.name,
                    # A batch running now counts up to now, so that a long batch does not
                    # show as idle and then as a burst.
                    busy_ns=self._busy_ns.get(i.name, 0)
                    + (now - busy_since[i.name] if i.name in busy_since else 0),
                    restarts=i.restarts,
                    pid=i.pid,
                )
                for i in self._instances
            ],
        )

    async def start(self) -> None:
        """Loads every instance (concurrently) and starts serving. Instances of kind auto
        without a GPU are settled first: timed as a worker, then kept so or run inline, and
        `config` says which and why."""
        if self._monitor is not None:
            self._monitor.start()  # first: a reference that does not fit fails the load
        chooser = self._chooser
        first = [i for i in self._instances if chooser is None or not chooser.loaded_later(i)]
        results = await asyncio.gather(*(i.load() for i in first), return_exceptions=True)
        failures: list[BaseException] = [r for r in results if isinstance(r, BaseException)]
        if not failures and chooser is not None:
            try:
                self._instances[:], choice = await chooser.settle(self._instances)
                self.config = with_choice(self.config, choice)
            except Exception as exc:
                failures.append(exc)
        if failures:
            await asyncio.gather(*(i.unload() for i in self._instances), return_exceptions=True)
            if self._monitor is not None:
                self._monitor.stop()
            raise failures[0]
        for instance in self._instances:
            if isinstance(instance, InlineInstance):
                thread = threading.Thread(
                    target=self._serve_inline,
                    args=(instance,),
                    name=f"inline-{instance.name}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._tasks.append(asyncio.create_task(self._serve(instance)))

    def instances_changed(self) -> None:
        """Called by instances (on the event loop) when one dies, fails to restart, or
        comes back."""
        for instance in self._instances:
            task = None if instance.alive else self._idle.pop(instance.name, None)
            if task is not None:
                # Died while waiting for a batch: stop waiting, so the next batch stays
                # queued for a live instance instead of going to this dead one.
                self._interrupted.add(instance.name)
                task.cancel()
        self._no_instance = error = self._unavailable()
        if self._tasks and error is not None:
            self._batcher.fail_all(error)

    def _unavailable(self) -> ModelNotReady | None:
        """Why requests cannot wait for an instance, or None while they can.

        Requests wait while a worker restarts; once no instance is alive and every one
        has failed to restart, waiting could last forever, so they fail instead.
        """
        if any(i.alive for i in self._instances):
            return None
        failures = [i.restart_failure for i in self._instances]
        if not all(failures):
            return None
        return ModelNotReady(
            f"model '{self.key.name}' version {self.key.version} has no running instance: "
            + "; ".join(f for f in failures if f)
        )

    def submit(self, pending: Pending) -> None:
        """Queues a request, from any thread; its answer comes through `pending`. Raises
        when it cannot be queued: ModelNotReady once the version is unloading."""
        error = self._no_instance
        if error is not None:
            raise error
        request = pending.request
        if request.deadline is not None:
            self.admit(request.deadline)
        self._batcher.put(pending)
        request.timeline.stamp("queued")

    def enqueue(self, request: InferenceRequest) -> asyncio.Future[InferenceResponse]:
        """For callers on the event loop: queues a request; the future of its response.
        Raises when it cannot be queued. Cancelling the future drops the request."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InferenceResponse] = loop.create_future()

        def answered(pending: Pending) -> None:  # on the thread that answered it
            loop.call_soon_threadsafe(_settle, future, pending)

        pending = Pending(request, answered)
        self.submit(pending)
        future.add_done_callback(lambda f: pending.cancel() if f.cancelled() else None)
        return future

    def admit(self, deadline: float | None) -> None:
        """Raises Overloaded when a request with this deadline cannot be answered in time."""
        if deadline is None:
            return
        live = sum(1 for i in self._instances if i.alive)
        self._rate.admit(deadline, self._batcher.queued(), live)

    async def stop(self) -> None:
        """Stops taking requests, finishes those queued and running, then unloads."""
        self._batcher.close(
            ModelNotReady(
                f"model '{self.key.name}' version {self.key.version} is unloading; retry the "
                "request, which then goes to the version serving now, if any"
            )
        )
        while self._batcher.queued() or self._running:
            if not any(i.alive for i in self._instances):
                # Waiting for a restart would hold up the unload: fail what is queued.
                self._batcher.fail_all(
                    ModelNotReady(
                        f"model '{self.key.name}' version {self.key.version} is unloading "
                        "and has no running instance"
                    )
                )
            await asyncio.sleep(0.005)
        self._batcher.stop_serving()
        self._interrupted.clear()  # these cancellations end the tasks
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        for thread in self._threads:
            await loop.run_in_executor(None, thread.join)
        await asyncio.gather(*(i.unload() for i in self._instances), return_exceptions=True)
        if self._monitor is not None:
            self._monitor.stop()

    def _serve_inline(self, instance: InlineInstance) -> None:
        """An inline instance's thread: runs batches until the version stops."""
        use_compute_cpus()  # the models' cores, not only the frontend's
        while (batch := self._batcher.wait_batch()) is not None:
            with self._batch(instance, batch) as runnable:
                if runnable:
                    self._run_now(instance, runnable)

    async def _serve(self, instance: Instance) -> None:
        """A worker instance's task: runs batches until the version stops."""
        task = asyncio.current_task()
        assert task is not None
        while True:
            await instance.wait_alive()  # a worker restarting after a crash
            self._idle[instance.name] = task
            try:
                batch = await self._batcher.next_batch()
            except asyncio.CancelledError:
                if instance.name not in self._interrupted:
                    raise  # stop()
                task.uncancel()  # instances_changed(): wait for the restart instead
                continue
            finally:
                # Also when the cancellation was lost (Python 3.11's wait_for can return a
                # result instead): that batch then fails in execute(), as the dead worker's.
                self._idle.pop(instance.name, None)
                self._interrupted.discard(instance.name)
            with self._batch(instance, batch) as runnable:
                if runnable:
                    await self._run(instance, runnable)

    @contextmanager
    def _batch(self, instance: Instance, batch: list[Pending]) -> Iterator[list[Pending]]:
        """Around running a batch taken from the queue: yields its requests that can still
        be answered in time (the others fail), counts it as running meanwhile, and fails
        whatever a bug in running it left unanswered."""
        entries = [p for p in batch if not p.done()]
        if not entries:
            yield entries
            return
        started = time.monotonic_ns()
        with self._counting:
            self._running += 1
            self._running_requests += len(entries)
            self._busy_since[instance.name] = started
        try:
            runnable = self._admitted(entries, started)
            yield runnable
            if runnable:
                finished = time.monotonic()
                with self._counting:
                    self._rate.record(instance.name, len(runnable), started / 1e9, finished)
                    self._rate.backlog(instance.name, finished, self._batcher.queued() > 0)
        except Exception:  # a bug here must not stop the instance serving
            log.exception("model '%s': batch failed unexpectedly", self.key.name)
            self._fail(entries, BackendError("the server failed while running this batch"))
        finally:
            with self._counting:
                self._running -= 1
                self._running_requests -= len(entries)
                del self._busy_since[instance.name]
                busy_ns = time.monotonic_ns() - started
                self._busy_ns[instance.name] = self._busy_ns.get(instance.name, 0) + busy_ns

    def _admitted(self, entries: list[Pending], started: int) -> list[Pending]:
        """The requests of a batch about to run that can still be answered in time; the
        others fail now."""
        now = started / 1e9
        runnable = []
        for entry in entries:
            timeline = entry.request.timeline
            timeline.batch_start = started
            self.statistics.record_queue(started - (timeline.queued or timeline.received))
            too_late = self._rate.too_late(entry.request, now)
            if too_late is None:
                runnable.append(entry)
            else:  # its caller will have given up before this batch finishes
                self._fail([entry], too_late)
        return runnable

    def _run_now(self, instance: InlineInstance, entries: list[Pending]) -> None:
        """Runs a batch on this thread (an inline instance's) and answers its requests."""
        requests, outputs = self._batch_of(entries)
        compute_start = time.monotonic_ns()
        try:
            if traces := _traces(requests):
                with self._span(instance, requests, compute_start, traces) as span:
                    execution = span.ran(instance.run(requests, outputs, traced=True))
            else:
                execution = instance.run(requests, outputs)
        except TiffinError as exc:
            if self._failed_whole(entries, exc):
                for entry in entries:
                    self._run_now(instance, [entry])
            return
        self._answer(entries, requests, execution, compute_start)

    async def _run(self, instance: Instance, entries: list[Pending]) -> None:
        """Runs a batch on a worker instance and answers its requests."""
        requests, outputs = self._batch_of(entries)
        compute_start = time.monotonic_ns()
        try:
            if traces := _traces(requests):
                with self._span(instance, requests, compute_start, traces) as span:
                    execution = span.ran(
                        await instance.execute(requests, outputs, span.traceparent)
                    )
            else:
                execution = await instance.execute(requests, outputs)
        except TiffinError as exc:
            if self._failed_whole(entries, exc):
                for entry in entries:
                    await self._run(instance, [entry])
            return
        self._answer(entries, requests, execution, compute_start)

    def _failed_whole(self, entries: list[Pending], exc: TiffinError) -> bool:
        """A batch's run raised `exc`: fails its requests, or returns True when they are to
        run again one at a time. A backend that rejects or fails a batch (InvalidInput,
        BackendError) fails it whole, not only the requests at fault (see
        Backend.infer_batch): each runs alone then, so that only those fail. The fallback;
        it repeats the work of the others."""
        if isinstance(exc, (BackendError, InvalidInput)):
            if len(entries) > 1:
                return True
            exc = self._request_error(exc)
        self._fail(entries, exc)
        return False

    def _batch_of(self, entries: list[Pending]) -> tuple[list[InferenceRequest], list[str]]:
        """A batch's requests, and the outputs any of them asked for, in the model's order."""
        requests = [e.request for e in entries]
        wanted = {name for r in requests for name in r.outputs}
        return requests, [name for name in self._output_order if name in wanted]

    def _answer(
        self,
        entries: list[Pending],
        requests: list[InferenceRequest],
        execution: Execution,
        compute_start: int,
    ) -> None:
        """Hands each request of a finished batch its answer, and counts the batch."""
        stats = self.statistics
        output_start = time.perf_counter_ns()
        for request in requests:
            request.timeline.compute_start = compute_start
        failed = execution.failed
        responses: list[InferenceResponse | TiffinError]
        if len(failed) == len(requests):  # every request failed: there are no outputs
            responses = [self._request_error(failed[i]) for i in range(len(requests))]
        else:
            responses = self._scatter(requests, execution)
            for index, error in failed.items():  # the requests the backend reported fail alone
                responses[index] = self._request_error(error)
        # The worker's copy into the arena, and the copy out of it into each response.
        output_ns = execution.output_ns + time.perf_counter_ns() - output_start
        rows = sum(r.batch_size for r in requests)
        stats.record_execution(
            rows, len(requests), execution.input_ns, execution.infer_ns, output_ns
        )
        done = time.monotonic_ns()
        for entry, response in zip(entries, responses, strict=True):
            entry.request.timeline.compute_end = done
            if isinstance(response, TiffinError):
                stats.record_outcome(False, done - entry.request.arrival_ns)
                entry.finish(None, response)
                continue
            stats.record_outcome(True, done - entry.request.arrival_ns)
            entry.finish(response, None)
        if self._monitor is not None and len(failed) < len(requests):
            # After the answers: sampling copies the chosen rows (views of a worker's arena
            # too, which its next batch reuses), then hands them to the monitor's thread.
            self._monitor.offer(requests, execution.outputs, failed)

    @contextmanager
    def _span(
        self,
        instance: Instance,
        requests: list[InferenceRequest],
        start: int,
        traces: list[Trace],
    ) -> Iterator[_BatchSpan]:
        """A batch span around the instance's execution of a batch, parented on the first
        traced request and linked to every one (`traces`)."""
        attributes: dict[str, str | int] = {
            "tiffin.model": self.key.name,
            "tiffin.version": str(self.key.version),
            "tiffin.instance": instance.name,
            "tiffin.batch_size": sum(r.batch_size for r in requests),
            "tiffin.requests": len(requests),
        }
        span = _BatchSpan(traces[0].batch(traces, start, attributes))
        status = "OK"
        try:
            yield span
        except TiffinError as exc:
            status = exc.code.name
            raise
        except BaseException:
            status = "INTERNAL"
            raise
        finally:
            span.trace.end(time.monotonic_ns(), status, span.compute)

    def _scatter(
        self, requests: list[InferenceRequest], execution: Execution
    ) -> list[InferenceResponse | TiffinError]:
        """Each request's own rows of each output it asked for."""
        batched = self.config.batching and len(requests) > 1
        total_rows = sum(r.batch_size for r in requests)
        responses: list[InferenceResponse | TiffinError] = []
        row = 0
        for request in requests:
            rows = slice(row, row + request.batch_size) if batched else slice(None)
            row += request.batch_size
            outputs = {}
            for name in request.outputs:
                array = execution.outputs[name]
                if batched and array.shape[:1] != (total_rows,):
                    responses.append(
                        BackendError(
                            f"model '{self.key.name}' returned output '{name}' with shape "
                            f"{list(array.shape)}, which does not have one row per batch item"
                        )
                    )
                    break
                part = array[rows]
                # Views of a worker's arena are copied out before its next batch reuses it.
                outputs[name] = np.array(part) if execution.borrowed else part
            else:
                responses.append(InferenceResponse(self.key, outputs, request.id))
        return responses

    def _request_error(self, exc: TiffinError) -> TiffinError:
        """The error a request fails with when the backend rejected it (InvalidInput) or
        failed on it (BackendError), naming the model version."""
        prefix = f"model '{self.key.name}' version {self.key.version}"
        if isinstance(exc, InvalidInput):
            return InvalidInput(f"{prefix} rejected the request: {exc.message}")
        error = BackendError(f"{prefix} failed: {exc.message}")
        log.warning("%s", error.message)
        return error

    def _fail(self, entries: list[Pending], error: TiffinError) -> None:
        now = time.monotonic_ns()
        for entry in entries:
            self.statistics.record_outcome(False, now - entry.request.arrival_ns)
            entry.finish(None, error)


class _BatchSpan:
    """A traced batch's span while its instance runs it."""

    __slots__ = ("trace", "compute")

    def __init__(self, trace: BatchTrace) -> None:
        self.trace = trace
        self.compute: tuple[int, int] | None = None

    @property
    def traceparent(self) -> str:
        return self.trace.traceparent

    def ran(self, execution: Execution) -> Execution:
        self.compute = execution.compute
        return execution


def _traces(requests: list[InferenceRequest]) -> list[Trace]:
    return [r.timeline.trace for r in requests if r.timeline.trace is not None]


def _settle(future: asyncio.Future[InferenceResponse], pending: Pending) -> None:
    """On the event loop: `pending`'s answer becomes `future`'s."""
    if future.done():
        return
    try:
        future.set_result(pending.wait())
    except BaseException as exc:
        future.set_exception(exc)
