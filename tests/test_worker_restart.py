"""A worker process that dies fails only the batch it was running: queued requests and
requests that arrive while it restarts wait for the new worker, and fail at once (never
hang) when it cannot start again."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from models import value_input, write_repository

INSTANCE = "crash_1_0"  # the one instance of model 'crash', version 1
CRASH = 666.0  # the toy backend kills its worker on this value


def crash_config(backend: str = "Crash", batching: str = "") -> str:
    return f"""
backend: toy_backends:{backend}
max_batch_size: 8
inputs: [{{name: INPUT0, datatype: FP32, dims: [1]}}]
outputs: [{{name: OUTPUT0, datatype: FP32, dims: [1]}}]
instance_group: [{{kind: cpu}}]
{batching}
"""


def serve(make_server, tmp_path: Path, config: str):
    """A server of the one model 'crash'; import-path toy backends must be allowed."""
    repo = write_repository(tmp_path / "models", {"crash": config})
    return make_server(repo, env={"TIFFIN_ALLOWED_BACKENDS": "toy_backends"})


def call(url: str, value: float, timeout: float = 15.0) -> tuple[str, str]:
    """One request; ("ok", "") if it came back with its own value, else (status, message)."""
    try:
        result = tc.InferenceServerClient(url).infer(
            "crash", [value_input(value)], client_timeout=timeout
        )
    except InferenceServerException as exc:
        return str(exc.status()), exc.message() or ""
    got = result.as_numpy("OUTPUT0").reshape(-1).tolist()
    return ("ok", "") if got == [value] else ("wrong", str(got))


def in_threads(url: str, values: list[float], timeout: float = 15.0) -> list[tuple[str, str]]:
    """Sends each value from its own thread at once; their outcomes, in order."""
    outcomes: list = [None] * len(values)

    def run(i: int) -> None:
        outcomes[i] = call(url, values[i], timeout)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(values))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    return outcomes


def ready_workers(server) -> int:
    """How many times a worker of the model became ready (the first start included)."""
    return server.log().count(f"instance {INSTANCE}: worker pid")


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("batching", ["", "dynamic_batching: {max_queue_delay_microseconds: 2000}"])
def test_under_load_only_the_killed_batch_fails(make_server, tmp_path, batching):
    server = serve(make_server, tmp_path, crash_config("Crash", batching))
    outcomes: list[tuple[str, str]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 4.0

    def load(thread: int) -> None:
        client = tc.InferenceServerClient(server.url)
        n = 0
        while time.monotonic() < stop_at:
            value = float(thread * 100_000 + n)
            n += 1
            try:
                result = client.infer("crash", [value_input(value)], client_timeout=15)
                got = result.as_numpy("OUTPUT0").reshape(-1).tolist()
                outcome = ("ok", "") if got == [value] else ("wrong", str(got))
            except InferenceServerException as exc:
                outcome = (str(exc.status()), exc.message() or "")
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    crashed = call(server.url, CRASH)
    for thread in threads:
        thread.join(30)
    failed = [o for o in outcomes if o[0] != "ok"]
    print(f"\n{len(outcomes)} requests under load, {len(failed)} failed: {failed[:3]}")
    assert crashed[0] == "StatusCode.UNAVAILABLE" and INSTANCE in crashed[1], crashed
    assert "exited" in crashed[1]
    assert ready_workers(server) == 2, server.log()  # the worker was restarted
    if batching:  # the requests batched with the crashing one died with it, no others
        assert len(failed) <= 7, failed
        for status, message in failed:
            assert status == "StatusCode.UNAVAILABLE" and INSTANCE in message, message
            assert "exited" in message
    else:  # each request is a batch of its own: only the crashing one fails
        assert failed == []
    assert len(outcomes) > 100


def test_requests_sent_while_the_worker_is_down_wait_for_the_restart(make_server, tmp_path):
    server = serve(make_server, tmp_path, crash_config())
    # Killed by a request: the next requests arrive while the worker restarts.
    status, message = call(server.url, CRASH)
    assert status == "StatusCode.UNAVAILABLE" and INSTANCE in message, message
    assert ready_workers(server) == 1  # not restarted yet
    assert in_threads(server.url, [1.0, 2.0, 3.0, 4.0]) == [("ok", "")] * 4
    assert ready_workers(server) == 2
    # Killed while idle, from outside: the next requests must not go to the dead worker.
    (worker,) = subprocess.run(
        ["pgrep", "-P", str(server.proc.pid), "-f", "spawn_main"], capture_output=True, text=True
    ).stdout.split()
    os.kill(int(worker), signal.SIGKILL)
    wait_for(lambda: server.log().count("restarting it") == 2, 10)
    assert ready_workers(server) == 2
    assert in_threads(server.url, [5.0, 6.0]) == [("ok", "")] * 2
    assert ready_workers(server) == 3


def test_a_worker_that_cannot_restart_fails_its_queue_at_once(make_server, tmp_path):
    server = serve(make_server, tmp_path, crash_config("CrashNoRestart"))
    marker = tmp_path / "models" / "crash" / "1" / "refuse-load"
    marker.touch()  # the worker runs; it will not start again
    status, message = call(server.url, CRASH)
    assert status == "StatusCode.UNAVAILABLE" and INSTANCE in message, message
    # Queued while the worker restarts: failed as soon as the restart fails, not hung.
    started = time.monotonic()
    outcomes = in_threads(server.url, [1.0, 2.0, 3.0], timeout=15)
    assert time.monotonic() - started < 15  # the restart attempt's time, not the timeout
    for status, message in outcomes:
        assert status == "StatusCode.UNAVAILABLE", (status, message)
        assert INSTANCE in message and "could not restart" in message, message
        assert "refuse-load marker present" in message, message
    # While it stays down, new requests are refused at once with the same reason.
    started = time.monotonic()
    status, message = call(server.url, 1.0)
    assert time.monotonic() - started < 2
    assert status == "StatusCode.UNAVAILABLE" and "refuse-load marker present" in message
    # The backoff keeps retrying: once the worker can start, the model serves again.
    marker.unlink()
    wait_for(lambda: call(server.url, 7.0, timeout=5) == ("ok", ""), 15)


def test_unloading_while_the_worker_is_down_fails_the_queue(make_server, tmp_path):
    server = serve(make_server, tmp_path, crash_config())
    status, _ = call(server.url, CRASH)
    assert status == "StatusCode.UNAVAILABLE"
    outcomes: list = []
    waiting = threading.Thread(
        target=lambda: outcomes.extend(in_threads(server.url, [1.0, 2.0], timeout=15))
    )
    waiting.start()
    time.sleep(0.1)  # queued, the worker still restarting
    started = time.monotonic()
    tc.InferenceServerClient(server.url).unload_model("crash")
    waiting.join(20)
    assert time.monotonic() - started < 5
    assert len(outcomes) == 2
    for status, message in outcomes:  # failed, never left waiting
        assert status == "StatusCode.UNAVAILABLE" and "unloading" in message, (status, message)
    assert server.stop() == 0, server.log()
