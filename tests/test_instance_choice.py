"""`kind: auto` without a GPU: a worker or inline, chosen by timing the model at load.

The rule is checked alone (scheduler/instance_choice.py), then against a real server: a
small ONNX model runs inline (no worker process is left, ModelConfig and the log say why), a
model whose batch computes for tens of milliseconds keeps its worker, and a python model,
whose code holds the GIL and may crash, is never measured.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto, helper, numpy_helper

from models import _save, identity, write_model
from tiffin.protos.model_config import ModelConfig
from tiffin.scheduler import instance_choice
from tiffin.scheduler.arena import SHM_DIR
from tiffin.scheduler.instance_choice import (
    CHOICE_NOTE,
    HAND_OFF_SHARE,
    InstanceChooser,
    decide,
    time_worker,
    timing_request,
)
from tiffin.scheduler.request import ModelKey

ONNX_AUTO = "backend: onnxruntime\nmax_batch_size: 8\ndynamic_batching: {}\n"


def test_the_rule_keeps_a_worker_only_where_its_hand_off_is_noise() -> None:
    small = decide(hand_off_ns=150_000, call_ns=250_000)
    assert small.inline
    assert "0.150 ms" in small.reason and "60%" in small.reason and "0.250 ms" in small.reason
    large = decide(hand_off_ns=200_000, call_ns=50_000_000)  # 0.4%
    assert not large.inline
    assert large.reason.startswith("worker processes:") and "0.200 ms" in large.reason
    edge = 1_000_000
    assert decide(edge * HAND_OFF_SHARE, edge).inline
    assert not decide(edge * HAND_OFF_SHARE * 0.9, edge).inline


def test_the_timing_request_fits_the_config() -> None:
    config = ModelConfig.model_validate(
        {
            "name": "m",
            "backend": "onnxruntime",
            "max_batch_size": 4,
            "inputs": [
                {"name": "A", "datatype": "FP16", "dims": [-1, 3]},
                {"name": "B", "datatype": "BYTES", "dims": [2]},
                {"name": "C", "datatype": "INT64", "dims": [1], "optional": True},
            ],
            "outputs": [{"name": "Y", "datatype": "FP32", "dims": [1]}],
        }
    )
    request = timing_request(ModelKey("m", 1), config)
    assert set(request.inputs) == {"A", "B"}  # an optional input is left out
    assert request.inputs["A"].shape == (1, 1, 3) and request.inputs["A"].dtype == np.float16
    assert not request.inputs["A"].any()
    assert request.inputs["B"].shape == (1, 2) and request.inputs["B"].tolist() == [[b"", b""]]
    assert request.outputs == ["Y"] and request.batch_size == 1
    unbatched = config.model_copy(update={"max_batch_size": 0})
    assert timing_request(ModelKey("m", 1), unbatched).inputs["A"].shape == (1, 3)


def _slow_matmul_chain(path: Path, layers: int = 400, width: int = 2048) -> Path:
    """OUTPUT0 = relu(...relu(INPUT0 @ W)... @ W): one 16 MiB weight used `layers` times, so
    that a batch-1 call computes for 100 ms or more from a small file (the least hand-off
    seen reached 0.66 ms beside a python worker starting on a busy 2-core machine; it must
    stay under 2% of the call)."""
    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, previous = [], "INPUT0"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [previous, "W"], [f"m{i}"]))
        last = "OUTPUT0" if i == layers - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"m{i}"], [last]))
        previous = last
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    return _save(graph, path)


def _children(pid: int) -> list[int]:
    """The server's worker processes (not multiprocessing's resource tracker)."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    children = [int(p) for p in found.stdout.split()]
    tracker = b"resource_tracker"
    return [c for c in children if tracker not in Path(f"/proc/{c}/cmdline").read_bytes()]


def _choice(client: tc.InferenceServerClient, model: str) -> str:
    config = client.get_model_config(model, as_json=True)["config"]
    return config.get("parameters", {}).get(CHOICE_NOTE, {}).get("string_value", "")


