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
