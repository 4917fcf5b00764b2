"""The scheduler's one interface: load model versions, submit requests, read statistics."""

from __future__ import annotations

import logging
from pathlib import Path

from tiffin.protos.errors import ModelNotReady
from tiffin.protos.model_config import ModelConfig

from .devices import place_instances
from .executor import ModelExecutor
from .instance import InlineInstance
from .request import InferenceRequest, InferenceResponse, ModelKey
from .statistics import ModelStatistics

log = logging.getLogger(__name__)


class Scheduler:
    """Routes requests to the executor of their model version. Knows nothing of gRPC.

    All methods run on the scheduler's event loop.
    """

    def __init__(self) -> None:
        self._executors: dict[ModelKey, ModelExecutor] = {}

    async def load(self, key: ModelKey, config: ModelConfig, version_dir: Path) -> None:
        """Creates and loads the instances of a model version; raises if any fails.

        Loading a version that is already loaded replaces it: the new instances
        take over once loaded, and the old ones finish their queue, then unload.
        """
        devices = place_instances(config.instance_group, key.name)
        instances = [
            InlineInstance(f"{key.name}_{key.version}_{i}", config, version_dir, device)
            for i, device in enumerate(devices)
        ]
        executor = ModelExecutor(key, instances)
        await executor.start()
        old, self._executors[key] = self._executors.get(key), executor
        if old is not None:
            await old.stop()
        log.info(
            "%s: %d instance(s) on %s",
            key,
            len(devices),
            ", ".join(sorted({str(d) for d in devices})),
        )

    async def unload(self, key: ModelKey) -> None:
        """Finishes the version's queued requests, then unloads its instances."""
        executor = self._executors.get(key)
        if executor is not None:
            await executor.stop()
            del self._executors[key]

    async def submit(self, request: InferenceRequest) -> InferenceResponse:
        """Queues a request and waits for its response (or its error)."""
        executor = self._executors.get(request.model)
        if executor is None:
            raise ModelNotReady(
                f"model '{request.model.name}' version {request.model.version} is not loaded"
            )
        return await executor.submit(request)

    def statistics(self, key: ModelKey) -> ModelStatistics:
        """A snapshot of the version's statistics (zeros if it was never loaded)."""
        executor = self._executors.get(key)
        return executor.statistics.snapshot() if executor else ModelStatistics()
