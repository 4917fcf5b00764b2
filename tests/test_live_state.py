"""What a model version reports about itself for the metrics, in process and without sockets:
its queues, requests in flight and instances' busy time while a batch runs, and the compute
split of the batches it ran."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import yaml

from tiffin.protos.model_config import ModelConfig
from tiffin.scheduler import InferenceRequest, ModelKey, Scheduler
from tiffin.server.observability.process import sample

KEY = ModelKey("slow", 1)


def config(kind: str) -> ModelConfig:
    """The Slow toy backend (sleeps its batch's first value, in seconds), one instance."""
    return ModelConfig.model_validate(
        yaml.safe_load(
            f"""
name: slow
backend: toy_backends:Slow
max_batch_size: 8
inputs: [{{name: INPUT0, datatype: FP32, dims: [1]}}]
outputs: [{{name: OUTPUT0, datatype: FP32, dims: [1]}}]
dynamic_batching: {{priority_levels: 2}}
instance_group: [{{kind: {kind}}}]
"""
        )
    )


def request(seconds: float, priority: int = 0) -> InferenceRequest:
    return InferenceRequest(
        model=KEY,
        inputs={"INPUT0": np.array([[seconds]], np.float32)},
        outputs=["OUTPUT0"],
        parameters={"priority": priority} if priority else {},
    )


def unused(*args: object) -> object:
    raise AssertionError("no pipeline here")


async def _run(kind: str, tmp_path: Path) -> None:
    executor = Scheduler(unused, unused).create_executor(KEY, config(kind), tmp_path)  # type: ignore[arg-type]
    await executor.start()
    try:
        live = executor.statistics.snapshot().live
        assert live.in_flight == 0 and live.queue_depth == {1: 0, 2: 0}
        (instance,) = live.instances
        assert instance.name == "slow_1_0" and instance.busy_ns == 0 and instance.restarts == 0
        assert (instance.pid != 0) == (kind == "cpu")  # a worker has a process of its own
        if instance.pid:
            assert sample(instance.pid) is not None and instance.pid != os.getpid()

        slow = executor.enqueue(request(0.5))
        while True:  # until the slow batch has left the queue and runs
            live = executor.statistics.snapshot().live
            if live.in_flight == 1 and not any(live.queue_depth.values()):
                break
            await asyncio.sleep(0.01)
        behind = [executor.enqueue(request(0.0, p)) for p in (1, 2, 2)]
        live = executor.statistics.snapshot().live
        assert live.queue_depth == {1: 1, 2: 2} and live.in_flight == 4
        await asyncio.sleep(0.2)
        # The running batch counts as busy up to now, before it ends.
        assert executor.statistics.snapshot().live.instances[0].busy_ns >= 200_000_000
        await asyncio.gather(slow, *behind)

        stats = executor.statistics.snapshot()
        assert stats.live.in_flight == 0 and stats.live.queue_depth == {1: 0, 2: 0}
        assert 0.5e9 <= stats.live.instances[0].busy_ns < 5e9
        for stage in ("compute_input", "compute_infer", "compute_output"):
            assert sum(stats.compute[stage].counts) == 4, stage  # every request, once
        assert stats.compute["compute_infer"].total_ns >= 0.5e9
        assert stats.compute["compute_infer"].total_ns == stats.compute_infer.ns  # as Triton's
    finally:
        await executor.stop()


def test_worker_instance(tmp_path: Path) -> None:
    asyncio.run(_run("cpu", tmp_path))


def test_inline_instance(tmp_path: Path) -> None:
    asyncio.run(_run("inline", tmp_path))


def test_a_process_that_is_gone_has_no_sample() -> None:
    assert sample(2**22 + 12345) is None  # above Linux's largest pid
