"""What a model version reports about itself for the metrics, in process and without sockets:
its queues, requests in flight and instances' busy time while a batch runs, and the compute
split of the batches it ran."""

from __future__ import annotations

import asyncio
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from tiffin.backends import BatchResult
from tiffin.protos.model_config import ModelConfig
from tiffin.scheduler import InferenceRequest, ModelKey, Scheduler
from tiffin.scheduler.worker import split
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

        # An inline instance's thread answers a batch, then closes its books: give it that.
        for _ in range(100):
            stats = executor.statistics.snapshot()
            if stats.live.in_flight == 0:
                break
            await asyncio.sleep(0.01)
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


def test_a_backend_call_splits_into_its_copies_and_the_rest() -> None:
    assert split(BatchResult({}, input_ns=10, output_ns=5), 100) == (10, 85, 5)
    assert split(BatchResult({}), 100) == (0, 100, 0)  # nothing reported: all of it is infer
    assert split(BatchResult({}, input_ns=-3, output_ns=500), 100) == (0, 0, 500)  # clamped


def test_torch_reports_its_copies(tmp_path: Path) -> None:
    """The torch backend times moving tensors onto its device and back (on the CPU, making
    the tensors and the arrays), which the worker counts as compute input and output."""
    torch = pytest.importorskip("torch")
    from tiffin.backends import Device
    from tiffin.backends.torch import TorchBackend

    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    with warnings.catch_warnings():  # torchscript is deprecated; still one of the formats
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Double()), tmp_path / "model.pt")
    config = ModelConfig.model_validate(
        yaml.safe_load(
            """
name: double
backend: torch
max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: OUTPUT__0, datatype: FP32, dims: [4]}]
"""
        )
    )
    backend = TorchBackend()
    backend.load(config, tmp_path, Device("cpu"))
    result = backend.infer_batch({"x": np.ones((2, 4), np.float32)}, ["OUTPUT__0"], [2])
    np.testing.assert_array_equal(result.outputs["OUTPUT__0"], np.full((2, 4), 2, np.float32))
    assert result.input_ns > 0 and result.output_ns > 0
    single = backend.infer({"x": np.ones((1, 4), np.float32)}, ["OUTPUT__0"])  # infer as before
    np.testing.assert_array_equal(single["OUTPUT__0"], [[2, 2, 2, 2]])
