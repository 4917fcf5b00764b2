"""The scheduler through a real server: batching, priorities, queue policies, deadlines,
cancellation, worker crashes and restarts, device environment, shared-memory hygiene."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, leaked_arenas
from models import value_input, write_repository
from tiffin.backends import Device
from tiffin.protos.model_config import ModelConfig
from tiffin.scheduler import InferenceRequest, ModelKey
from tiffin.scheduler.instance import WorkerInstance


def toy_config(
    backend: str,
    max_batch_size: int = 8,
    batching: str = "",
    kind: str = "cpu",
    count: int = 1,
    extra_outputs: str = "",
) -> str:
    return f"""
backend: toy_backends:{backend}
max_batch_size: {max_batch_size}
inputs: [{{name: INPUT0, datatype: FP32, dims: [1]}}]
outputs: [{{name: OUTPUT0, datatype: FP32, dims: [1]}}{extra_outputs}]
instance_group: [{{kind: {kind}, count: {count}}}]
{batching}
"""


def toy_repo(tmp_path: Path, **models: str) -> Path:
    return write_repository(tmp_path / "models", models)


def call_in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = fn(*args, **kwargs)
        except InferenceServerException as exc:
            outcome["error"] = exc
        outcome["done_at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def stats(client: tc.InferenceServerClient, model: str):
    return client.get_inference_statistics(model, "1").model_stats[0]


def test_concurrent_requests_form_batches_and_get_their_own_rows(make_server, tmp_path):
    repo = toy_repo(
        tmp_path,
        slow=toy_config("Slow", batching="dynamic_batching: {max_queue_delay_microseconds: 20000}"),
    )
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    blocker, _ = call_in_thread(client.infer, "slow", [value_input(0.4)])
    time.sleep(0.1)  # the blocker is running; the next requests queue up behind it
    calls = [
        call_in_thread(client.infer, "slow", [value_input(0.001 * (i + 1), 0.5 + i)])
        for i in range(6)
    ]
    for thread, _ in calls:
        thread.join(30)
    blocker.join(30)
    for i, (_, outcome) in enumerate(calls):
        got = outcome["result"].as_numpy("OUTPUT0").reshape(-1)
        np.testing.assert_array_equal(got, np.array([0.001 * (i + 1), 0.5 + i], np.float32))
    sizes = {b.batch_size: b.compute_infer.count for b in stats(client, "slow").batch_stats}
    assert max(sizes) > 2, sizes  # several 2-row requests ran as one batch
    assert stats(client, "slow").inference_count == 13


def test_priorities_order_service(make_server, tmp_path):
    batching = "dynamic_batching: {priority_levels: 2, default_priority_level: 2}"
    server = make_server(toy_repo(tmp_path, slow=toy_config("Slow", 1, batching)))
    client = tc.InferenceServerClient(server.url)
    blocker, _ = call_in_thread(client.infer, "slow", [value_input(0.5)])
    time.sleep(0.15)
    low, low_out = call_in_thread(client.infer, "slow", [value_input(0.01)], priority=2)
    time.sleep(0.05)
    high, high_out = call_in_thread(client.infer, "slow", [value_input(0.01)], priority=1)
    for thread in (blocker, low, high):
        thread.join(30)
    assert "result" in high_out and "result" in low_out
    assert high_out["done_at"] < low_out["done_at"]


def test_queue_full_is_resource_exhausted(make_server, tmp_path):
    batching = "dynamic_batching: {default_queue_policy: {max_queue_size: 1}}"
    server = make_server(toy_repo(tmp_path, slow=toy_config("Slow", 1, batching)))
    client = tc.InferenceServerClient(server.url)
    blocker, _ = call_in_thread(client.infer, "slow", [value_input(0.6)])
    time.sleep(0.15)
    waiting, waiting_out = call_in_thread(client.infer, "slow", [value_input(0.0)])
    time.sleep(0.1)
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        client.infer("slow", [value_input(0.0)])
    assert time.monotonic() - start < 0.3  # refused at once, not after waiting
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "maximum queue size" in info.value.message()
    blocker.join(30)
    waiting.join(30)
    assert "result" in waiting_out


def test_queue_timeout_rejects_with_unavailable(make_server, tmp_path):
    batching = (
        "dynamic_batching: {default_queue_policy: "
        "{default_timeout_microseconds: 100000, timeout_action: REJECT}}"
    )
    server = make_server(toy_repo(tmp_path, slow=toy_config("Slow", 1, batching)))
    client = tc.InferenceServerClient(server.url)
    blocker, _ = call_in_thread(client.infer, "slow", [value_input(0.8)])
    time.sleep(0.15)
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        client.infer("slow", [value_input(0.0)])
    assert time.monotonic() - start < 0.6  # rejected while the blocker still runs
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "Request timeout expired" in info.value.message()
    blocker.join(30)


def test_expired_deadline_is_dropped_and_never_computed(make_server, tmp_path):
    server = make_server(toy_repo(tmp_path, slow=toy_config("Slow", 1)))
    client = tc.InferenceServerClient(server.url)
    blocker, _ = call_in_thread(client.infer, "slow", [value_input(0.6)])
    time.sleep(0.15)
    with pytest.raises(InferenceServerException) as info:
        client.infer("slow", [value_input(0.0)], client_timeout=0.1)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    blocker.join(30)
    time.sleep(0.2)
    assert stats(client, "slow").execution_count == 1  # only the blocker ran


def test_cancelled_call_is_removed_from_the_queue(make_server, tmp_path):
    server = make_server(toy_repo(tmp_path, slow=toy_config("Slow", 1)))
    client = tc.InferenceServerClient(server.url)
    blocker, _ = call_in_thread(client.infer, "slow", [value_input(0.6)])
    time.sleep(0.15)
    context = client.async_infer("slow", [value_input(0.0)], lambda result, error: None)
    time.sleep(0.1)
    context.cancel()
    blocker.join(30)
    time.sleep(0.3)
    assert stats(client, "slow").execution_count == 1  # the cancelled request never ran


def _workers_of(pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(pid), "-f", "spawn_main"], capture_output=True, text=True
    )
    return [int(p) for p in out.stdout.split()]


def test_killed_worker_fails_its_request_then_is_replaced(make_server, tmp_path):
    server = make_server(toy_repo(tmp_path, slow=toy_config("Slow", 1)))
    client = tc.InferenceServerClient(server.url)
    (worker,) = _workers_of(server.proc.pid)
    call, outcome = call_in_thread(client.infer, "slow", [value_input(5.0)], client_timeout=30)
    time.sleep(0.3)
    killed_at = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    call.join(30)
    assert outcome["done_at"] - killed_at < 1.0
    error = outcome["error"]
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert "slow_1_0" in error.message() and "exited" in error.message()
    deadline = time.monotonic() + 30
    while True:  # a new worker takes over; requests sent meanwhile wait for it
        try:
            result = client.infer("slow", [value_input(0.0)], client_timeout=10)
            break
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.UNAVAILABLE", exc
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert result.as_numpy("OUTPUT0").shape == (1, 1)
    assert _workers_of(server.proc.pid) not in ([], [worker])


def test_backend_exception_fails_only_the_bad_request(make_server, tmp_path):
    batching = "dynamic_batching: {max_queue_delay_microseconds: 500000}"
    server = make_server(toy_repo(tmp_path, fail=toy_config("Fail", 8, batching)))
    client = tc.InferenceServerClient(server.url)
    good, good_out = call_in_thread(client.infer, "fail", [value_input(1.0)])
    bad, bad_out = call_in_thread(client.infer, "fail", [value_input(-1.0)])
    good.join(30)
    bad.join(30)
    assert good_out["result"].as_numpy("OUTPUT0").reshape(-1).tolist() == [1.0]
    assert bad_out["error"].status() == "StatusCode.INTERNAL"
    assert "negative input is not allowed" in bad_out["error"].message()
    # They were batched: the backend saw both rows at once, then each request alone (the
    # fallback for a backend that fails a whole batch).
    calls = (tmp_path / "models" / "fail" / "1" / "calls.log").read_text().split()
    assert calls == ["2", "1", "1"], calls
    assert client.infer("fail", [value_input(2.0)]).as_numpy("OUTPUT0").tolist() == [[2.0]]


ENV_OUTPUT = ", {name: ENV, datatype: BYTES, dims: [3]}"


@pytest.mark.parametrize("kind", ["cpu", "inline"])
def test_worker_environment_and_inline_instances(make_server, tmp_path, kind):
    server = make_server(
        toy_repo(tmp_path, env=toy_config("Env", kind=kind, extra_outputs=ENV_OUTPUT))
    )
    client = tc.InferenceServerClient(server.url)
    visible, device, pid = client.infer("env", [value_input(1.0)]).as_numpy("ENV")[0]
    assert device == b"cpu"
    group = client.get_model_config("env").config.instance_group[0]
    assert group.kind == tc.model_config_pb2.ModelInstanceGroup.KIND_CPU  # Triton has no inline
    if kind == "cpu":
        assert visible == b"" and int(pid) != server.proc.pid  # its own process, no GPUs
    else:
        assert int(pid) == server.proc.pid  # inline: inside the server process


def test_gpu_worker_gets_its_device_in_cuda_visible_devices(tmp_path):
    """A worker for GPU 1 sees only that GPU, as its device 0 (no GPU needed to check)."""
    (tmp_path / "1").mkdir()
    config = ModelConfig.model_validate(
        {
            "name": "env",
            "backend": "toy_backends:Env",
            "max_batch_size": 8,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [1]}],
            "outputs": [
                {"name": "OUTPUT0", "datatype": "FP32", "dims": [1]},
                {"name": "ENV", "datatype": "BYTES", "dims": [3]},
            ],
        }
    )

    async def main():
        instance = WorkerInstance("env_1_0", config, tmp_path / "1", Device("gpu", 1), 1 << 20)
        await instance.load()
        try:
            request = InferenceRequest(
                ModelKey("env", 1), {"INPUT0": np.ones((1, 1), np.float32)}, ["ENV"]
            )
            execution = await instance.execute([request], ["OUTPUT0", "ENV"])
            return instance.worker_info, list(execution.outputs["ENV"][0])
        finally:
            await instance.unload()

    info, (visible, device, pid) = asyncio.run(main())
    assert info["environment"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert visible == b"1" and device == b"gpu:0" and int(pid) == info["pid"]


@pytest.mark.gpu
def test_onnx_model_on_gpu(make_server, example_repo_copy):
    if not Path("/proc/driver/nvidia/gpus").is_dir():
        pytest.skip("no CUDA device on this machine")
    config = example_repo_copy / "classifier" / "config.yaml"
    config.write_text(config.read_text().replace("kind: inline", "kind: gpu"))
    server = make_server(example_repo_copy)
    client = tc.InferenceServerClient(server.url)
    x = np.ones((2, 4), np.float32)
    tensor = tc.InferInput("features", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    assert client.infer("classifier", [tensor]).as_numpy("probabilities").shape == (2, 3)
    assert "gpu:0" in server.log()


def test_gpu_instance_without_a_gpu_fails_the_load_clearly(make_server, example_repo_copy):
    if Path("/proc/driver/nvidia/gpus").is_dir():
        pytest.skip("this machine has a GPU")
    config = example_repo_copy / "add_sub" / "config.yaml"
    config.write_text(config.read_text().replace("kind: inline", "kind: gpu"))
    server = make_server(example_repo_copy)
    index = {
        m.name: m for m in tc.InferenceServerClient(server.url).get_model_repository_index().models
    }
    assert index["add_sub"].state == "UNAVAILABLE"
    assert "asks for GPU" in index["add_sub"].reason and "none" in index["add_sub"].reason
    assert index["classifier"].state == "READY"


def test_unload_lets_queued_and_running_requests_finish(make_server, tmp_path):
    server = make_server(toy_repo(tmp_path, slow=toy_config("Slow", 1)))
    client = tc.InferenceServerClient(server.url)
    first, first_out = call_in_thread(client.infer, "slow", [value_input(0.5)])
    time.sleep(0.1)
    second, second_out = call_in_thread(client.infer, "slow", [value_input(0.1)])
    time.sleep(0.1)
    client.unload_model("slow")
    first.join(30)
    second.join(30)
    assert "result" in first_out and "result" in second_out
    with pytest.raises(InferenceServerException) as info:
        client.infer("slow", [value_input(0.0)])
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_arenas_of_a_killed_server_are_removed_by_the_next_one(tmp_path):
    repo = toy_repo(tmp_path, echo=toy_config("Echo"))
    first = ServerProcess(repo)
    try:
        mine = [p for p in os.listdir("/dev/shm") if p.startswith(f"tiffin_{first.proc.pid}_")]
        assert mine, "a worker instance should own an arena"
    finally:
        first.proc.kill()
        first.proc.wait(10)
    assert set(mine) <= set(leaked_arenas())
    second = ServerProcess(repo)
    try:
        assert not set(mine) & set(os.listdir("/dev/shm"))
        assert "left by a server that died" in second.log()
    finally:
        second.stop()


def test_tensors_larger_than_the_arena_take_the_inline_path(tmp_path):
    """Inputs and outputs that do not fit the arena travel in the pipe message instead."""
    (tmp_path / "1").mkdir()
    config = ModelConfig.model_validate(
        {
            "name": "echo",
            "backend": "toy_backends:Echo",
            "max_batch_size": 8,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        }
    )
    rows = [
        np.arange(i * 10_000, (i + 1) * 10_000, dtype=np.float32).reshape(1, -1) for i in range(3)
    ]  # 40 KB each; the arena holds 4 KB

    async def main():
        instance = WorkerInstance("echo_1_0", config, tmp_path / "1", Device("cpu"), 4096)
        await instance.load()
        try:
            requests = [
                InferenceRequest(ModelKey("echo", 1), {"INPUT0": r}, ["OUTPUT0"]) for r in rows
            ]
            execution = await instance.execute(requests, ["OUTPUT0"])
            return np.array(execution.outputs["OUTPUT0"])
        finally:
            await instance.unload()

    np.testing.assert_array_equal(asyncio.run(main()), np.concatenate(rows))
