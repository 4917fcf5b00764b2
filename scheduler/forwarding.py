"""Serves a model version whose backend forwards each request elsewhere (ForwardingBackend).

No queue, no batching, no worker: every request becomes a task on the scheduler's loop
that awaits `backend.infer` at once (the remote server queues and batches). The task
honours the request's deadline and is cancelled with the request's future, which
cancels the forwarded call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np

from tiffin.backends import ForwardingBackend
from tiffin.protos.errors import BackendError, DeadlineExceeded, ModelNotReady, TiffinError
from tiffin.protos.model_config import ModelConfig

from .request import InferenceRequest, InferenceResponse, ModelKey
from .statistics import LiveState, ModelStatistics

log = logging.getLogger(__name__)

# How long `stop` lets requests in flight finish before failing them.
STOP_GRACE_SECONDS = 30.0


class ForwardingExecutor:
    """The Executor of a ForwardingBackend model version: one task per request."""

    def __init__(
        self,
        key: ModelKey,
        config: ModelConfig,
        version_dir: Path,
        backend_cls: type[ForwardingBackend],
        stop_grace_seconds: float = STOP_GRACE_SECONDS,
    ) -> None:
        self.key = key
        self.statistics = ModelStatistics()
        self.config = config
        self._version_dir = version_dir
        self._backend = backend_cls()
        self._stop_grace = stop_grace_seconds
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # No queue and no instances here: what is in flight is all there is to tell.
        self.statistics.live_state = lambda: LiveState(in_flight=len(self._tasks))

    async def start(self) -> None:
        """Loads the backend (opens its connection); raises if it cannot serve."""
        await self._backend.load(self.config, self._version_dir)

    def enqueue(self, request: InferenceRequest) -> asyncio.Future[InferenceResponse]:
        """Starts forwarding at once; the future of the response. Cancelling the future
        cancels the forwarded call."""
        if self._closed:
            raise ModelNotReady(f"model '{self.key.name}' version {self.key.version} is unloading")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InferenceResponse] = loop.create_future()
        task = loop.create_task(self._forward(request, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        future.add_done_callback(lambda f: task.cancel() if f.cancelled() else None)
        return future

    async def _forward(
        self, request: InferenceRequest, future: asyncio.Future[InferenceResponse]
    ) -> None:
        started = time.monotonic_ns()
        self.statistics.record_queue(started - request.arrival_ns)
        try:
            outputs = await self._call(request)
            response = self._response(request, outputs)
        except asyncio.CancelledError:
            # The caller went away (its future is cancelled already), or `stop` gave up.
            self._finish(request, future, error=ModelNotReady(self._unloaded()))
            raise
        except TiffinError as exc:
            self._finish(request, future, error=exc)
            return
        except Exception as exc:  # the backend's own failure: INTERNAL, with its message
            error = BackendError(
                f"model '{self.key.name}' version {self.key.version} failed: {exc}"
            )
            log.warning("%s", error.message)
            self._finish(request, future, error=error)
            return
        forwarding_ns = time.monotonic_ns() - started
        # The remote call is one span: encoding, network and the remote server's own
        # queue and compute cannot be told apart from here.
        self.statistics.record_execution(request.batch_size, 1, 0, forwarding_ns, 0, split=False)
        self._finish(request, future, response=response)

    async def _call(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        """The backend's answer, within the request's deadline (also enforced here, in case
        a backend does not honour the timeout it is given)."""
        if request.deadline is None:
            return await self._backend.infer(
                request.inputs, request.outputs, request.parameters, None
            )
        remaining = request.deadline - time.monotonic()
        if remaining <= 0:
            raise self._deadline_passed()
        try:
            async with asyncio.timeout(remaining):
                return await self._backend.infer(
                    request.inputs, request.outputs, request.parameters, remaining
                )
        except TimeoutError:
            raise self._deadline_passed() from None

    def _deadline_passed(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the client's deadline passed while the request was forwarded for model "
            f"'{self.key.name}'"
        )

    def _unloaded(self) -> str:
        return (
            f"model '{self.key.name}' version {self.key.version} was unloaded before the "
            "request finished"
        )

    def _response(
        self, request: InferenceRequest, outputs: dict[str, np.ndarray]
    ) -> InferenceResponse:
        """The requested outputs in the requested order; a missing one is the backend's fault."""
        missing = [name for name in request.outputs if name not in outputs]
        if missing:
            raise BackendError(
                f"model '{self.key.name}' version {self.key.version} did not return output(s) "
                f"{', '.join(missing)}"
            )
        return InferenceResponse(
            self.key, {name: outputs[name] for name in request.outputs}, request.id
        )

    def _finish(
        self,
        request: InferenceRequest,
        future: asyncio.Future[InferenceResponse],
        response: InferenceResponse | None = None,
        error: TiffinError | None = None,
    ) -> None:
        self.statistics.record_outcome(error is None, time.monotonic_ns() - request.arrival_ns)
        if future.done():
            return
        if response is not None:
            future.set_result(response)
        else:
            future.set_exception(error or BackendError("the request failed without a reason"))

    async def stop(self) -> None:
        """Stops taking requests, lets those in flight finish (bounded), then unloads."""
        self._closed = True
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=self._stop_grace)
            for task in late:
                task.cancel()  # its future fails with ModelNotReady
            if late:
                log.warning(
                    "model '%s' version %d: %d forwarded request(s) did not finish within "
                    "%.0f s of unloading and were failed",
                    self.key.name,
                    self.key.version,
                    len(late),
                    self._stop_grace,
                )
                await asyncio.gather(*late, return_exceptions=True)
        await self._backend.unload()
