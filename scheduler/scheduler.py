"""The scheduler's one interface: the executor that serves a model version."""

from __future__ import annotations

import logging
from pathlib import Path

from tiffin.backends import Device, ForwardingBackend, get_backend
from tiffin.protos.datatypes import DATATYPES
from tiffin.protos.model_config import ModelConfig
from tiffin.protos.tensors import element_count

from .arena import align
from .devices import place_instances
from .drift import DriftMonitor
from .executor import Executor, ModelExecutor
from .forwarding import ForwardingExecutor
from .instance import InlineInstance, Instance, WorkerInstance
from .instance_choice import InstanceChooser
from .pipeline import Enqueue, PipelineExecutor, Resolve
from .request import ModelKey

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
    """Makes the executor a model version's config asks for. Knows nothing of gRPC, and
    keeps no record of what serves: that is the server's model registry.

    `resolve` and `enqueue` are the registry's, for pipelines, whose steps are requests
    to other models.
    """

    def __init__(self, resolve: Resolve, enqueue: Enqueue) -> None:
        self._resolve = resolve
        self._enqueue = enqueue

    def create_executor(self, key: ModelKey, config: ModelConfig, version_dir: Path) -> Executor:
        """The executor kind a config asks for (not started): a pipeline, forwarding, or
        batching instances. Raises ValueError when its instances cannot be placed."""
        if config.pipeline is not None:
            return PipelineExecutor(key, config, self._resolve, self._enqueue)
        backend = get_backend(config.backend)
        if issubclass(backend, ForwardingBackend):
            return ForwardingExecutor(key, config, version_dir, backend)
        placements = place_instances(config.instance_group, key.name)
        size = arena_bytes(config)
        instances: list[Instance] = []
        # The model folder holds the version folders and the drift reference.
        monitor = DriftMonitor(key, config, version_dir.parent) if config.monitoring else None

        def inline(name: str, device: Device) -> Instance:
            return InlineInstance(name, config, version_dir, device)

        names = [f"{key.name}_{key.version}_{i}" for i in range(len(placements))]
        measured = [
            name
            for name, (_, runs) in zip(names, placements, strict=True)
            if runs == "measured" and backend.may_run_inline
        ]
        chooser = InstanceChooser(key, config, measured, inline) if measured else None
        executor = ModelExecutor(key, config, instances, monitor, chooser)
        for name, (device, runs) in zip(names, placements, strict=True):
            instances.append(
                inline(name, device)
                if runs == "inline"
                else WorkerInstance(
                    name, config, version_dir, device, size, on_change=executor.instances_changed
                )
            )
        kinds = sorted(
            {("inline" if isinstance(i, InlineInstance) else str(i.device)) for i in instances}
        )
        chosen = " (worker or inline, as timing at load decides)" if measured else ""
        log.info("%s: %d instance(s) on %s%s", key, len(instances), ", ".join(kinds), chosen)
        return executor
