"""Per-request failures: a backend that reports which requests of a batch failed (through
`Backend.infer_batch`) fails those alone, and the batch is not run again. Real servers, with
worker and inline instances, for a toy backend and for a python-backend model.py."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, leaked_arenas
from models import value_input
from tiffin.backends import BatchResult, Device
from tiffin.backends.python import PythonBackend, PythonModelError
from tiffin.server.repository import read_model

# A python model whose infer_batch fails single requests, as the FailSome toy backend does.
CHECKED = """
import numpy as np

from tiffin.backends import Backend, BatchResult
from tiffin.protos.errors import InvalidInput


class Checked(Backend):
    def load(self, config, version_dir, device):
        self.log = version_dir / "calls.log"

    def infer(self, inputs, outputs):
        raise AssertionError("infer_batch is called instead")

    def infer_batch(self, inputs, outputs, rows):
        x = inputs["INPUT0"]
        with open(self.log, "a") as log:
            log.write(f"{len(x)}\\n")
        failed, start = {}, 0
        for i, n in enumerate(rows):
            own = x[start : start + n]
            start += n
            if (own < 0).any():
                failed[i] = InvalidInput(f"INPUT0 holds a negative value, {own.min()}")
            elif (own > 1000).any():
                failed[i] = ValueError(f"INPUT0 holds {own.max()}, above 1000")
        return BatchResult({"OUTPUT0": x.copy()} if len(failed) < len(rows) else {}, failed)
"""

# Dispatched as soon as three rows are queued; the delay only bounds a batch that stays short.
CONFIG = """
max_batch_size: 3
inputs: [{{name: INPUT0, datatype: FP32, dims: [1]}}]
outputs: [{{name: OUTPUT0, datatype: FP32, dims: [1]}}]
dynamic_batching: {{max_queue_delay_microseconds: 2000000}}
instance_group: [{{kind: {kind}}}]
"""

MODELS = ["failsome", "checked"]  # the toy backend, the python backend


def write_repository(repo: Path, kind: str) -> Path:
    config = CONFIG.format(kind=kind)
    for name, extra, files in [
        ("failsome", "backend: toy_backends:FailSome\n", {}),
        ("checked", "", {"model.py": CHECKED}),
        ("whole", "", {"model.py": CHECKED.replace("failed[i] =", "raise")}),
    ]:
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.yaml").write_text(extra + config)
        for filename, text in files.items():
            (repo / name / "1" / filename).write_text(textwrap.dedent(text))
    return repo


@dataclass
class Served:
    kind: str
    repo: Path
    server: ServerProcess

    def calls(self, model: str) -> list[str]:
        """The rows of each batch the model's backend ran, read and cleared."""
        log = self.repo / model / "1" / "calls.log"
        calls = log.read_text().split() if log.exists() else []
        log.unlink(missing_ok=True)
        return calls

    def statistics(self, model: str) -> tuple[int, int, int, int]:
        """(executions, rows served, requests succeeded, requests failed) so far."""
        client = tc.InferenceServerClient(self.server.url)
        stats = client.get_inference_statistics(model, "1").model_stats[0]
        return (
            stats.execution_count,
            stats.inference_count,
            stats.inference_stats.success.count,
            stats.inference_stats.fail.count,
        )


@pytest.fixture(scope="module", params=["cpu", "inline"])
def served(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Served]:
    """One server per instance kind (a worker process, or inline), shared by this module."""
    repo = write_repository(tmp_path_factory.mktemp(f"models_{request.param}"), request.param)
    server = ServerProcess(repo)
    yield Served(request.param, repo, server)
    assert server.stop() == 0, server.log()
    assert not leaked_arenas()


def infer_together(url: str, model: str, values: list[float]) -> list[float | tuple[str, str]]:
    """Sends one request per value at once; each one's OUTPUT0 value, or (status, message)."""

    def call(value: float) -> float | tuple[str, str]:
        try:
            result = tc.InferenceServerClient(url).infer(model, [value_input(value)])
        except InferenceServerException as exc:
            return str(exc.status()).removeprefix("StatusCode."), exc.message()
        return float(result.as_numpy("OUTPUT0").reshape(-1)[0])

    with ThreadPoolExecutor(len(values)) as pool:
        return list(pool.map(call, values))


