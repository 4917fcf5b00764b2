"""Pipelines (multi-model composition) through `serverctl serve` and tritonclient."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import EXAMPLES, ServerProcess

# Two add_sub calls: (a + b) + (a - b) = 2a and (a + b) - (a - b) = 2b. Everything but the
# steps is left for the server to work out from add_sub's config.
TWICE = """
pipeline:
  steps:
    - model: add_sub
      inputs: {INPUT0: a, INPUT1: b}
      outputs: {OUTPUT0: sum, OUTPUT1: difference}
    - model: add_sub
      inputs: {INPUT0: sum, INPUT1: difference}
      outputs: {OUTPUT0: twice_a, OUTPUT1: twice_b}
"""

# Triton's ensemble spelling, with a step that fails on negative numbers.
CHECKED = """
platform: ensemble
max_batch_size: 4
input:
  - {name: x, data_type: TYPE_FP32, dims: [2]}
output:
  - {name: y, data_type: TYPE_FP32, dims: [2]}
ensemble_scheduling:
  step:
    - model_name: echo
      model_version: -1
      input_map: {INPUT0: x}
      output_map: {OUTPUT0: echoed}
    - model_name: fail
      model_version: 1
      input_map: {INPUT0: echoed}
      output_map: {OUTPUT0: y}
