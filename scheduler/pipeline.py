"""A pipeline: each request runs through several models, each step queued like any request.

Steps go through the step model's own executor, so they batch with all other traffic
to that model. Steps that read only what already exists run at the same time. A step's
failure fails the request with the step's own status and a message naming the step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from tiffin.protos.datatypes import from_numpy
from tiffin.protos.errors import BackendError, ModelNotReady, TiffinError
from tiffin.protos.model_config import ModelConfig, PipelineStep, TensorConfig, shape_fits

from .context import Trace
from .request import InferenceRequest, InferenceResponse, ModelKey
from .statistics import LiveState, ModelStatistics

# (model name, version or -1 for the newest) -> the loaded version's key and config.
Resolve = Callable[[str, int], tuple[ModelKey, ModelConfig]]
Enqueue = Callable[[InferenceRequest], "asyncio.Future[InferenceResponse]"]


class StepError(TiffinError):
    """A step failed; carries the step's own status code."""

    def __init__(self, message: str, code: object) -> None:
        super().__init__(message)
        self.code = code  # type: ignore[assignment]


def check_tensor(array: np.ndarray, tensor: TensorConfig, batching: bool, what: str) -> None:
    """Raises BackendError when an array does not match its config (datatype, shape)."""
    try:
        datatype = from_numpy(array.dtype).name
    except (KeyError, ValueError):
        datatype = str(array.dtype)
    if datatype != tensor.datatype:
        raise BackendError(f"{what} is {datatype}, but {tensor.datatype} is expected")
    expected = tensor.full_dims(batching)
    shape = list(array.shape)
    if not shape_fits(shape, expected):
        raise BackendError(f"{what} has shape {shape}, but {expected} is expected")


class PipelineExecutor:
    """Serves one pipeline version by sending each request through its steps."""

    def __init__(
        self, key: ModelKey, config: ModelConfig, resolve: Resolve, enqueue: Enqueue
    ) -> None:
        assert config.pipeline is not None
        self.key = key
        self.config = config
        self.statistics = ModelStatistics()
        self._steps = config.pipeline.steps
        self._outputs = {t.name: t for t in config.outputs}
        self._waves = config.pipeline.order()
        self._resolve = resolve
        self._enqueue = enqueue
        self._running: set[asyncio.Task[InferenceResponse]] = set()
        self._closed = False
        # Its steps' queues and instances are their models' own.
        self.statistics.live_state = lambda: LiveState(in_flight=len(self._running))

    def _step_name(self, index: int) -> str:
        return f"pipeline '{self.key.name}' step {index + 1} (model '{self._steps[index].model}')"

    async def start(self) -> None:
        """Checks that every step's model is loaded."""
        for i, step in enumerate(self._steps):
            self._step_model(i, step)

    def _step_model(self, index: int, step: PipelineStep) -> tuple[ModelKey, ModelConfig]:
        try:
            return self._resolve(step.model, step.version)
        except TiffinError as exc:
            raise StepError(f"{self._step_name(index)}: {exc.message}", exc.code) from None

    def enqueue(self, request: InferenceRequest) -> asyncio.Future[InferenceResponse]:
        """Starts the request on its way through the steps; the future of its response."""
        if self._closed:
            name, version = self.key.name, self.key.version
            raise ModelNotReady(f"pipeline '{name}' version {version} is unloading")
        task = asyncio.get_running_loop().create_task(self._run(request))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def stop(self) -> None:
        """Stops taking requests and lets those on their way finish."""
        self._closed = True
        await asyncio.gather(*self._running, return_exceptions=True)

    async def _run(self, request: InferenceRequest) -> InferenceResponse:
        self.statistics.record_queue(0)  # a pipeline has no queue of its own; its steps do
        started = time.perf_counter_ns()
        tensors = dict(request.inputs)
        try:
            for wave in self._waves:
                await self._run_wave(wave, request, tensors)
            outputs = {}
            for name in request.outputs:
                check_tensor(
                    tensors[name], self._outputs[name], self.config.batching, f"output '{name}'"
                )
                outputs[name] = tensors[name]
        except BaseException:
            self.statistics.record_outcome(False, time.monotonic_ns() - request.arrival_ns)
            raise
        elapsed = time.perf_counter_ns() - started
        # The time through all its steps; their own models' statistics split their compute.
        self.statistics.record_execution(request.batch_size, 1, 0, elapsed, 0, split=False)
        self.statistics.record_outcome(True, time.monotonic_ns() - request.arrival_ns)
        return InferenceResponse(self.key, outputs, request.id)

    async def _run_wave(
        self, wave: list[int], request: InferenceRequest, tensors: dict[str, np.ndarray]
    ) -> None:
        futures: list[tuple[int, asyncio.Future[InferenceResponse]]] = []
        try:
            for i in wave:
                futures.append((i, self._start_step(i, request, tensors)))
            for i, future in futures:
                try:
                    response = await future
                except TiffinError as exc:
                    raise StepError(f"{self._step_name(i)}: {exc.message}", exc.code) from None
                for step_output, tensor_name in self._steps[i].outputs.items():
                    tensors[tensor_name] = response.outputs[step_output]
        finally:
            for _, future in futures:  # a failed (or cancelled) request stops its other steps
                future.cancel()

    def _start_step(
        self, index: int, request: InferenceRequest, tensors: dict[str, np.ndarray]
    ) -> asyncio.Future[InferenceResponse]:
        step = self._steps[index]
        key, config = self._step_model(index, step)
        inputs = {}
        try:
            for tensor in config.inputs:
                source = step.inputs.get(tensor.name)
                if source is None:
                    continue  # an optional input the step leaves out (checked at load)
                array = tensors[source]
                check_tensor(array, tensor, config.batching, f"input '{tensor.name}'")
                inputs[tensor.name] = array
            rows = next(iter(inputs.values())).shape[0] if config.batching and inputs else 1
            if config.batching and rows > (config.max_batch_size or 0):
                raise BackendError(
                    f"{rows} rows are more than the model's max_batch_size "
                    f"({config.max_batch_size})"
                )
            step_request = InferenceRequest(
                model=key,
                inputs=inputs,
                outputs=list(step.outputs),
                id=request.id,
                parameters=request.parameters,
                batch_size=rows,
                deadline=request.deadline,
            )
            trace = request.timeline.trace
            if trace is None:
                return self._enqueue(step_request)
            return _traced_step(
                self._enqueue, step_request, trace.step(f"step {index + 1}", key.name)
            )
        except TiffinError as exc:
            raise StepError(f"{self._step_name(index)}: {exc.message}", exc.code) from None


def _traced_step(
    enqueue: Enqueue, request: InferenceRequest, trace: Trace
) -> asyncio.Future[InferenceResponse]:
    """Queues a step's request carrying its step span, which ends with the step."""
    request.timeline.trace = trace
    try:
        future = enqueue(request)
    except TiffinError as exc:
        trace.end(request.timeline, exc.code.name)
        raise
    future.add_done_callback(lambda done: trace.end(request.timeline, _status(done)))
    return future


def _status(future: asyncio.Future[InferenceResponse]) -> str:
    if future.cancelled():
        return "CANCELLED"
    error = future.exception()
    if error is None:
        return "OK"
    return error.code.name if isinstance(error, TiffinError) else "INTERNAL"