@pytest.mark.parametrize("model", MODELS)
def test_a_bad_request_fails_alone_and_the_batch_runs_once(served, model):
    served.calls(model)
    before = served.statistics(model)
    good, bad, broken = infer_together(served.server.url, model, [1.0, -1.0, 5000.0])
    assert good == 1.0
    assert bad == (
        "INVALID_ARGUMENT",
        f"model '{model}' version 1 rejected the request: INPUT0 holds a negative value, -1.0",
    )
    status, message = broken
    assert status == "INTERNAL"
    assert message.startswith(f"model '{model}' version 1 failed: ")
    assert message.endswith("INPUT0 holds 5000.0, above 1000"), message
    # One batch of the three requests, run once: no request was run again.
    assert served.calls(model) == ["3"]
    executions, rows, succeeded, failed = np.subtract(served.statistics(model), before)
    assert (executions, rows, succeeded, failed) == (1, 3, 1, 2)


@pytest.mark.parametrize("model", MODELS)
def test_a_batch_whose_every_request_fails_answers_each_with_its_own_error(served, model):
    served.calls(model)
    answers = infer_together(served.server.url, model, [-1.0, -2.0, 5000.0])
    assert [a[0] for a in answers] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "INTERNAL"]
    assert answers[0][1].endswith("negative value, -1.0")
    assert answers[1][1].endswith("negative value, -2.0")
    assert served.calls(model) == ["3"]
    good = infer_together(served.server.url, model, [4.0])
    assert good == [4.0]


def test_a_backend_that_raises_for_the_whole_batch_still_fails_only_the_bad_request(served):
    # The fallback: the batch fails as a whole, so its requests run again one at a time.
    served.calls("whole")
    good, bad, other = infer_together(served.server.url, "whole", [1.0, -1.0, 2.0])
    assert (good, other) == (1.0, 2.0)
    assert bad[0] == "INTERNAL" and "InvalidInput: INPUT0 holds a negative value, -1.0" in bad[1]
    assert served.calls("whole") == ["3", "1", "1", "1"]


def load_checked(tmp_path: Path, code: str) -> PythonBackend:
    write_repository(tmp_path, "inline")
    (tmp_path / "checked" / "1" / "model.py").write_text(textwrap.dedent(code))
    version = read_model(tmp_path / "checked").versions[0]
    assert version.config is not None, version.error
    backend = PythonBackend()
    backend.load(version.config, version.path, Device())
    return backend


def test_python_backend_passes_rows_and_words_failures(tmp_path):
    backend = load_checked(tmp_path, CHECKED)
    try:
        x = np.array([[1.0], [-1.0], [2.0], [5000.0]], np.float32)
        result = backend.infer_batch({"INPUT0": x}, ["OUTPUT0"], [2, 1, 1])
        assert isinstance(result, BatchResult)
        assert result.outputs["OUTPUT0"].tolist() == x.tolist()
        assert sorted(result.failed) == [0, 2]
        assert str(result.failed[2]) == "ValueError: INPUT0 holds 5000.0, above 1000"
    finally:
        backend.unload()


@pytest.mark.parametrize(
    "answer, message",
    [
        ("{'OUTPUT0': x}", "Checked.infer_batch returned dict; it must return "),
        ("BatchResult({'OUTPUT0': x}, {3: ValueError()})", "failure for request 3, but the "),
        ("BatchResult({'OUTPUT0': x}, {0: 'bad'})", "reported str for request 0; report an"),
        ("BatchResult({}, {})", "Checked.infer_batch returned no output 'OUTPUT0'"),
    ],
)
def test_python_backend_refuses_a_malformed_batch_result(tmp_path, answer, message):
    code = CHECKED.replace("return BatchResult(", f"return {answer}  # ")
    backend = load_checked(tmp_path, code)
    try:
        with pytest.raises(PythonModelError, match=message.replace("(", r"\(")):
            backend.infer_batch({"INPUT0": np.ones((2, 1), np.float32)}, ["OUTPUT0"], [1, 1])
    finally:
        backend.unload()
