"""Inline instances run in the server process, on threads of their own: a model that loads or
runs slowly never stalls the others."""

from __future__ import annotations

import threading
import time

import pytest
import tritonclient.grpc as tc

from models import value_input, write_repository


def toy(backend: str, extra: str = "") -> str:
    return (
        f"backend: toy_backends:{backend}\nmax_batch_size: 8\ninstance_group: [{{kind: inline}}]\n"
        "inputs: [{name: INPUT0, datatype: FP32, dims: [1]}]\n"
        "outputs: [{name: OUTPUT0, datatype: FP32, dims: [1]}]\n" + extra
    )


@pytest.fixture
def server(make_server, tmp_path):
    repo = write_repository(
        tmp_path,
        {
            "echo": toy("Echo"),
            "slow": toy("Slow"),
            "slowload": toy("SlowLoad", "parameters: {load_seconds: 2}\n"),
        },
    )
    return make_server(repo)


def slowest_echo_while(server, busy: threading.Thread) -> float:
    """The slowest of the echo calls made while `busy` runs (at least one)."""
    client = tc.InferenceServerClient(server.url)
    busy.start()
    time.sleep(0.2)  # the slow work has begun
    slowest = 0.0
    while True:
        start = time.monotonic()
        assert client.infer("echo", [value_input(7.0)]).as_numpy("OUTPUT0").tolist() == [[7.0]]
        slowest = max(slowest, time.monotonic() - start)
        if not busy.is_alive():
            return slowest
        time.sleep(0.05)


def test_an_unrelated_model_answers_while_an_inline_model_runs_a_slow_batch(server):
    client = tc.InferenceServerClient(server.url)
    busy = threading.Thread(target=lambda: client.infer("slow", [value_input(1.5)]))
    assert slowest_echo_while(server, busy) < 0.5  # it waited the whole 1.5 s before


def test_an_unrelated_model_answers_while_an_inline_model_loads(server):
    client = tc.InferenceServerClient(server.url)
    busy = threading.Thread(target=lambda: client.load_model("slowload"))
    assert slowest_echo_while(server, busy) < 0.5  # it waited the whole 2 s before
    assert client.is_model_ready("slowload")


def test_requests_for_an_inline_model_are_answered_while_the_event_loop_is_held(tmp_path):
    """A front-door thread queues a request itself and an inline instance's thread answers
    it: neither waits for the scheduler's event loop, held here for 1.5 s (as a slow
    callback on it would). Before, each request went through the loop both ways."""
    import asyncio

    import numpy as np
    import yaml

    from tiffin.protos.model_config import ModelConfig
    from tiffin.scheduler import InferenceRequest, ModelKey, Pending, Scheduler

    key = ModelKey("echo", 1)
    config = ModelConfig.model_validate(yaml.safe_load(toy("Echo", "dynamic_batching: {}\n")))
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()

    def on_loop(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)

    async def create():
        executor = Scheduler(None, None).create_executor(key, config, tmp_path)  # type: ignore[arg-type]
        await executor.start()
        return executor

    executor = on_loop(create())
    try:
        held = threading.Event()
        loop.call_soon_threadsafe(lambda: (held.set(), time.sleep(1.5)))
        assert held.wait(5)
        start = time.monotonic()
        answers = []
        for value in (1.0, 2.0, 3.0):
            pending = Pending(
                InferenceRequest(key, {"INPUT0": np.array([[value]], np.float32)}, ["OUTPUT0"])
            )
            executor.submit(pending)
            answers.append(pending.wait().outputs["OUTPUT0"].tolist())
        assert answers == [[[1.0]], [[2.0]], [[3.0]]]
        assert time.monotonic() - start < 0.5  # the loop is still held
    finally:
        on_loop(executor.stop())
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(5)
        loop.close()
