"""Model instances: one loaded backend each, running one batch at a time."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tiffin.backends import Backend, Device, get_backend
from tiffin.protos.model_config import ModelConfig

log = logging.getLogger(__name__)


class InlineInstance:
    """Runs the backend inside the frontend process, on a thread of its own.

    The backend is loaded, run and unloaded on that one thread, so frameworks
    that keep per-thread state see a single thread.
    """

    def __init__(self, name: str, config: ModelConfig, version_dir: Path, device: Device) -> None:
        self.name = name
        self.device = device
        self._config = config
        self._version_dir = version_dir
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._backend: Backend | None = None

    async def load(self) -> None:
        backend = get_backend(self._config.backend)()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._thread, backend.load, self._config, self._version_dir, self.device
        )
        self._backend = backend
        log.debug("instance %s loaded on %s", self.name, self.device)

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str]
    ) -> dict[str, np.ndarray]:
        assert self._backend is not None, "infer() before load()"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._backend.infer, inputs, outputs)

    async def unload(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._thread, backend.unload)
        self._thread.shutdown(wait=False)
