"""Warm-up against real servers: a version answers its samples before it is READY, a failed
warm-up keeps it (or a reload of it) from traffic, and a new version found by poll mode under
load from 16 clients is warmed before it takes over, with no failed request."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from models import write_repository

MODEL = """\
backend: toy_backends:{backend}
max_batch_size: 8
inputs: [{{name: INPUT0, datatype: FP32, dims: [2]}}]
outputs: [{{name: OUTPUT0, datatype: FP32, dims: [2]}}]
instance_group: [{{kind: inline}}]
"""
ZEROS = """\
model_warmup:
  - {name: zeros, batch_size: 2, count: 3, inputs: {INPUT0: {zero_data: true}}}
"""
NEGATIVE = """\
model_warmup:
  - {name: negative, batch_size: 1, inputs: {INPUT0: {input_data_file: negative.bin}}}
"""


def one_input(value: float = 1.0) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.full((1, 2), value, np.float32))
    return [tensor]


def with_negative_file(model: Path) -> None:
    (model / "warmup").mkdir(exist_ok=True)
    (model / "warmup" / "negative.bin").write_bytes(np.full((1, 2), -1, np.float32).tobytes())


def index(client: grpcclient.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    return {
        (m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models
    }


def test_warm_up_runs_before_traffic(make_server, tmp_path: Path) -> None:
    repo = write_repository(
        tmp_path / "repo",
        {
            "gate": MODEL.format(backend="Gate") + ZEROS,
            "fail": MODEL.format(backend="Fail") + NEGATIVE,
        },
    )
    with_negative_file(repo / "fail")
    server = make_server(repo)
    client = grpcclient.InferenceServerClient(server.url)
    assert client.infer("gate", one_input(7.0)).as_numpy("OUTPUT0").tolist() == [[7.0, 7.0]]
    batches = (repo / "gate" / "1" / "batches.log").read_text().splitlines()
    assert batches == ["0 0 0 0"] * 3 + ["7 7"]
    assert "model 'gate' version 1 answered its 1 warm-up sample(s)" in server.log()
    state, reason = index(client)[("fail", "1")]
    assert state == "UNAVAILABLE"
    assert "warm-up sample 'negative' failed" in reason and "negative input" in reason
    assert not client.is_model_ready("fail")


def test_a_reload_whose_warm_up_fails_keeps_the_old_version(make_server, tmp_path: Path) -> None:
    repo = write_repository(tmp_path / "repo", {"m": MODEL.format(backend="Echo")})
    with_negative_file(repo / "m")
    server = make_server(repo)
    client = grpcclient.InferenceServerClient(server.url)
    failures: list[str] = []
    stop = threading.Event()

    def keep_calling() -> None:
        caller = grpcclient.InferenceServerClient(server.url)
        while not stop.is_set():
            try:
                caller.infer("m", one_input())
            except InferenceServerException as exc:
                failures.append(exc.message())

    thread = threading.Thread(target=keep_calling)
    thread.start()
    try:
        (repo / "m" / "config.yaml").write_text(MODEL.format(backend="Fail") + NEGATIVE)
        with pytest.raises(InferenceServerException) as failed:
            client.load_model("m")
        assert "warm-up sample 'negative' failed" in failed.value.message()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures[:3]
    state, reason = index(client)[("m", "1")]
    assert state == "READY" and reason.startswith("reload failed, still serving: warm-up")
    assert client.infer("m", one_input(2.0)).as_numpy("OUTPUT0").tolist() == [[2.0, 2.0]]


def test_a_new_version_is_warmed_before_it_takes_over(make_server, tmp_path: Path) -> None:
    repo = write_repository(tmp_path / "repo", {"gate": MODEL.format(backend="Gate") + ZEROS})
    server = make_server(
        repo,
        "--repository-poll-secs",
        "0.3",
        env={"TIFFIN_MODEL_CONTROL_MODE": "poll", "TIFFIN_LOAD_MODEL": ""},
    )
    served: dict[str, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def keep_calling() -> None:
        caller = grpcclient.InferenceServerClient(server.url)
        while not stop.is_set():
            try:
                result = caller.infer("gate", one_input())
                version = result.get_response().model_version
                with lock:
                    served[version] = served.get(version, 0) + 1
            except InferenceServerException as exc:
                failures.append(exc.message())

    threads = [threading.Thread(target=keep_calling) for _ in range(16)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        shutil.copytree(repo / "gate" / "1", tmp_path / "v2")
        (tmp_path / "v2" / "batches.log").unlink()
        shutil.move(tmp_path / "v2", repo / "gate" / "2")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and served.get("2", 0) < 50:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:3]
    assert served.get("1", 0) > 50 and served.get("2", 0) >= 50, served
    first = (repo / "gate" / "2" / "batches.log").read_text().splitlines()[:3]
    assert first == ["0 0 0 0"] * 3, "version 2 took traffic before its warm-up"


def test_validate_refuses_warm_up_that_does_not_fit(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = (
        MODEL.format(backend="Echo")
        + """\
model_warmup:
  - {name: wide, inputs: {INPUT0: {zero_data: true, dims: [3]}}}
  - {name: lost, inputs: {INPUT0: {input_data_file: nowhere.bin}}}
"""
    )
    repo = write_repository(tmp_path / "repo", {"m": bad})
    result = subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", "validate", str(repo)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TIFFIN_ALLOWED_BACKENDS": "toy_backends"},
    )
    assert result.returncode == 1
    assert (
        "model_warmup 'wide': input 'INPUT0' needs its dims fitting [2], not [3]" in result.stdout
    )
