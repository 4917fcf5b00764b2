"""Inline instances run in the server process, on threads of their own: a model that loads or
runs slowly never stalls the others."""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml

from models import value_input, write_repository
from tiffin.protos.errors import TiffinError
from tiffin.protos.model_config import ModelConfig
from tiffin.scheduler import InferenceRequest, ModelKey, Pending, Scheduler

KEY = ModelKey("toy", 1)


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


class LoopThread:
    """An event loop on a thread of its own, as the server runs its scheduler's."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def started_executor(loop: LoopThread, config_text: str, folder):
    """An executor for a toy model, started on `loop` (no server, no sockets)."""
    config = ModelConfig.model_validate(yaml.safe_load(config_text))

    async def create():
        executor = Scheduler(None, None).create_executor(KEY, config, folder)  # type: ignore[arg-type]
        await executor.start()
        return executor

    return loop.run(create())


def value_request(value: float, deadline: float | None = None) -> InferenceRequest:
    return InferenceRequest(
        KEY, {"INPUT0": np.array([[value]], np.float32)}, ["OUTPUT0"], deadline=deadline
    )


def test_requests_for_an_inline_model_are_answered_while_the_event_loop_is_held(tmp_path):
    """A front-door thread queues a request itself and an inline instance's thread answers
    it: neither waits for the scheduler's event loop, held here for 1.5 s (as a slow
    callback on it would). Before, each request went through the loop both ways."""
    loop = LoopThread()
    executor = started_executor(loop, toy("Echo", "dynamic_batching: {}\n"), tmp_path)
    try:
        held = threading.Event()
        loop.loop.call_soon_threadsafe(lambda: (held.set(), time.sleep(1.5)))
        assert held.wait(5)
        start = time.monotonic()
        answers = []
        for value in (1.0, 2.0, 3.0):
            pending = Pending(value_request(value))
            executor.submit(pending)
            answers.append(pending.wait().outputs["OUTPUT0"].tolist())
        assert answers == [[[1.0]], [[2.0]], [[3.0]]]
        assert time.monotonic() - start < 0.5  # the loop is still held
    finally:
        loop.run(executor.stop())
        loop.close()


def test_every_request_ends_under_load_with_deadlines_timeouts_and_cancels(tmp_path):
    """16 threads send requests for 2 s to an inline model that sleeps up to 2 ms a batch,
    with a 5 ms queue timeout: a third with a 3 ms deadline, a fifth cancelled at once.
    Each request ends (none is left waiting) with its answer or a defined error, and the
    queue and the requests in flight come back to zero."""
    loop = LoopThread()
    executor = started_executor(
        loop,
        toy(
            "Slow",
            "dynamic_batching: {default_queue_policy: "
            "{default_timeout_microseconds: 5000, timeout_action: REJECT}}\n",
        ),
        tmp_path,
    )
    outcomes: collections.Counter[str] = collections.Counter()
    left_waiting: list[Pending] = []
    lock = threading.Lock()
    stop = time.monotonic() + 2

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            deadline = time.monotonic() + 0.003 if rng.random() < 0.33 else None
            pending = Pending(value_request(rng.uniform(0, 0.002), deadline))
            try:
                executor.submit(pending)
            except TiffinError as exc:  # refused at once (admission): also an ending
                with lock:
                    outcomes[type(exc).__name__] += 1
                continue
            if rng.random() < 0.2:
                pending.cancel()
            waited = time.monotonic() + 10
            while not pending.done() and time.monotonic() < waited:
                time.sleep(0.0005)
            if not pending.done():
                with lock:
                    left_waiting.append(pending)
                continue
            try:
                pending.wait()
                name = "OK"
            except TiffinError as exc:
                name = type(exc).__name__
            with lock:
                outcomes[name] += 1

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not left_waiting
        allowed = {"OK", "Cancelled", "DeadlineExceeded", "RequestTimeout", "Overloaded"}
        assert set(outcomes) <= allowed, outcomes
        assert outcomes["OK"] > 100 and outcomes["Cancelled"] > 0, outcomes
        live = executor.statistics.snapshot().live
        for _ in range(100):  # the serving thread closes its books just after answering
            if live.in_flight == 0:
                break
            time.sleep(0.01)
            live = executor.statistics.snapshot().live
        assert live.in_flight == 0 and sum(live.queue_depth.values()) == 0
    finally:
        loop.run(executor.stop())
        loop.close()
