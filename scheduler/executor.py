"""The queue and instances of one model version."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from tiffin.protos.errors import BackendError, DeadlineExceeded, ModelNotReady, TiffinError

from .instance import InlineInstance
from .request import InferenceRequest, InferenceResponse, ModelKey
from .statistics import ModelStatistics

log = logging.getLogger(__name__)


class ModelExecutor:
    """Serves one model version: requests wait in a FIFO queue and each idle instance
    takes the next one. Requests run one at a time per instance."""

    def __init__(self, key: ModelKey, instances: list[InlineInstance]) -> None:
        self.key = key
        self.statistics = ModelStatistics()
        self._instances = instances
        self._queue: asyncio.Queue[tuple[InferenceRequest, asyncio.Future[InferenceResponse]]] = (
            asyncio.Queue()
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight = 0
        self._closed = False

    async def start(self) -> None:
        """Loads every instance (concurrently) and starts serving."""
        try:
            await asyncio.gather(*(i.load() for i in self._instances))
        except BaseException:
            await asyncio.gather(*(i.unload() for i in self._instances), return_exceptions=True)
            raise
        self._tasks = [asyncio.create_task(self._serve(i)) for i in self._instances]

    async def submit(self, request: InferenceRequest) -> InferenceResponse:
        if self._closed:
            raise ModelNotReady(f"model '{self.key.name}' version {self.key.version} is unloading")
        future: asyncio.Future[InferenceResponse] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((request, future))
        return await future

    async def stop(self) -> None:
        """Stops taking requests, finishes those queued and running, then unloads."""
        self._closed = True
        while not self._queue.empty() or self._in_flight:
            await asyncio.sleep(0.005)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(i.unload() for i in self._instances), return_exceptions=True)

    async def _serve(self, instance: InlineInstance) -> None:
        while True:
            request, future = await self._queue.get()
            if future.done():  # the caller went away while it waited
                continue
            self._in_flight += 1
            try:
                await self._run(instance, request, future)
            finally:
                self._in_flight -= 1

    async def _run(
        self,
        instance: InlineInstance,
        request: InferenceRequest,
        future: asyncio.Future[InferenceResponse],
    ) -> None:
        stats = self.statistics
        start = time.monotonic_ns()
        stats.record_queue(start - request.arrival_ns)
        try:
            if request.deadline is not None and time.monotonic() > request.deadline:
                raise DeadlineExceeded(
                    f"the client's deadline passed while the request waited for model "
                    f"'{self.key.name}'"
                )
            try:
                outputs = await instance.infer(request.inputs, request.outputs)
            except Exception as exc:
                log.warning("model '%s' instance %s failed: %s", self.key.name, instance.name, exc)
                raise BackendError(
                    f"model '{self.key.name}' version {self.key.version} failed: {exc}"
                ) from exc
            infer_done = time.monotonic_ns()
            response = InferenceResponse(
                self.key, self._check_outputs(request, outputs), request.id
            )
            done = time.monotonic_ns()
            stats.record_execution(request.batch_size, 1, 0, infer_done - start, done - infer_done)
        except TiffinError as exc:
            stats.record_outcome(False, time.monotonic_ns() - request.arrival_ns)
            if not future.done():
                future.set_exception(exc)
            return
        stats.record_outcome(True, done - request.arrival_ns)
        if not future.done():
            future.set_result(response)

    def _check_outputs(
        self, request: InferenceRequest, outputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The backend must return every requested output; fail clearly if it did not."""
        missing = [name for name in request.outputs if name not in outputs]
        if missing:
            raise BackendError(
                f"model '{self.key.name}' returned no output named {', '.join(missing)}"
            )
        return {name: np.asarray(outputs[name]) for name in request.outputs}
