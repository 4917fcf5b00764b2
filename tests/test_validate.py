"""`serverctl validate` judges a repository as `serverctl serve` loads it: a corpus of broken
repositories, each model checked by validate (a subprocess) and served by one real server,
and the two must agree on every model; what this environment lacks is a warning."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from conftest import EXAMPLES, ServerProcess
from models import identity, write_model
from tiffin.backends import Device, MissingDependency
from tiffin.server.cli import main
from tiffin.server.repository import read_model

TESTS = Path(__file__).resolve().parent

ONNX = """\
backend: onnxruntime
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [4]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [4]}]
"""

PYTHON = """\
backend: python
max_batch_size: 8
inputs: [{name: INPUT0, datatype: INT32, dims: [4]}]
outputs: [{name: OUTPUT0, datatype: INT32, dims: [4]}]
"""

GOOD_MODEL_PY = """\
import numpy as np
from tiffin.backends import Backend

print("model.py prints while it is imported")  # must not upset validate


class Double(Backend):
    def load(self, config, version_dir, device):
        pass

    def infer(self, inputs, outputs):
        return {"OUTPUT0": inputs["INPUT0"] * 2}
"""


def _onnx(path: Path) -> Path:
    return identity(path, "FP32", ["batch", 4])


def _pipeline(*steps: str) -> str:
    return "pipeline:\n  steps:\n" + "".join(f"    - {step}\n" for step in steps)


def _write(root: Path, name: str, config: str, files: dict[str, str | bytes | None]) -> None:
    """root/name/config.yaml and files by path inside the model folder (None: a folder)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config)
    for relative, content in files.items():
        path = folder / relative
        if content is None:
            path.mkdir(parents=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content))


def _python_model(root: Path, name: str, source: str, config: str = PYTHON) -> None:
    _write(root, name, config, {"1/model.py": source})


# model -> a phrase that validate's report and the served reason must both hold (the cause,
# with the file where that is part of it); "" for a model that must be ok and READY.
CORPUS: dict[str, str] = {
    "good_onnx": "",
    "good_python": "",
    "good_toy": "",
    "good_pipeline": "",
    "ignored_v3": "",  # serves version 1; v3 is a warning
    "bad_yaml": "not valid YAML",
    "unknown_field": "max_batch_sise: unknown field",
    "bad_dims": "declared with dims [5]",
    "missing_file": "missing_file/1/model.onnx: model file not found",
    "garbage_model": "onnxruntime cannot load",
    "syntax_error": "syntax_error/1/model.py cannot be imported: SyntaxError",
    "missing_import": "No module named 'tiffin_no_such_module'",
    "no_backend_class": "no_backend_class/1/model.py defines no subclass",
    "abstract_class": "does not implement infer",
    "only_v3": "no version folders",
    "not_allowed": "backend 'subprocess:Popen' is not allowed",
    "pipeline_missing_model": "calls model 'no_such_model'",
    "pipeline_mismatch": "input 'INPUT0' is INT32, but it reads 'y', which is FP32",
    "pipeline_cycle_a": "calls model 'pipeline_cycle_b'",
    "pipeline_cycle_b": "calls model 'pipeline_cycle_a'",
    "pipeline_self": "calls model 'pipeline_self'",
    "pipeline_tensor_cycle": "read each other's outputs in a cycle",
    "pipeline_on_broken": "calls model 'syntax_error'",
}