"""

TOY = """
backend: toy_backends:{cls}
max_batch_size: 8
inputs: [{{name: INPUT0, datatype: FP32, dims: [2]}}]
outputs: [{{name: OUTPUT0, datatype: FP32, dims: [2]}}]
dynamic_batching: {{max_queue_delay_microseconds: 20000}}
instance_group: [{{kind: inline}}]
"""


def write_model(repository: Path, name: str, config: str, version: bool = True) -> None:
    folder = repository / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(textwrap.dedent(config))
    if version:
        (folder / "1").mkdir()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipelines") / "models"
    root.mkdir()
    (root / "add_sub").symlink_to(EXAMPLES / "add_sub")
    write_model(root, "twice", TWICE, version=False)
    # A pipeline whose step is a pipeline: it must load after "twice", whatever the order.
    write_model(
        root,
        "a_quadruple",
        """
        pipeline:
          steps:
            - model: twice
              inputs: {a: x, b: y}
              outputs: {twice_a: x2, twice_b: y2}
            - model: twice
              inputs: {a: x2, b: y2}
              outputs: {twice_a: x4}
        """,
    )
    write_model(root, "echo", TOY.format(cls="Echo"))
    write_model(root, "fail", TOY.format(cls="Fail"))
    write_model(root, "checked", CHECKED)
    # add_sub gives INT32, the echo step wants FP32: the pipeline cannot load.
    write_model(
        root,
        "mismatched",
        """
        pipeline:
          steps:
            - {model: add_sub, inputs: {INPUT0: a, INPUT1: b}, outputs: {OUTPUT0: s}}
            - {model: echo, inputs: {INPUT0: s}, outputs: {OUTPUT0: out}}
        """,
    )
    write_model(
        root,
        "missing_step",
        """
        pipeline:
          steps:
            - {model: no_such_model, inputs: {INPUT0: a}, outputs: {OUTPUT0: out}}
        """,
    )
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> ServerProcess:
    started = ServerProcess(repository)
    yield started
    assert started.stop() == 0, started.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.url)


def infer_twice(client: grpcclient.InferenceServerClient, a: np.ndarray, b: np.ndarray) -> dict:
    inputs = [
        grpcclient.InferInput("a", list(a.shape), "INT32"),
        grpcclient.InferInput("b", list(b.shape), "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("twice", inputs)
    return {name: result.as_numpy(name) for name in ("twice_a", "twice_b")}


def test_values_flow_through_every_step(client: grpcclient.InferenceServerClient) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(-1000, 1000, (3, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, (3, 16), dtype=np.int32)
    out = infer_twice(client, a, b)
    np.testing.assert_array_equal(out["twice_a"], 2 * a)
    np.testing.assert_array_equal(out["twice_b"], 2 * b)


def test_config_is_completed_from_the_steps(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("twice", as_json=True)["config"]
    assert config["platform"] == "ensemble"
    assert config["max_batch_size"] == 8
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("a", "TYPE_INT32", ["16"]),
        ("b", "TYPE_INT32", ["16"]),
    ]
    assert [t["name"] for t in config["output"]] == ["twice_a", "twice_b"]
    steps = config["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["add_sub", "add_sub"]
    assert steps[1]["input_map"] == {"INPUT0": "sum", "INPUT1": "difference"}
    metadata = client.get_model_metadata("twice", as_json=True)
    assert [(t["name"], t["shape"]) for t in metadata["inputs"]] == [
        ("a", ["-1", "16"]),
        ("b", ["-1", "16"]),
    ]


def test_requested_outputs_only(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [
        grpcclient.InferInput("a", [1, 16], "INT32"),
        grpcclient.InferInput("b", [1, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    result = client.infer("twice", inputs, outputs=[grpcclient.InferRequestedOutput("twice_b")])
    np.testing.assert_array_equal(result.as_numpy("twice_b"), 2 * a)
    assert result.as_numpy("twice_a") is None


def test_steps_batch_with_other_traffic(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    """Concurrent pipeline requests meet in the echo step's batches, and each gets its own
    rows back."""
    before = client.get_inference_statistics("echo", as_json=True)["model_stats"][0]
    errors: list[BaseException] = []
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        try:
            own = grpcclient.InferenceServerClient(server.url)
            x = np.full((1, 2), i, dtype=np.float32)
            request = grpcclient.InferInput("x", [1, 2], "FP32")
            request.set_data_from_numpy(x)
            results[i] = own.infer("checked", [request]).as_numpy("y")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    for i, y in results.items():
        np.testing.assert_array_equal(y, np.full((1, 2), i, dtype=np.float32))
    after = client.get_inference_statistics("echo", as_json=True)["model_stats"][0]
    requests = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert requests == 8
    assert executions < 8, "the pipeline's step requests were not batched together"


def test_failing_step_is_named_and_fails_alone(client: grpcclient.InferenceServerClient) -> None:
    request = grpcclient.InferInput("x", [1, 2], "FP32")
    request.set_data_from_numpy(np.array([[1.0, -1.0]], dtype=np.float32))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("checked", [request])
    assert raised.value.status() == "StatusCode.INTERNAL"
    assert "pipeline 'checked' step 2 (model 'fail')" in raised.value.message()
    assert "negative" in raised.value.message()
    request.set_data_from_numpy(np.array([[1.0, 2.0]], dtype=np.float32))
    assert client.infer("checked", [request]).as_numpy("y").tolist() == [[1.0, 2.0]]


def test_bad_pipelines_are_unavailable_with_reasons(
    client: grpcclient.InferenceServerClient,
) -> None:
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["twice"]["state"] == "READY"
    assert index["checked"]["state"] == "READY"
    assert index["mismatched"]["state"] == "UNAVAILABLE"
    assert (
        "step 2 (model 'echo') input 'INPUT0' is FP32, but it reads 's', which is INT32"
        in (index["mismatched"]["reason"])
    )
    assert index["missing_step"]["state"] == "UNAVAILABLE"
    assert "step 1 calls model 'no_such_model': no such model" in (index["missing_step"]["reason"])


def test_validate_reports_pipeline_problems(repository: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", "validate", str(repository)],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "PYTHONPATH": str(Path(__file__).parent),
            "TIFFIN_ALLOWED_BACKENDS": "toy_backends",
        },
    )
    assert result.returncode == 1, result.stdout
    assert "ok      twice (version 1)" in result.stdout
    assert "ok      a_quadruple (version 1)" in result.stdout  # its step is a pipeline
    assert "pipeline: step 1 calls model 'no_such_model': no such model" in result.stdout
    assert "input 'INPUT0' is FP32, but it reads 's', which is INT32" in result.stdout


@pytest.mark.parametrize(
    ("pipeline", "problem"),
    [
        (
            "steps: [{model: m, inputs: {X: a}, outputs: {Y: b}}, "
            "{model: m, inputs: {X: b}, outputs: {Y: b}}]",
            "pipeline tensor 'b' is produced by both step 1 and step 2",
        ),
        (
            "steps: [{model: m, inputs: {X: c}, outputs: {Y: b}}, "
            "{model: m, inputs: {X: b}, outputs: {Y: c}}]",
            "steps [1, 2] read each other's outputs in a cycle",
        ),
        ("steps: []", "pipeline.steps: List should have at least 1 item"),
    ],
)
def test_pipeline_shape_errors(tmp_path: Path, pipeline: str, problem: str) -> None:
    write_model(tmp_path, "p", f"pipeline: {{{pipeline}}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", "validate", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert problem in result.stdout, result.stdout


def index_entry(client: grpcclient.InferenceServerClient, name: str) -> dict:
    models = client.get_model_repository_index(as_json=True)["models"]
    return next(m for m in models if m["name"] == name)


def test_unloaded_step_model_makes_the_pipeline_unavailable_until_it_is_back(
    client: grpcclient.InferenceServerClient,
) -> None:
    """A pipeline is never READY-and-failing: it goes UNAVAILABLE with the reason when a
    step's model goes, and READY again when it is back."""
    client.unload_model("fail")
    try:
        request = grpcclient.InferInput("x", [1, 2], "FP32")
        request.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
        assert not client.is_model_ready("checked")
        entry = index_entry(client, "checked")
        assert entry["state"] == "UNAVAILABLE"
        assert "step 2 calls model 'fail', which has no ready version" in entry["reason"]
        with pytest.raises(InferenceServerException) as raised:
            client.infer("checked", [request])
        assert raised.value.status() == "StatusCode.NOT_FOUND"
        assert "step 2 calls model 'fail'" in raised.value.message()
    finally:
        client.load_model("fail")
    assert client.is_model_ready("checked")
    assert index_entry(client, "checked")["state"] == "READY"
    assert client.infer("checked", [request]).as_numpy("y").tolist() == [[1.0, 1.0]]


def test_a_pipeline_can_call_a_pipeline(client: grpcclient.InferenceServerClient) -> None:
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [
        grpcclient.InferInput("x", [1, 16], "INT32"),
        grpcclient.InferInput("y", [1, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(-x)
    result = client.infer("a_quadruple", inputs)
    np.testing.assert_array_equal(result.as_numpy("x4"), 4 * x)


def test_streaming_through_a_pipeline_answers_in_order(server: ServerProcess) -> None:
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(12):
            a = np.full((1, 16), i, dtype=np.int32)
            inputs = [
                grpcclient.InferInput("a", [1, 16], "INT32"),
                grpcclient.InferInput("b", [1, 16], "INT32"),
            ]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(a)
            client.async_stream_infer("twice", inputs, request_id=str(i))
        for i in range(12):
            result, error = answers.get(timeout=30)
            assert error is None, error
            assert result.get_response().id == str(i)
            np.testing.assert_array_equal(result.as_numpy("twice_a"), np.full((1, 16), 2 * i))
    finally:
        client.stop_stream()
