"""The python backend: user code in model.py, served by real servers (worker processes and
inline), compared with the same class run in this process."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, leaked_arenas
from tiffin.backends import Device
from tiffin.backends.python import PythonBackend
from tiffin.server.repository import read_model

# A pre-processor: text or JSON (BYTES) -> a feature vector (FP32), with its parsing in a
# helper module next to model.py, imported relatively.
TEXT_TO_VEC = """
import numpy as np

from tiffin.backends import Backend

from . import features


class TextToVec(Backend):
    def load(self, config, version_dir, device):
        self.scale = np.float32(config.parameters.get("scale", 1.0))

    def infer(self, inputs, outputs):
        rows = [features.vector(item) for item in inputs["TEXT"][:, 0]]
        return {"VEC": np.asarray(rows, dtype=np.float32) * self.scale}
"""
FEATURES = """
import json


def vector(data: bytes) -> list[float]:
    text = data.decode("utf-8")
    if text.lstrip().startswith("{"):
        try:
            values = [float(v) for v in json.loads(text)["values"]]
        except json.JSONDecodeError as exc:
            raise ValueError(f"request text is not valid JSON: {exc.msg}") from None
        return (values + [0.0] * 4)[:4]
    digits = sum(c.isdigit() for c in text)
    vowels = sum(c in "aeiou" for c in text.lower())
    return [len(text), len(text.split()), digits, vowels]
"""

# A post-processor: scores (FP32) -> the top-2 labels (BYTES, returned as str) and scores.
TOP_K = """
import numpy as np

from tiffin.backends import Backend


class TopK(Backend):
    def load(self, config, version_dir, device):
        self.labels = str(config.parameters["labels"]).split(",")
        self.k = next(t.dims[0] for t in config.outputs if t.name == "LABELS")

    def infer(self, inputs, outputs):
        scores = inputs["SCORES"]
        best = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        labels = np.array([[self.labels[i] for i in row] for row in best], dtype=object)
        return {"LABELS": labels, "TOP": np.take_along_axis(scores, best, axis=1)}
"""

# One model.py text for two versions; only the helper, imported plainly, differs.
SCALE = """
import numpy as np

from tiffin.backends import Backend

import helper


class Model(Backend):
    def load(self, config, version_dir, device):
        pass

    def infer(self, inputs, outputs):
        return {"Y": inputs["X"] * np.float32(helper.FACTOR)}
"""

# Answers wrongly on purpose, in the way chosen by the value of X.
SLOPPY = """
import numpy as np

from tiffin.backends import Backend


class Sloppy(Backend):
    def load(self, config, version_dir, device):
        pass

    def infer(self, inputs, outputs):
        x = inputs["X"]
        mode = int(x[0])
        y, label = x.copy(), np.array([b"ok"], dtype=object)
        if mode == 1:
            return {"L": label}
        if mode == 2:
            y = x.astype(np.float64)
        if mode == 3:
            y = np.zeros(2, np.float32)
        if mode == 4:
            label = np.array([7], dtype=object)
        if mode == 5:
            return [y, label]
        return {"Y": y, "L": label}
"""

TWO_CLASSES = """
from tiffin.backends import Backend


class First(Backend):
    def load(self, config, version_dir, device):
        pass

    def infer(self, inputs, outputs):
        return {"Y": inputs["X"] + 1}


class Second(First):
    def infer(self, inputs, outputs):
        return {"Y": inputs["X"] + 100}
"""

BROKEN_IMPORT = """
import numpy as np

import nope_not_installed
"""

BROKEN_SYNTAX = """
from tiffin.backends import Backend

class Model(Backend):
    def infer(self, inputs, outputs)
        return {}
"""

# Triton's python-backend style, which is not our interface.
NO_CLASS = """
class TritonPythonModel:
    def initialize(self, args):
        pass

    def execute(self, requests):
        return []