def build_corpus(root: Path) -> Path:
    """One repository holding every case of CORPUS (and `gpu_only`, which is a warning on a
    machine without a GPU and ok on one with)."""
    write_model(root, "good_onnx", ONNX, {1: _onnx})
    _python_model(root, "good_python", GOOD_MODEL_PY)
    _write(
        root,
        "good_toy",
        "backend: toy_backends:Echo\nmax_batch_size: 8\n"
        "inputs: [{name: INPUT0, datatype: FP32, dims: [1]}]\n"
        "outputs: [{name: OUTPUT0, datatype: FP32, dims: [1]}]\n",
        {"1": None},
    )
    _write(
        root,
        "good_pipeline",
        _pipeline("{model: good_onnx, inputs: {INPUT0: x}, outputs: {OUTPUT0: y}}"),
        {},
    )
    write_model(root, "ignored_v3", ONNX, {1: _onnx, 3: _onnx})
    (root / "ignored_v3" / "3").rename(root / "ignored_v3" / "v3")

    _write(root, "bad_yaml", "backend: [onnxruntime\n", {"1/model.onnx": b""})
    write_model(root, "unknown_field", ONNX + "max_batch_sise: 4\n", {1: _onnx})
    write_model(root, "bad_dims", ONNX.replace("dims: [4]}]\n", "dims: [5]}]\n"), {1: _onnx})
    _write(root, "missing_file", ONNX, {"1": None})
    _write(root, "garbage_model", ONNX, {"1/model.onnx": b"this is not an ONNX model"})
    _python_model(root, "syntax_error", "def broken(:\n    pass\n")
    _python_model(root, "missing_import", "import tiffin_no_such_module\n")
    _python_model(root, "no_backend_class", "WEIGHTS = [1, 2, 3]\n")
    _python_model(
        root,
        "abstract_class",
        "from tiffin.backends import Backend\n\n"
        "class Half(Backend):\n    def load(self, config, version_dir, device):\n"
        "        pass\n",
    )
    _write(root, "only_v3", ONNX, {})
    _onnx(root / "only_v3" / "v3" / "model.onnx")
    _write(root, "not_allowed", ONNX.replace("onnxruntime", "subprocess:Popen"), {"1": None})

    _write(
        root,
        "pipeline_missing_model",
        _pipeline("{model: no_such_model, inputs: {INPUT0: x}, outputs: {OUTPUT0: y}}"),
        {},
    )
    _write(
        root,
        "pipeline_mismatch",  # good_onnx answers FP32, good_python reads INT32
        _pipeline(
            "{model: good_onnx, inputs: {INPUT0: x}, outputs: {OUTPUT0: y}}",
            "{model: good_python, inputs: {INPUT0: y}, outputs: {OUTPUT0: z}}",
        ),
        {},
    )
    for name, other in [
        ("pipeline_cycle_a", "pipeline_cycle_b"),
        ("pipeline_cycle_b", "pipeline_cycle_a"),
    ]:
        _write(
            root, name, _pipeline(f"{{model: {other}, inputs: {{x: x}}, outputs: {{y: y}}}}"), {}
        )
    _write(
        root,
        "pipeline_self",
        _pipeline("{model: pipeline_self, inputs: {x: x}, outputs: {y: y}}"),
        {},
    )
    _write(
        root,
        "pipeline_tensor_cycle",
        _pipeline(
            "{model: good_onnx, inputs: {INPUT0: c}, outputs: {OUTPUT0: b}}",
            "{model: good_onnx, inputs: {INPUT0: b}, outputs: {OUTPUT0: c}}",
        ),
        {},
    )
    _write(
        root,
        "pipeline_on_broken",
        _pipeline("{model: syntax_error, inputs: {INPUT0: x}, outputs: {OUTPUT0: y}}"),
        {},
    )
    write_model(root, "gpu_only", ONNX + "instance_group: [{kind: gpu}]\n", {1: _onnx})
    return root


# --- reading validate's report and the server's index -------------------------------------


@dataclass
class Report:
    """One model as `serverctl validate` reported it."""

    status: str  # ok, broken or warning
    lines: list[str] = field(default_factory=list)  # its header and the lines under it

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def parse_report(out: str) -> dict[str, Report]:
    reports: dict[str, Report] = {}
    current: Report | None = None
    for line in out.splitlines():
        if line.startswith("        ") and current is not None:
            current.lines.append(line.strip())
        elif line.startswith(("ok ", "broken ", "warning ")):
            status, rest = line.split(None, 1)
            current = reports[rest.split()[0].rstrip(":")] = Report(status, [line])
        else:
            current = None  # the summary
    return reports


def run_validate(repository: Path, *extra: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", "validate", str(repository), *extra],
        capture_output=True,
        text=True,
        timeout=180,
        env={
            **os.environ,
            "PYTHONPATH": str(TESTS),
            "TIFFIN_ALLOWED_BACKENDS": "toy_backends",
            **(env or {}),
        },
    )


def served(server: ServerProcess) -> dict[str, list[dict]]:
    """RepositoryIndex: each model's entries (one per version, or one for the model)."""
    client = grpcclient.InferenceServerClient(server.url)
    try:
        index = client.get_model_repository_index(as_json=True)["models"]
    finally:
        client.close()
    entries: dict[str, list[dict]] = {}
    for entry in index:
        entries.setdefault(entry["name"], []).append(entry)
    return entries


