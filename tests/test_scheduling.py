"""The scheduler through a real server: batching, priorities, queue policies, deadlines,
cancellation, worker crashes and restarts, device environment, shared-memory hygiene."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import tritonclient.grpc as tc
from toy_backends import Gate
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, leaked_arenas
from models import value_input, write_repository
from tiffin.backends import Device
from tiffin.protos.model_config import ModelConfig
from tiffin.scheduler import InferenceRequest, ModelKey
from tiffin.scheduler.instance import WorkerInstance

T = TypeVar("T")


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


def wait_for(predicate: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Polls `predicate` every 10 ms until it returns something true, and returns that;
    fails naming `what` after `timeout` seconds (generous: only a failing test waits it)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)  # a poll interval, not a guess at how long anything takes
    return value


def stats(client: tc.InferenceServerClient, model: str):
    return client.get_inference_statistics(model, "1").model_stats[0]


# A request holding HOLD keeps its batch running until the test calls release().
HOLD = Gate.HOLD
# An inline model that `queue_on_stream` sends its probe to.
PROBE = toy_config("Echo", kind="inline")


@pytest.fixture(autouse=True)
def release_gates(make_server, tmp_path) -> Iterator[None]:
    """Releases every Gate after the test, before its servers stop: a test that failed
    while a batch was held would otherwise leave a server that cannot stop."""
    yield
    for log in (tmp_path / "models").glob("*/1/batches.log"):
        (log.parent / "release").touch()


def batches(repo: Path, model: str) -> list[list[float]]:
    """The batches a Gate model has started, in order, by their values."""
    log = repo / model / "1" / "batches.log"
    lines = log.read_text().split("\n")[:-1] if log.exists() else []  # whole lines only
    return [[float(v) for v in line.split()] for line in lines]


def release(repo: Path, model: str) -> None:
    """Lets a Gate model's held batch (and any later one holding HOLD) finish."""
    (repo / model / "1" / "release").touch()


def hold(client: tc.InferenceServerClient, repo: Path, model: str) -> threading.Thread:
    """Sends a request that occupies the model's instance until release(), and returns
    once its batch has started."""
    thread, _ = call_in_thread(client.infer, model, [value_input(HOLD)])
    wait_for(lambda: batches(repo, model), f"the held batch of '{model}' to start")
    return thread


def queue_on_stream(
    client: tc.InferenceServerClient, model: str, *requests: dict
) -> queue.SimpleQueue:
    """Sends `requests` (async_stream_infer's arguments) to `model` on a new stream, then a
    request to the model "probe", and returns once the probe has run; the (result, error)
    of each arrive in the queue returned, in request order.

    When the probe has run, the requests before it are queued: a queued request cannot be
    seen from outside, but the server starts the requests of a stream one after another
    and hands requests to the scheduler first come, first served."""
    answers: queue.SimpleQueue = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    before = stats(client, "probe").execution_count
    for request in requests:
        client.async_stream_infer(model, **request)
    client.async_stream_infer("probe", [value_input(0.0)])
    wait_for(
        lambda: stats(client, "probe").execution_count > before,
        "the probe sent behind the requests to run",
    )
    return answers


def answered(answers: queue.SimpleQueue, count: int) -> list:
    """The next `count` results from a stream's queue of answers; fails on an error."""
    results = []
    for _ in range(count):
        result, error = answers.get(timeout=30)
        assert error is None, error
        results.append(result)
    return results


def test_concurrent_requests_form_batches_and_get_their_own_rows(make_server, tmp_path):
    # A batch is cut when its 12 rows are there: the long delay only bounds how far apart
    # the six requests may arrive (a loaded machine), it is never waited for.
    batching = "dynamic_batching: {max_queue_delay_microseconds: 30000000}"
    server = make_server(toy_repo(tmp_path, slow=toy_config("Slow", 12, batching)))
    client = tc.InferenceServerClient(server.url)
    calls = [
        call_in_thread(client.infer, "slow", [value_input(0.001 * (i + 1), 0.5 + i)])
        for i in range(6)
    ]
    for thread, _ in calls:
        thread.join(60)
    for i, (_, outcome) in enumerate(calls):
        got = outcome["result"].as_numpy("OUTPUT0").reshape(-1)
        np.testing.assert_array_equal(got, np.array([0.001 * (i + 1), 0.5 + i], np.float32))
    sizes = {b.batch_size: b.compute_infer.count for b in stats(client, "slow").batch_stats}
    assert sizes == {12: 1}, sizes  # the six 2-row requests ran as one batch
    assert stats(client, "slow").inference_count == 12