"""

X_TO_Y = """
inputs: [{name: X, datatype: FP32, dims: [1]}]
outputs: [{name: Y, datatype: FP32, dims: [1]}]
"""

SLOPPY_CONFIG = """
inputs: [{name: X, datatype: FP32, dims: [1]}]
outputs: [{name: Y, datatype: FP32, dims: [1]}, {name: L, datatype: BYTES, dims: [1]}]
"""


def write_model(repo: Path, name: str, config: str, versions: dict[int, dict[str, str]]) -> None:
    (repo / name).mkdir(parents=True)
    (repo / name / "config.yaml").write_text(textwrap.dedent(config))
    for version, files in versions.items():
        folder = repo / name / str(version)
        folder.mkdir()
        for filename, text in files.items():
            (folder / filename).write_text(textwrap.dedent(text))


def write_repository(repo: Path, kind: str) -> Path:
    instances = f"instance_group: [{{kind: {kind}}}]\n"
    write_model(
        repo,
        "text_to_vec",
        """
        max_batch_size: 8
        inputs: [{name: TEXT, datatype: BYTES, dims: [1]}]
        outputs: [{name: VEC, datatype: FP32, dims: [4]}]
        dynamic_batching: {max_queue_delay_microseconds: 200000}
        parameters: {scale: 0.5}
        """
        + instances,
        {1: {"model.py": TEXT_TO_VEC, "features.py": FEATURES}},
    )
    write_model(
        repo,
        "top_k",
        """
        max_batch_size: 8
        inputs: [{name: SCORES, datatype: FP32, dims: [5]}]
        outputs:
          - {name: LABELS, datatype: BYTES, dims: [2]}
          - {name: TOP, datatype: FP32, dims: [2]}
        parameters: {labels: "cat,dog,bird,fish,frog"}
        """
        + instances,
        {1: {"model.py": TOP_K}},
    )
    write_model(
        repo,
        "scale",
        X_TO_Y + "version_policy: {all: {}}\n" + instances,
        {
            1: {"model.py": SCALE, "helper.py": "FACTOR = 2\n"},
            2: {"model.py": SCALE, "helper.py": "FACTOR = 10\n"},
        },
    )
    models = {
        "sloppy": (SLOPPY_CONFIG, SLOPPY),
        "picked": (X_TO_Y + "parameters: {class_name: Second}\n", TWO_CLASSES),
        "ambiguous": (X_TO_Y, TWO_CLASSES),
        "broken_import": (X_TO_Y, BROKEN_IMPORT),
        "broken_syntax": (X_TO_Y, BROKEN_SYNTAX),
        "no_class": (X_TO_Y, NO_CLASS),
        "no_outputs": ("inputs: [{name: X, datatype: FP32, dims: [1]}]\n", TWO_CLASSES),
    }
    for name, (config, code) in models.items():
        write_model(repo, name, config + instances, {1: {"model.py": code}})
    return repo


@dataclass
class Served:
    kind: str
    repo: Path
    server: ServerProcess
    client: tc.InferenceServerClient


@pytest.fixture(scope="module", params=["cpu", "inline"])
def served(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Served]:
    """One server per instance kind, shared by the tests of this module."""
    repo = write_repository(tmp_path_factory.mktemp(f"models_{request.param}"), request.param)
    server = ServerProcess(repo)
    yield Served(request.param, repo, server, tc.InferenceServerClient(server.url))
    assert server.stop() == 0, server.log()
    assert not leaked_arenas()


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Iterator[dict[str, PythonBackend]]:
    """The same models loaded in this process by the python backend, to compare with."""
    repo = write_repository(tmp_path_factory.mktemp("local"), "inline")
    backends = {}
    for name in ("text_to_vec", "top_k"):
        version = read_model(repo / name).versions[0]
        assert version.config is not None
        backend = PythonBackend()
        backend.load(version.config, version.path, Device())
        backends[name] = backend
    yield backends
    for backend in backends.values():
        backend.unload()


def tensor(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    value = tc.InferInput(name, list(array.shape), datatype)
    value.set_data_from_numpy(array)
    return value


def text_input(*texts: str) -> tc.InferInput:
    return tensor("TEXT", np.array([[t.encode()] for t in texts], dtype=object), "BYTES")


def x_input(value: float) -> tc.InferInput:
    return tensor("X", np.array([value], np.float32), "FP32")


def reasons(client: tc.InferenceServerClient) -> dict[str, tuple[str, str]]:
    """Model name -> (state, reason) of its version 1, from the repository index."""
    index = client.get_model_repository_index().models
    return {m.name: (m.state, m.reason) for m in index if m.version in ("", "1")}


def expect_error(call, status: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == f"StatusCode.{status}", info.value.message()
    return info.value.message()


TEXTS = ['{"values": [1.5, -2, 3]}', "Hello world 42", '{"values": [1, 2, 3, 4, 5]}', ""]


def test_bytes_text_and_json_to_fp32(served, local):
    result = served.client.infer("text_to_vec", [text_input(*TEXTS)])
    got = result.as_numpy("VEC")
    assert got.dtype == np.float32 and got.shape == (4, 4)
    expected = local["text_to_vec"].infer(
        {"TEXT": np.array([[t.encode()] for t in TEXTS], dtype=object)}, ["VEC"]
    )["VEC"]
    np.testing.assert_array_equal(got, expected)
    # The values themselves, so that a wrong class on both sides cannot agree by accident.
    np.testing.assert_array_equal(got[0], [0.75, -1, 1.5, 0])
    np.testing.assert_array_equal(got[1], [7, 1.5, 1, 1.5])


def test_fp32_to_bytes_top_labels(served, local):
    scores = np.array([[0.1, 0.7, 0.05, 0.9, 0.2], [3, 2, 1, 0, -1]], np.float32)
    result = served.client.infer("top_k", [tensor("SCORES", scores, "FP32")])
    labels = result.as_numpy("LABELS")
    assert labels.tolist() == [[b"fish", b"dog"], [b"cat", b"dog"]]
    np.testing.assert_array_equal(result.as_numpy("TOP"), [scores[0, [3, 1]], scores[1, [0, 1]]])
    expected = local["top_k"].infer({"SCORES": scores}, ["LABELS", "TOP"])
    assert labels.tolist() == [[s.encode() for s in row] for row in expected["LABELS"]]
    # One output alone: the model computes both, the server returns the one asked for.
    only = served.client.infer(
        "top_k", [tensor("SCORES", scores, "FP32")], outputs=[tc.InferRequestedOutput("LABELS")]
    )
    assert only.as_numpy("TOP") is None
    assert only.as_numpy("LABELS").tolist() == labels.tolist()


def burst(client: tc.InferenceServerClient, texts: list[str]) -> list[object]:
    """Sends one request per text at the same moment; each one's result or error."""
    outcomes: list[object] = [None] * len(texts)
    start = threading.Barrier(len(texts))

    def call(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = client.infer("text_to_vec", [text_input(texts[i])], client_timeout=30)
        except InferenceServerException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def batch_sizes(client: tc.InferenceServerClient, model: str) -> dict[int, int]:
    stats = client.get_inference_statistics(model, "1").model_stats[0]
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


def test_concurrent_requests_are_batched_and_get_their_own_rows(served, local):
    texts = [json.dumps({"values": [i, i * 2, -i]}) for i in range(6)]
    before = batch_sizes(served.client, "text_to_vec")
    outcomes = burst(served.client, texts)
    for text, outcome in zip(texts, outcomes, strict=True):
        assert isinstance(outcome, tc.InferResult), outcome
        expected = local["text_to_vec"].infer(
            {"TEXT": np.array([[text.encode()]], object)}, ["VEC"]
        )
        np.testing.assert_array_equal(outcome.as_numpy("VEC"), expected["VEC"])
    after = batch_sizes(served.client, "text_to_vec")
    grown = [size for size, count in after.items() if count > before.get(size, 0)]
    assert max(grown) > 1, after  # the burst ran in batches of several requests


def test_user_exception_fails_only_the_bad_request(served):
    texts = ['{"values": [1]}', '{"values": [2]}', '{"values": [3', '{"values": [4]}']
    failures_logged = served.server.log().count("TextToVec.infer failed")
    outcomes = burst(served.client, texts)
    for i in (0, 1, 3):
        result = outcomes[i]
        assert isinstance(result, tc.InferResult), result
        np.testing.assert_array_equal(result.as_numpy("VEC"), [[0.5 * (i + 1), 0, 0, 0]])
    error = outcomes[2]
    assert isinstance(error, InferenceServerException)
    assert error.status() == "StatusCode.INTERNAL"
    assert "ValueError: request text is not valid JSON" in error.message()
    assert "features.py, line" in error.message()  # where in the user's code
    assert "model 'text_to_vec' version 1 failed" in error.message()
    # The bad request failed twice: in the batch it came with, then when run alone.
    assert served.server.log().count("TextToVec.infer failed") - failures_logged == 2


def test_two_versions_serve_side_by_side(served):
    for version, factor in (("1", 2), ("2", 10)):
        result = served.client.infer("scale", [x_input(3)], model_version=version)
        np.testing.assert_array_equal(result.as_numpy("Y"), [3 * factor])
    # No max_batch_size: no batch dimension, as in Triton's python backend.
    config = served.client.get_model_config("scale").config
    assert config.max_batch_size == 0 and config.backend == "python"


def test_class_name_picks_one_of_several_classes(served):
    result = served.client.infer("picked", [x_input(1)])
    np.testing.assert_array_equal(result.as_numpy("Y"), [101])


@pytest.mark.parametrize(
    "mode, message",
    [
        (1, "Sloppy.infer returned no output 'Y' (it returned L)"),
        (2, "output 'Y' returned by Sloppy.infer holds float64 (FP64), but it is declared FP32"),
        (3, "output 'Y' returned by Sloppy.infer has shape [2], but the config declares dims [1]"),
        (4, "output 'L' returned by Sloppy.infer is declared BYTES, so its elements must be bytes"),
        (5, "Sloppy.infer returned list; it must return a dict"),
    ],
)
def test_wrong_outputs_are_named(served, mode, message):
    text = expect_error(lambda: served.client.infer("sloppy", [x_input(mode)]), "INTERNAL")
    assert message in text
    good = served.client.infer("sloppy", [x_input(0)])
    assert good.as_numpy("L").tolist() == [b"ok"]


def test_import_error_makes_the_model_unavailable(served):
    state, reason = reasons(served.client)["broken_import"]
    assert state == "UNAVAILABLE"
    assert "broken_import/1/model.py cannot be imported" in reason
    assert "ModuleNotFoundError: No module named 'nope_not_installed'" in reason
    assert "(model.py, line 4, in <module>)" in reason
    assert "\n" not in reason and "Traceback" not in reason
    assert not served.client.is_model_ready("broken_import", "1")  # a probe: not an error
    message = expect_error(lambda: served.client.infer("broken_import", [x_input(1)]), "NOT_FOUND")
    assert "No module named 'nope_not_installed'" in message  # the reason the server knows


def test_syntax_error_names_file_and_line(served):
    state, reason = reasons(served.client)["broken_syntax"]
    assert state == "UNAVAILABLE"
    assert "broken_syntax/1/model.py cannot be imported: SyntaxError: " in reason
    assert reason.endswith("(model.py, line 5)")


@pytest.mark.parametrize(
    "model, message",
    [
        ("no_class", "defines no subclass of tiffin.backends.Backend; define one"),
        ("ambiguous", "defines several Backend subclasses (First, Second); name the one"),
        ("no_outputs", "outputs must be declared for a python model"),
    ],
)
def test_model_definition_errors_are_clear(served, model, message):
    state, reason = reasons(served.client)[model]
    assert state == "UNAVAILABLE"
    assert message in reason


def test_other_models_keep_serving(served):
    index = served.client.get_model_repository_index().models
    ready = {m.name for m in index if m.state == "READY"}
    assert ready == {"text_to_vec", "top_k", "scale", "sloppy", "picked"}


def load_version(model_dir: Path, version: int) -> PythonBackend:
    spec = next(v for v in read_model(model_dir).versions if v.version == version)
    assert spec.config is not None, spec.error
    backend = PythonBackend()
    backend.load(spec.config, spec.path, Device())
    return backend


def test_sibling_modules_stay_private_to_their_version(tmp_path):
    repo = write_repository(tmp_path, "inline")
    # A module of the helper's name that this process already has (another model's, or a
    # library's) neither answers model.py's plain import nor is replaced by it.
    elsewhere = ModuleType("helper")
    sys.modules["helper"] = elsewhere
    path_before = list(sys.path)
    try:
        first, second = load_version(repo / "scale", 1), load_version(repo / "scale", 2)
        assert sys.modules["helper"] is elsewhere and sys.path == path_before
        x = {"X": np.array([3], np.float32)}
        assert first.infer(x, ["Y"])["Y"].tolist() == [6]
        assert second.infer(x, ["Y"])["Y"].tolist() == [30]
        private = [n for n in sys.modules if n.startswith("tiffin_model_scale_")]
        assert len(private) == 6  # package, model and helper of each version
        first.unload()
        second.unload()
        assert not [n for n in sys.modules if n.startswith("tiffin_model_scale_")]
    finally:
        del sys.modules["helper"]


def test_a_sibling_imported_at_infer_time_must_be_relative(tmp_path):
    # The rule the module docstring states: plain imports of siblings work while model.py is
    # imported; inside infer, only the relative form finds them.
    lazy = SCALE.replace("import helper\n", "").replace(
        "return {", "from . import helper\n        return {"
    )
    write_model(tmp_path, "lazy", X_TO_Y, {1: {"model.py": lazy, "helper.py": "FACTOR = 4\n"}})
    backend = load_version(tmp_path / "lazy", 1)
    assert backend.infer({"X": np.array([2], np.float32)}, ["Y"])["Y"].tolist() == [8]
    backend.unload()
