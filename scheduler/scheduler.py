"""The scheduler's one interface: load model versions, submit requests, read statistics."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from tiffin.backends import ForwardingBackend, get_backend
from tiffin.protos.datatypes import DATATYPES
from tiffin.protos.errors import ModelNotReady
from tiffin.protos.model_config import ModelConfig
from tiffin.protos.tensors import element_count

from .arena import align
from .devices import place_instances
from .executor import Executor, ModelExecutor
from .forwarding import ForwardingExecutor
from .instance import InlineInstance, Instance, WorkerInstance
from .pipeline import PipelineExecutor
from .request import InferenceRequest, InferenceResponse, ModelKey
from .statistics import ModelStatistics

log = logging.getLogger(__name__)

MIN_ARENA_BYTES = 1 << 20
# Arena for models whose tensor sizes vary (-1 dims, BYTES): pages of /dev/shm cost
# memory only once written, so a generous size is cheap; larger batches go inline.
VARIABLE_ARENA_BYTES = 64 << 20


def arena_bytes(config: ModelConfig) -> int:
    """Room for one full batch of every input and output."""
    rows = config.max_batch_size or 1
    total = 0
    for tensor in [*config.inputs, *config.outputs]:
        dtype = DATATYPES[tensor.datatype]
        if dtype.itemsize == 0 or -1 in tensor.dims:
            return VARIABLE_ARENA_BYTES
        total += align(rows * element_count(tensor.dims) * dtype.itemsize)
    return max(total, MIN_ARENA_BYTES)


class Scheduler:
    """Routes requests to the executor of their model version. Knows nothing of gRPC.

    All methods run on the scheduler's event loop.
    """

    def __init__(self) -> None:
        self._executors: dict[ModelKey, Executor] = {}

    async def load(self, key: ModelKey, config: ModelConfig, version_dir: Path) -> None:
        """Creates and loads the instances of a model version; raises if any fails.

        Loading a version that is already loaded replaces it: the new instances
        take over once loaded, and the old ones finish their queue, then unload.
        """
        executor = self._create_executor(key, config, version_dir)
        await executor.start()
        old, self._executors[key] = self._executors.get(key), executor
        if old is not None:
            await old.stop()

    def _create_executor(self, key: ModelKey, config: ModelConfig, version_dir: Path) -> Executor:
        """The executor kind a config asks for: a pipeline, forwarding, or batching instances."""
        if config.pipeline is not None:
            return PipelineExecutor(key, config, self.resolve, self.enqueue)
        backend = get_backend(config.backend)
        if issubclass(backend, ForwardingBackend):
            return ForwardingExecutor(key, config, version_dir, backend)
        placements = place_instances(config.instance_group, key.name)
        size = arena_bytes(config)
        instances: list[Instance] = []
        executor = ModelExecutor(key, config, instances)
        for i, (device, inline) in enumerate(placements):
            name = f"{key.name}_{key.version}_{i}"
            instances.append(
                InlineInstance(name, config, version_dir, device)
                if inline
                else WorkerInstance(
                    name, config, version_dir, device, size, on_change=executor.instances_changed
                )
            )
        kinds = sorted(
            {("inline" if isinstance(i, InlineInstance) else str(i.device)) for i in instances}
        )
        log.info("%s: %d instance(s) on %s", key, len(instances), ", ".join(kinds))
        return executor

    async def unload(self, key: ModelKey) -> None:
        """Finishes the version's queued requests, then unloads its instances."""
        executor = self._executors.get(key)
        if executor is not None:
            await executor.stop()
            del self._executors[key]

    async def submit(self, request: InferenceRequest) -> InferenceResponse:
        """Queues a request and waits for its response (or its error)."""
        return await self.enqueue(request)

    def enqueue(self, request: InferenceRequest) -> asyncio.Future[InferenceResponse]:
        """Queues a request (on the loop, without awaiting): the future of its response.

        Raises at once what is known at once: model not loaded, queue full.
        """
        executor = self._executors.get(request.model)
        if executor is None:
            raise ModelNotReady(
                f"model '{request.model.name}' version {request.model.version} is not loaded"
            )
        return executor.enqueue(request)

    def resolve(self, name: str, version: int = -1) -> tuple[ModelKey, ModelConfig]:
        """The loaded version of a model (-1: the newest) and its config."""
        if version == -1:
            loaded = [k for k in self._executors if k.name == name]
            if not loaded:
                raise ModelNotReady(f"model '{name}' has no loaded version")
            key = max(loaded, key=lambda k: k.version)
        else:
            key = ModelKey(name, version)
            if key not in self._executors:
                raise ModelNotReady(f"model '{name}' version {version} is not loaded")
        return key, self._executors[key].config

    def statistics(self, key: ModelKey) -> ModelStatistics:
        """A snapshot of the version's statistics (zeros if it was never loaded)."""
        executor = self._executors.get(key)
        return executor.statistics.snapshot() if executor else ModelStatistics()