def test_priorities_order_service(make_server, tmp_path):
    batching = "dynamic_batching: {priority_levels: 2, default_priority_level: 2}"
    repo = toy_repo(tmp_path, gate=toy_config("Gate", 1, batching), probe=PROBE)
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    blocker = hold(client, repo, "gate")
    # The low-priority request is queued first, the high-priority one behind it.
    answers = queue_on_stream(
        client,
        "gate",
        {"inputs": [value_input(2.0)], "priority": 2},
        {"inputs": [value_input(1.0)], "priority": 1},
    )
    release(repo, "gate")
    blocker.join(30)
    answered(answers, 3)
    client.stop_stream()
    assert batches(repo, "gate") == [[HOLD], [1.0], [2.0]]  # high ran before low


def test_queue_full_is_resource_exhausted(make_server, tmp_path):
    batching = "dynamic_batching: {default_queue_policy: {max_queue_size: 1}}"
    repo = toy_repo(tmp_path, gate=toy_config("Gate", 1, batching))
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    blocker = hold(client, repo, "gate")
    # Two requests for the one place in the queue: whichever comes second is refused.
    calls = [call_in_thread(client.infer, "gate", [value_input(v)]) for v in (1.0, 2.0)]
    wait_for(lambda: any("done_at" in out for _, out in calls), "a request to be refused")
    (_, refused), (waiting, waiting_out) = sorted(calls, key=lambda c: "done_at" not in c[1])
    assert refused["error"].status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "maximum queue size" in refused["error"].message()
    # Refused at once, not after waiting: the other still waits behind the held batch.
    assert waiting.is_alive() and not waiting_out
    release(repo, "gate")
    blocker.join(30)
    waiting.join(30)
    value = waiting_out["result"].as_numpy("OUTPUT0").item()
    assert batches(repo, "gate") == [[HOLD], [value]]


def test_queue_timeout_rejects_with_unavailable(make_server, tmp_path):
    batching = (
        "dynamic_batching: {default_queue_policy: "
        "{default_timeout_microseconds: 100000, timeout_action: REJECT}}"
    )
    repo = toy_repo(tmp_path, gate=toy_config("Gate", 1, batching))
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    blocker = hold(client, repo, "gate")
    with pytest.raises(InferenceServerException) as info:
        client.infer("gate", [value_input(1.0)])
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "Request timeout expired" in info.value.message()
    assert blocker.is_alive()  # rejected while the held batch still runs
    release(repo, "gate")
    blocker.join(30)
    assert batches(repo, "gate") == [[HOLD]]


def test_expired_deadline_is_dropped_and_never_computed(make_server, tmp_path):
    repo = toy_repo(tmp_path, gate=toy_config("Gate", 1))
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    blocker = hold(client, repo, "gate")
    with pytest.raises(InferenceServerException) as info:
        client.infer("gate", [value_input(1.0)], client_timeout=0.1)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    release(repo, "gate")
    blocker.join(30)
    # Requests run in arrival order: once a later one has run, the expired one never will.
    client.infer("gate", [value_input(2.0)])
    assert batches(repo, "gate") == [[HOLD], [2.0]]
    assert stats(client, "gate").execution_count == 2


def stream_opens(client: tc.InferenceServerClient) -> bool:
    """Whether a new stream of this client is let in and answers a probe; a server with
    --max-streams 1 refuses it while it still holds the client's previous stream."""
    answers: queue.SimpleQueue = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: answers.put(error))
    try:
        client.async_stream_infer("probe", [value_input(0.0)])
    except InferenceServerException:
        pass  # refused before the request went out; the callback has the reason
    error = answers.get(timeout=30)
    client.stop_stream()
    assert error is None or "streams open" in str(error), error
    return error is None


def test_cancelled_call_is_removed_from_the_queue(make_server, tmp_path):
    repo = toy_repo(tmp_path, gate=toy_config("Gate", 1), probe=PROBE)
    server = make_server(repo, "--max-streams", "1")
    client = tc.InferenceServerClient(server.url)
    blocker = hold(client, repo, "gate")
    queue_on_stream(client, "gate", {"inputs": [value_input(1.0)]})
    client.stop_stream(cancel_requests=True)
    # A cancellation is not acknowledged, but the server drops what a cancelled stream
    # queued before it lets the stream go, and only then (one stream at a time) a new one in.
    wait_for(lambda: stream_opens(client), "the server to close the cancelled stream")
    release(repo, "gate")
    blocker.join(30)
    # Requests run in arrival order: once a later one has run, the cancelled one never will.
    client.infer("gate", [value_input(2.0)])
    assert batches(repo, "gate") == [[HOLD], [2.0]]
    assert stats(client, "gate").execution_count == 2