def test_a_small_model_runs_inline_and_says_why(make_server, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "small", ONNX_AUTO, {1: lambda p: identity(p, shape=["batch", 4])})
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    choice = _choice(client, "small")
    assert choice.startswith("inline: the hand-off to a worker process took"), choice
    assert f"model 'small' version 1: kind auto runs {choice}" in server.log()
    # The worker that was timed is gone, with its shared memory.
    assert _children(server.proc.pid) == []
    assert not list(SHM_DIR.glob(f"tiffin_{server.proc.pid}_*_small_1_0"))
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    given = tc.InferInput("INPUT0", [2, 4], "FP32")
    given.set_data_from_numpy(data)
    answer = client.infer("small", [given]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(answer, data)
    # The served config says kind auto still: the choice is the server's, made each load.
    config = client.get_model_config("small", as_json=True)["config"]
    assert config["instance_group"][0].get("kind", "KIND_AUTO") == "KIND_AUTO"  # proto3 default


def test_a_long_model_keeps_its_worker_and_user_code_is_not_measured(
    make_server, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    write_model(repo, "slow", ONNX_AUTO, {1: _slow_matmul_chain})
    (repo / "plain" / "1").mkdir(parents=True)
    (repo / "plain" / "1" / "model.py").write_text(
        "from tiffin.backends import Backend\n\n"
        "class Plain(Backend):\n"
        "    def load(self, config, version_dir, device):\n"
        "        pass\n\n"
        "    def infer(self, inputs, outputs):\n"
        "        return {'OUTPUT0': inputs['INPUT0'].copy()}\n"
    )
    (repo / "plain" / "config.yaml").write_text(
        "backend: python\nmax_batch_size: 8\n"
        "inputs: [{name: INPUT0, datatype: FP32, dims: [2]}]\n"
        "outputs: [{name: OUTPUT0, datatype: FP32, dims: [2]}]\n"
    )
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    choice = _choice(client, "slow")
    assert choice.startswith("worker processes: the hand-off to a worker process took"), (
        choice,
        server.log(),
    )
    assert _choice(client, "plain") == ""  # never measured: always a worker
    assert len(_children(server.proc.pid)) == 2  # one worker each
    given = tc.InferInput("INPUT0", [1, 2048], "FP32")
    given.set_data_from_numpy(np.ones((1, 2048), dtype=np.float32))
    assert client.infer("slow", [given]).as_numpy("OUTPUT0").shape == (1, 2048)


@pytest.mark.parametrize("kind", ["cpu", "inline"])
def test_an_explicit_kind_is_kept(make_server, tmp_path: Path, kind: str) -> None:
    repo = tmp_path / "models"
    config = ONNX_AUTO + f"instance_group: [{{kind: {kind}}}]\n"
    write_model(repo, "small", config, {1: lambda p: identity(p, shape=["batch", 4])})
    server = make_server(repo)
    assert _choice(tc.InferenceServerClient(server.url), "small") == ""
    assert len(_children(server.proc.pid)) == (1 if kind == "cpu" else 0)
    assert "kind auto runs" not in server.log()


class _FakeWorker:
    """Stands in for a worker instance: each run sleeps `seconds`, all of it the call."""

    def __init__(self, seconds: float) -> None:
        self.name, self.device, self.runs, self.seconds = "m_1_0", None, 0, seconds
        self.unloaded = False

    async def execute(self, requests: list, outputs: list) -> SimpleNamespace:
        self.runs += 1
        await asyncio.sleep(self.seconds)
        return SimpleNamespace(infer_ns=int(self.seconds * 1e9))

    async def unload(self) -> None:
        self.unloaded = True


def _chooser() -> InstanceChooser:
    config = ModelConfig.model_validate(
        {
            "name": "m",
            "backend": "onnxruntime",
            "max_batch_size": 4,
            "inputs": [{"name": "X", "datatype": "FP32", "dims": [2]}],
            "outputs": [{"name": "Y", "datatype": "FP32", "dims": [2]}],
        }
    )
    return InstanceChooser(ModelKey("m", 1), config, ["m_1_0"], lambda name, device: None)


def test_a_slow_first_call_ends_the_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instance_choice, "TIMING_SECONDS", 0.2)
    worker = _FakeWorker(0.3)  # the first call alone outlasts the timing budget
    hand_off, call = asyncio.run(
        time_worker(worker, timing_request(ModelKey("m", 1), _chooser().config))
    )
    assert worker.runs == 1 and call == 0.3e9 and hand_off < 0.1e9


def test_a_timing_call_that_never_returns_fails_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instance_choice, "TIMING_LIMIT_SECONDS", 0.2)
    worker = _FakeWorker(3600)
    with pytest.raises(RuntimeError, match="did not finish within 0.2 s.*give the model's"):
        asyncio.run(_chooser().settle([worker]))