def assert_agree(reports: dict[str, Report], index: dict[str, list[dict]]) -> None:
    """Every model validate calls broken, or warns cannot load here, is UNAVAILABLE when
    served with a reason naming its cause; every model it calls ok is READY."""
    assert reports.keys() == index.keys()
    for name, report in reports.items():
        states = {e.get("state") for e in index[name]}
        reasons = "\n".join(e.get("reason", "") for e in index[name])
        if report.status == "ok":
            assert states == {"READY"}, f"{name}: validate says ok, served {index[name]}"
        else:
            assert "READY" not in states, f"{name}: validate says {report.status}, served READY"
            assert reasons, f"{name}: UNAVAILABLE without a reason"


# --- the corpus: validate and serve agree ------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus") / "models")


@pytest.fixture(scope="module")
def validated(corpus: Path) -> tuple[subprocess.CompletedProcess, dict[str, Report]]:
    result = run_validate(corpus)
    return result, parse_report(result.stdout)


@pytest.fixture(scope="module")
def corpus_server(corpus: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(corpus)
    yield server
    assert server.stop() == 0, server.log()


def test_validate_reports_every_broken_model_with_its_cause(validated) -> None:
    result, reports = validated
    assert result.returncode == 1, result.stdout + result.stderr
    for name, cause in CORPUS.items():
        report = reports[name]
        if not cause:
            assert report.status == "ok", report.text
            continue
        assert report.status == "broken", report.text
        assert cause in report.text, f"{name}: {cause!r} not in\n{report.text}"
    summary = result.stdout.splitlines()[-1]
    assert summary.startswith(f"{len(CORPUS) + 1} model(s), "), summary


def test_serve_agrees_with_validate_on_every_model(validated, corpus_server) -> None:
    _, reports = validated
    index = served(corpus_server)
    assert_agree(reports, index)
    for name, cause in CORPUS.items():
        if cause:
            reasons = "\n".join(e.get("reason", "") for e in index[name])
            assert cause in reasons, f"{name}: {cause!r} not in the served reason {reasons!r}"


def test_a_folder_that_is_not_a_version_is_a_warning_both_show(
    corpus: Path, validated, corpus_server
) -> None:
    _, reports = validated
    folder = corpus / "ignored_v3" / "v3"
    assert reports["ignored_v3"].lines[0] == "ok      ignored_v3 (version 1)"
    warning = (
        f"warning: {folder}: not a version folder (a version folder is named by its version "
        "number, such as 1), so it is ignored; to serve it as version 3, rename it 3"
    )
    assert warning in reports["ignored_v3"].lines
    assert f"warning: {corpus / 'only_v3' / 'v3'}: not a version folder" in (
        reports["only_v3"].text
    )
    assert f"{folder}: not a version folder" in corpus_server.log()


def test_a_gpu_that_is_not_here_is_a_warning_about_this_environment(
    validated, corpus_server
) -> None:
    _, reports = validated
    report = reports["gpu_only"]
    [entry] = served(corpus_server)["gpu_only"]
    if report.status == "ok":  # a machine with a GPU: it loads
        assert entry["state"] == "READY"
        return
    assert report.lines[0] == "warning gpu_only: cannot load in this environment"
    assert "asks for GPU any, but this machine's visible GPUs are: none" in report.text
    assert entry["state"] == "UNAVAILABLE"
    assert "asks for GPU any, but this machine's visible GPUs are: none" in entry["reason"]


# --- what this environment lacks: a warning, exit status 0 ---------------------------------


@pytest.fixture
def without_torch(tmp_path: Path) -> dict[str, str]:
    """An environment where `import torch` fails, as where PyTorch is not installed."""
    fake = tmp_path / "no_torch"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    return {"PYTHONPATH": os.pathsep.join([str(fake), str(TESTS)])}


def test_torch_missing_is_a_warning_and_serve_says_how_to_get_it(
    tmp_path: Path, without_torch: dict[str, str], make_server: Callable[..., ServerProcess]
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "classifier_torch").symlink_to(EXAMPLES / "classifier_torch")
    write_model(root, "good_onnx", ONNX, {1: _onnx})
    _write(
        root,
        "torch_pipeline",
        _pipeline("{model: classifier_torch, inputs: {features: f}, outputs: {probabilities: p}}"),
        {},
    )
    result = run_validate(root, env=without_torch)
    assert result.returncode == 0, result.stdout + result.stderr
    reports = parse_report(result.stdout)
    assert reports["good_onnx"].status == "ok"
    torch_report = reports["classifier_torch"]
    assert torch_report.lines[0] == "warning classifier_torch: cannot load in this environment"
    assert "needs PyTorch: pip install 'tiffin[torch]'" in torch_report.text
    assert "classifier_torch/1/model.pt2" in torch_report.text
    assert reports["torch_pipeline"].status == "warning"
    assert "calls model 'classifier_torch'" in reports["torch_pipeline"].text
    assert result.stdout.splitlines()[-1] == "3 model(s), 0 problem(s), 2 warning(s)"

    index = served(make_server(root, env=without_torch))
    assert_agree(reports, index)
    [entry] = index["classifier_torch"]
    assert entry["state"] == "UNAVAILABLE"
    assert "needs PyTorch: pip install 'tiffin[torch]'" in entry["reason"]


def test_torch_installed_the_same_repository_is_ok(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    root = tmp_path / "models"
    root.mkdir()
    (root / "classifier_torch").symlink_to(EXAMPLES / "classifier_torch")
    result = run_validate(root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok      classifier_torch (version 1)" in result.stdout.splitlines()


def test_missing_torch_is_told_apart_from_a_broken_file(tmp_path: Path, monkeypatch) -> None:
    """read_model marks what the environment lacks; a broken file stays a problem."""
    (tmp_path / "m").symlink_to(EXAMPLES / "classifier_torch")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    spec = read_model(tmp_path / "m")
    assert spec.problems == []
    [lacking] = spec.environment_problems
    assert lacking.startswith(f"{tmp_path / 'm' / '1' / 'model.pt2'}: the torch backend needs")


def test_gpu_instances_with_cpu_only_frameworks(monkeypatch) -> None:
    """check_devices says what a GPU instance needs, as load would, without loading."""
    import onnxruntime

    from tiffin.backends.onnxruntime import OnnxRuntimeBackend
    from tiffin.protos.model_config import ModelConfig

    config = ModelConfig.model_validate({"name": "m"})
    OnnxRuntimeBackend.check_devices(config, [Device("cpu")])
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(MissingDependency, match=r"needs onnxruntime-gpu \(pip install"):
            OnnxRuntimeBackend.check_devices(config, [Device("gpu", 0)])
    torch = pytest.importorskip("torch")
    from tiffin.backends.torch import TorchBackend

    TorchBackend.check_devices(config, [Device("cpu")])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependency, match="torch.cuda.is_available"):
        TorchBackend.check_devices(config, [Device("gpu", 0)])


# --- model.py checked in a process of its own ---------------------------------------------


def test_model_py_import_is_bounded_and_kept_out_of_validate(tmp_path: Path, capsys) -> None:
    _python_model(tmp_path, "slow", "import time\ntime.sleep(60)\n")
    _python_model(tmp_path, "exits", "import sys\nsys.exit(3)\n")
    _python_model(tmp_path, "good", GOOD_MODEL_PY)
    # A thread model.py starts does not hold the check up once the class is found.
    _python_model(
        tmp_path,
        "threads",
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n"
        + GOOD_MODEL_PY,
    )
    _python_model(
        tmp_path,
        "named",
        GOOD_MODEL_PY,
        config=PYTHON + "parameters: {class_name: Triple}\n",
    )
    status = main(["validate", str(tmp_path), "--import-timeout", "3"])
    out = capsys.readouterr().out
    assert status == 1
    reports = parse_report(out)
    assert reports["good"].status == "ok"
    assert reports["threads"].status == "ok", reports["threads"].text
    assert "slow/1/model.py: importing it did not finish within 3 s" in reports["slow"].text
    assert "exits/1/model.py: importing it ended the process (exit status 3)" in (
        reports["exits"].text
    )
    assert "has no Backend subclass named 'Triple'" in reports["named"].text
    assert not [m for m in sys.modules if m.startswith("tiffin_check_")]  # nothing imported here


def test_help_lists_the_exit_statuses(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    out = capsys.readouterr().out
    assert "exit status:" in out
    for status in ("0  no problem found", "1  problems found", "2  the command line is wrong"):
        assert status in out