def _workers_of(pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(pid), "-f", "spawn_main"], capture_output=True, text=True
    )
    return [int(p) for p in out.stdout.split()]


def test_killed_worker_fails_its_request_then_is_replaced(make_server, tmp_path):
    repo = toy_repo(tmp_path, gate=toy_config("Gate", 1))
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    (worker,) = _workers_of(server.proc.pid)
    call, outcome = call_in_thread(client.infer, "gate", [value_input(HOLD)], client_timeout=30)
    wait_for(lambda: batches(repo, "gate"), "the batch to start")  # never released
    killed_at = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    call.join(30)
    # The death is noticed, not waited out: far sooner than the client's 30 s (a generous
    # bound, for a loaded machine).
    assert outcome["done_at"] - killed_at < 10
    error = outcome["error"]
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert "gate_1_0" in error.message() and "exited" in error.message()

    def served() -> tc.InferResult | None:  # a new worker takes over; requests wait for it
        try:
            return client.infer("gate", [value_input(1.0)], client_timeout=10)
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.UNAVAILABLE", exc
            return None

    result = wait_for(served, "a new worker to serve")
    assert result.as_numpy("OUTPUT0").shape == (1, 1)
    assert _workers_of(server.proc.pid) not in ([], [worker])


def test_backend_exception_fails_only_the_bad_request(make_server, tmp_path):
    # A batch is cut when its 2 rows are there: the long delay only bounds how far apart the
    # two requests may arrive, it is never waited for.
    batching = "dynamic_batching: {max_queue_delay_microseconds: 30000000}"
    server = make_server(toy_repo(tmp_path, fail=toy_config("Fail", 2, batching)))
    client = tc.InferenceServerClient(server.url)
    good, good_out = call_in_thread(client.infer, "fail", [value_input(1.0)])
    bad, bad_out = call_in_thread(client.infer, "fail", [value_input(-1.0)])
    good.join(60)
    bad.join(60)
    assert good_out["result"].as_numpy("OUTPUT0").reshape(-1).tolist() == [1.0]
    assert bad_out["error"].status() == "StatusCode.INTERNAL"
    assert "negative input is not allowed" in bad_out["error"].message()
    # They were batched: the backend saw both rows at once, then each request alone (the
    # fallback for a backend that fails a whole batch). The model serves on (two rows, so
    # that this batch too is cut at once).
    after = client.infer("fail", [value_input(2.0, 3.0)]).as_numpy("OUTPUT0")
    assert after.tolist() == [[2.0], [3.0]]
    calls = (tmp_path / "models" / "fail" / "1" / "calls.log").read_text().split()
    assert calls == ["2", "1", "1", "2"], calls


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


def test_gpu_instance_without_a_gpu_fails_the_load_clearly(make_server, example_onnx_copy):
    if Path("/proc/driver/nvidia/gpus").is_dir():
        pytest.skip("this machine has a GPU")
    config = example_onnx_copy / "add_sub" / "config.yaml"
    config.write_text(config.read_text().replace("kind: inline", "kind: gpu"))
    server = make_server(example_onnx_copy)
    index = {
        m.name: m for m in tc.InferenceServerClient(server.url).get_model_repository_index().models
    }
    assert index["add_sub"].state == "UNAVAILABLE"
    assert "asks for GPU" in index["add_sub"].reason and "none" in index["add_sub"].reason
    assert index["classifier"].state == "READY"


def test_unload_lets_queued_and_running_requests_finish(make_server, tmp_path):
    repo = toy_repo(tmp_path, gate=toy_config("Gate", 1), probe=PROBE)
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    first, first_out = call_in_thread(client.infer, "gate", [value_input(HOLD)])
    wait_for(lambda: batches(repo, "gate"), "the first request to run")
    answers = queue_on_stream(client, "gate", {"inputs": [value_input(1.0)]})
    unload, _ = call_in_thread(client.unload_model, "gate")  # returns once both finished

    def unloading() -> bool:
        index = {m.name: m.state for m in client.get_model_repository_index().models}
        return index["gate"] == "UNLOADING"

    wait_for(unloading, "the unload to begin")
    release(repo, "gate")
    unload.join(30)
    first.join(30)
    assert "result" in first_out
    second, _probe = answered(answers, 2)
    client.stop_stream()
    assert second.as_numpy("OUTPUT0").tolist() == [[1.0]]
    assert batches(repo, "gate") == [[HOLD], [1.0]]
    with pytest.raises(InferenceServerException) as info:
        client.infer("gate", [value_input(0.0)])
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
