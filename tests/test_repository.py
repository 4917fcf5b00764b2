"""Reading a model repository (tiffin.server.repository) and `serverctl validate`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from models import identity, write_model
from tiffin.server.cli import main
from tiffin.server.repository import ModelSpec, read_model, read_repository


def fp32(shape: list) -> Callable[[Path], Path]:
    """A builder for an FP32 identity model with the given ONNX shape."""
    return lambda path: identity(path, "FP32", shape)


VARIABLE = fp32(["batch", 4])  # first dimension variable: batchable
FIXED = fp32([2, 4])  # first dimension fixed: not batchable

GOOD_CONFIG = """\
backend: onnxruntime
max_batch_size: 8
inputs:
  - {name: INPUT0, datatype: FP32, dims: [4]}
outputs:
  - {name: OUTPUT0, datatype: FP32, dims: [4]}
"""


def validate(capsys: pytest.CaptureFixture[str], repo: Path) -> tuple[int, str]:
    status = main(["validate", str(repo)])
    return status, capsys.readouterr().out


def only(specs: list[ModelSpec]) -> ModelSpec:
    assert len(specs) == 1, [s.name for s in specs]
    return specs[0]


def problem_of(repo: Path, name: str) -> str:
    """The one problem read_model reports for repo/name."""
    problems = read_model(repo / name).problems
    assert len(problems) == 1, problems
    return problems[0]


# --- a good repository ---------------------------------------------------------------------


def test_good_repository_reads_completed_configs(tmp_path: Path) -> None:
    write_model(tmp_path, "identity", GOOD_CONFIG, {1: VARIABLE})
    spec = only(read_repository(tmp_path))
    assert spec.name == "identity"
    assert spec.problems == []
    [version] = spec.versions
    assert version.version == 1
    assert version.path == tmp_path / "identity" / "1"
    c = version.config
    assert c is not None
    assert (c.name, c.backend, c.max_batch_size) == ("identity", "onnxruntime", 8)
    assert [(t.name, t.datatype, t.dims) for t in c.inputs] == [("INPUT0", "FP32", [4])]
    assert [(t.name, t.datatype, t.dims) for t in c.outputs] == [("OUTPUT0", "FP32", [4])]


def test_validate_good_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_model(tmp_path, "alpha", GOOD_CONFIG, {1: VARIABLE})
    write_model(tmp_path, "beta", "backend: onnxruntime\n", {1: FIXED, 2: FIXED})
    status, out = validate(capsys, tmp_path)
    assert status == 0, out
    lines = out.splitlines()
    assert "ok      alpha (version 1)" in lines
    assert "ok      beta (version 2)" in lines
    assert lines[-1] == "2 model(s), 0 problem(s)"
    assert "broken" not in out


def test_hidden_and_underscore_folders_and_files_are_skipped(tmp_path: Path) -> None:
    write_model(tmp_path, "identity", GOOD_CONFIG, {1: VARIABLE})
    (tmp_path / ".git").mkdir()
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "README.md").write_text("models")
    assert [s.name for s in read_repository(tmp_path)] == ["identity"]


def test_models_are_sorted_by_name(tmp_path: Path) -> None:
    for name in ["zeta", "alpha", "mid"]:
        write_model(tmp_path, name, "backend: onnxruntime\n", {1: VARIABLE})
    assert [s.name for s in read_repository(tmp_path)] == ["alpha", "mid", "zeta"]


def test_repository_that_is_not_a_folder(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        read_repository(missing)
    status, out = validate(capsys, missing)
    assert status == 1
    assert f"error: model repository {missing} is not a folder" in out


def test_empty_repository_fails_validation(tmp_path: Path, capsys) -> None:
    status, out = validate(capsys, tmp_path)
    assert status == 1
    assert "holds no model folders" in out


# --- one problem per case ------------------------------------------------------------------


def test_typo_in_field_names_file_and_field_path(tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "m",
        "backend: onnxruntime\ninputs:\n  - {name: INPUT0, datatype: FP32, dimz: [4]}\n",
        {1: VARIABLE},
    )
    spec = read_model(tmp_path / "m")
    assert spec.versions == []
    config_file = tmp_path / "m" / "config.yaml"
    lines = spec.error.splitlines()
    assert f"{config_file}: inputs[0].dims: required field is missing" in lines
    assert any(line.startswith(f"{config_file}: inputs[0].dimz: unknown field") for line in lines)


def test_typo_with_triton_key_names_the_key_written(tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "m",
        "backend: onnxruntime\ninput:\n  - {name: INPUT0, data_type: TYPE_FP32, dims: [-2]}\n",
        {1: VARIABLE},
    )
    error = problem_of(tmp_path, "m")
    assert f"{tmp_path / 'm' / 'config.yaml'}: input[0].dims: " in error
    assert "got -2" in error


def test_top_level_typo(tmp_path: Path) -> None:
    write_model(tmp_path, "m", "backend: onnxruntime\nmax_batch_sise: 4\n", {1: VARIABLE})
    error = problem_of(tmp_path, "m")
    assert error.startswith(f"{tmp_path / 'm' / 'config.yaml'}: max_batch_sise: unknown field")


def test_yaml_syntax_error(tmp_path: Path) -> None:
    write_model(tmp_path, "m", "backend: onnxruntime\ninputs: [\n  - {name: x\n", {1: VARIABLE})
    error = problem_of(tmp_path, "m")
    assert error.startswith(f"{tmp_path / 'm' / 'config.yaml'}: not valid YAML")
    assert "line" in error  # the parser's position, so the user can find it


def test_config_that_is_not_a_mapping(tmp_path: Path) -> None:
    write_model(tmp_path, "m", "- backend\n- onnxruntime\n", {1: VARIABLE})
    error = problem_of(tmp_path, "m")
    assert "expected a mapping of fields, got list" in error


def test_config_missing(tmp_path: Path) -> None:
    VARIABLE(tmp_path / "m" / "1" / "model.onnx")
    error = problem_of(tmp_path, "m")
    assert (
        error == f"{tmp_path / 'm' / 'config.yaml'}: file not found (every model folder needs one)"
    )


def test_no_version_folders(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", GOOD_CONFIG, {})
    VARIABLE(folder / "model.onnx")  # beside config.yaml instead of in 1/
    (folder / "latest").mkdir()  # not a number: not a version
    error = problem_of(tmp_path, "m")
    assert f"{folder}: no version folders" in error
    assert str(folder / "1") in error


def test_model_file_missing_in_a_version(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", GOOD_CONFIG + "version_policy: {all: {}}\n", {1: VARIABLE})
    (folder / "2").mkdir()
    spec = read_model(folder)
    assert spec.error == ""
    assert [(v.version, v.config is not None) for v in spec.versions] == [(1, True), (2, False)]
    assert spec.problems == [f"{folder / '2' / 'model.onnx'}: model file not found"]


def test_declared_datatype_disagrees_with_model(tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "m",
        GOOD_CONFIG.replace("INPUT0, datatype: FP32", "INPUT0, datatype: INT32"),
        {1: VARIABLE},
    )
    error = problem_of(tmp_path, "m")
    assert error.startswith(f"{tmp_path / 'm' / 'config.yaml'} (version 1): ")
    assert "input 'INPUT0' is declared INT32 but the model has FP32" in error


def test_declared_dims_disagree_with_model(tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "m",
        GOOD_CONFIG.replace(
            "OUTPUT0, datatype: FP32, dims: [4]", "OUTPUT0, datatype: FP32, dims: [5]"
        ),
        {1: VARIABLE},
    )
    error = problem_of(tmp_path, "m")
    assert error.startswith(f"{tmp_path / 'm' / 'config.yaml'} (version 1): ")
    assert "output 'OUTPUT0' is declared with dims [5]" in error
    assert "[-1, 4]" in error  # the model's own shape


def test_declared_rank_disagrees_with_model(tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "m",
        GOOD_CONFIG.replace(
            "INPUT0, datatype: FP32, dims: [4]", "INPUT0, datatype: FP32, dims: [4, 1]"
        ),
        {1: VARIABLE},
    )
    assert "input 'INPUT0' is declared with dims [4, 1]" in problem_of(tmp_path, "m")


def test_declared_input_missing_from_model(tmp_path: Path) -> None:
    config = GOOD_CONFIG.replace(
        "outputs:", "  - {name: INPUT1, datatype: FP32, dims: [4]}\noutputs:"
    )
    write_model(tmp_path, "m", config, {1: VARIABLE})
    error = problem_of(tmp_path, "m")
    assert "input 'INPUT1' is not in the model; the model's inputs are INPUT0" in error


def test_name_does_not_match_folder(tmp_path: Path) -> None:
    write_model(tmp_path, "m", "name: other\n" + GOOD_CONFIG, {1: VARIABLE})
    error = problem_of(tmp_path, "m")
    assert error == (
        f"{tmp_path / 'm' / 'config.yaml'}: name: 'other' does not match the folder name 'm'"
    )


def test_matching_name_accepted(tmp_path: Path) -> None:
    write_model(tmp_path, "m", "name: m\n" + GOOD_CONFIG, {1: VARIABLE})
    assert read_model(tmp_path / "m").problems == []


def test_unknown_backend(tmp_path: Path) -> None:
    write_model(tmp_path, "m", GOOD_CONFIG.replace("onnxruntime", "tensorflow"), {1: VARIABLE})
    error = problem_of(tmp_path, "m")
    assert error.startswith(f"{tmp_path / 'm' / 'config.yaml'}: backend: ")
    assert "unknown backend 'tensorflow'; available: onnxruntime" in error


def test_backend_from_platform_and_from_file_extension(tmp_path: Path) -> None:
    write_model(tmp_path, "by_platform", "platform: onnxruntime_onnx\n", {1: VARIABLE})
    write_model(tmp_path, "by_file", "max_batch_size: 2\n", {1: VARIABLE})
    for spec in read_repository(tmp_path):
        assert spec.problems == []
        assert spec.versions[0].config.backend == "onnxruntime"


def test_max_batch_size_on_fixed_first_dim(tmp_path: Path) -> None:
    write_model(tmp_path, "m", "backend: onnxruntime\nmax_batch_size: 8\n", {1: FIXED})
    error = problem_of(tmp_path, "m")
    assert "max_batch_size is 8" in error
    assert "INPUT0" in error and "OUTPUT0" in error
    assert "set max_batch_size: 0" in error


def test_preferred_batch_size_checked_against_completed_max_batch_size(tmp_path: Path) -> None:
    # max_batch_size is left out and completed to 4 from the file; a preferred size of 64
    # can never be formed and must be reported, as it is when max_batch_size is written.
    write_model(
        tmp_path,
        "m",
        "backend: onnxruntime\ndynamic_batching: {preferred_batch_size: [64]}\n",
        {1: VARIABLE},
    )
    error = problem_of(tmp_path, "m")
    assert "preferred_batch_size 64" in error
    assert "(4)" in error


# --- auto-completion and versions ---------------------------------------------------------


def test_auto_complete_variable_first_dim(tmp_path: Path) -> None:
    write_model(tmp_path, "m", "backend: onnxruntime\n", {1: fp32(["batch", 3, "w"])})
    [version] = read_model(tmp_path / "m").versions
    c = version.config
    assert c is not None, version.error
    assert c.max_batch_size == 4
    assert c.name == "m"
    assert c.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, t.dims) for t in c.inputs] == [("INPUT0", "FP32", [3, -1])]
    assert [(t.name, t.datatype, t.dims) for t in c.outputs] == [("OUTPUT0", "FP32", [3, -1])]


def test_auto_complete_fixed_first_dim(tmp_path: Path) -> None:
    write_model(tmp_path, "m", "backend: onnxruntime\n", {1: FIXED})
    [version] = read_model(tmp_path / "m").versions
    c = version.config
    assert c is not None, version.error
    assert c.max_batch_size == 0
    assert [(t.name, t.datatype, t.dims) for t in c.inputs] == [("INPUT0", "FP32", [2, 4])]
    assert [(t.name, t.datatype, t.dims) for t in c.outputs] == [("OUTPUT0", "FP32", [2, 4])]


def test_auto_complete_other_datatype(tmp_path: Path) -> None:
    write_model(
        tmp_path, "m", "backend: onnxruntime\n", {1: lambda p: identity(p, "BYTES", ["batch", 2])}
    )
    c = read_model(tmp_path / "m").versions[0].config
    assert [(t.name, t.datatype, t.dims) for t in c.inputs] == [("INPUT0", "BYTES", [2])]


def test_explicit_max_batch_size_zero_keeps_the_variable_dim(tmp_path: Path) -> None:
    write_model(tmp_path, "m", "backend: onnxruntime\nmax_batch_size: 0\n", {1: VARIABLE})
    c = read_model(tmp_path / "m").versions[0].config
    assert c.max_batch_size == 0
    assert c.inputs[0].dims == [-1, 4]


def test_declared_outputs_only_completes_the_inputs(tmp_path: Path) -> None:
    config = "backend: onnxruntime\noutputs: [{name: OUTPUT0, datatype: FP32, dims: [4]}]\n"
    write_model(tmp_path, "m", config, {1: VARIABLE})
    c = read_model(tmp_path / "m").versions[0].config
    assert [(t.name, t.datatype, t.dims) for t in c.outputs] == [("OUTPUT0", "FP32", [4])]
    assert [(t.name, t.datatype, t.dims) for t in c.inputs] == [("INPUT0", "FP32", [4])]


def test_declared_dims_may_pin_a_variable_model_dim(tmp_path: Path) -> None:
    config = (
        "backend: onnxruntime\n"
        "inputs: [{name: INPUT0, datatype: FP32, dims: [7]}]\n"
        "outputs: [{name: OUTPUT0, datatype: FP32, dims: [7]}]\n"
    )
    write_model(tmp_path, "m", config, {1: fp32(["batch", "width"])})
    c = read_model(tmp_path / "m").versions[0].config
    assert c is not None
    assert c.inputs[0].dims == [7]  # the user's stricter declaration stands
    assert c.max_batch_size == 4


def test_declared_variable_dim_where_model_is_fixed_rejected(tmp_path: Path) -> None:
    # As in Triton: the config may not loosen a dimension the model fixes.
    config = "backend: onnxruntime\noutputs: [{name: OUTPUT0, datatype: FP32, dims: [-1]}]\n"
    write_model(tmp_path, "m", config, {1: VARIABLE})
    assert "output 'OUTPUT0' is declared with dims [-1]" in problem_of(tmp_path, "m")


def test_version_policy_latest_two(tmp_path: Path, capsys) -> None:
    write_model(
        tmp_path,
        "m",
        "backend: onnxruntime\nversion_policy: {latest: {num_versions: 2}}\n",
        {1: VARIABLE, 2: VARIABLE, 3: VARIABLE},
    )
    spec = read_model(tmp_path / "m")
    assert [v.version for v in spec.versions] == [2, 3]
    assert all(v.config is not None for v in spec.versions)
    status, out = validate(capsys, tmp_path)
    assert status == 0
    assert "ok      m (version 2, 3)" in out.splitlines()


def test_default_policy_serves_the_newest_version_numerically(tmp_path: Path) -> None:
    write_model(tmp_path, "m", "backend: onnxruntime\n", {2: VARIABLE, 10: VARIABLE})
    assert [v.version for v in read_model(tmp_path / "m").versions] == [10]


def test_policy_selecting_nothing(tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "m",
        "backend: onnxruntime\nversion_policy: {specific: {versions: [7]}}\n",
        {1: VARIABLE, 2: VARIABLE},
    )
    error = problem_of(tmp_path, "m")
    assert "version_policy: selects none of the versions found (1, 2)" in error


def test_unselected_versions_are_not_read(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", "backend: onnxruntime\n", {2: VARIABLE})
    (folder / "1").mkdir()  # an old, empty version: not served, so not a problem
    spec = read_model(folder)
    assert spec.problems == []
    assert [v.version for v in spec.versions] == [2]


# --- every problem, and the exit status ----------------------------------------------------


def broken_repository(repo: Path) -> dict[str, str]:
    """A repository with one good model and several broken ones -> a phrase of each problem."""
    write_model(repo, "good", GOOD_CONFIG, {1: VARIABLE})
    write_model(repo, "typo", "backend: onnxruntime\nmax_batch_sise: 4\n", {1: VARIABLE})
    write_model(repo, "yaml", "backend: [onnxruntime\n", {1: VARIABLE})
    VARIABLE(repo / "noconfig" / "1" / "model.onnx")
    write_model(repo, "noversions", GOOD_CONFIG, {})
    write_model(
        repo,
        "wrongtype",
        GOOD_CONFIG.replace("INPUT0, datatype: FP32", "INPUT0, datatype: INT64"),
        {1: VARIABLE},
    )
    write_model(repo, "fixedbatch", "backend: onnxruntime\nmax_batch_size: 8\n", {1: FIXED})
    folder = write_model(
        repo,
        "twoversions",
        GOOD_CONFIG.replace("dims: [4]}\noutputs", "dims: [9]}\noutputs")
        + "version_policy: {all: {}}\n",
        {1: VARIABLE},
    )
    (folder / "2").mkdir()  # version 1 has wrong dims, version 2 has no model file
    return {
        "typo": "max_batch_sise: unknown field",
        "yaml": "not valid YAML",
        "noconfig": "config.yaml: file not found",
        "noversions": "no version folders",
        "wrongtype": "declared INT64 but the model has FP32",
        "fixedbatch": "max_batch_size is 8",
        "twoversions (version 1)": "declared with dims [9]",
        "twoversions (version 2)": "2/model.onnx: model file not found",
    }


def test_validate_lists_every_problem(tmp_path: Path, capsys) -> None:
    expected = broken_repository(tmp_path)
    status, out = validate(capsys, tmp_path)
    assert status == 1
    lines = out.splitlines()
    assert "ok      good (version 1)" in lines
    for model in [
        "typo",
        "yaml",
        "noconfig",
        "noversions",
        "wrongtype",
        "fixedbatch",
        "twoversions",
    ]:
        assert f"broken  {model}" in lines, out
    for what, phrase in expected.items():
        assert phrase in out, f"{what}: {phrase!r} missing from:\n{out}"
    assert lines[-1] == f"8 model(s), {len(expected)} problem(s)"


def test_validate_reports_independent_problems_of_one_model(tmp_path: Path, capsys) -> None:
    # A wrong name and an unknown backend are unrelated: one run should show both,
    # so the user does not fix one, rerun, and only then learn of the other.
    write_model(tmp_path, "m", "name: other\nbackend: tensorflow\n", {1: VARIABLE})
    status, out = validate(capsys, tmp_path)
    assert status == 1
    assert "does not match the folder name 'm'" in out
    assert "unknown backend 'tensorflow'" in out


@pytest.mark.parametrize("broken", [False, True], ids=["good", "broken"])
def test_serverctl_validate_exit_status(tmp_path: Path, broken: bool) -> None:
    if broken:
        broken_repository(tmp_path)
    else:
        write_model(tmp_path, "good", GOOD_CONFIG, {1: VARIABLE})
    proc = subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", "validate", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == (1 if broken else 0), proc.stdout + proc.stderr
    assert "ok      good (version 1)" in proc.stdout
    if broken:
        assert "broken  typo" in proc.stdout
        assert "8 model(s), 8 problem(s)" in proc.stdout
    else:
        assert "1 model(s), 0 problem(s)" in proc.stdout


@pytest.mark.parametrize(
    "line, expected",
    [
        (
            "inputs: [{name: x, datatype: FP32, dims: 4}]",
            "inputs[0].dims: is 4, but it must be a list",
        ),
        (
            "inputs: [{name: x, datatype: FP32, dims: [abc]}]",
            "inputs[0].dims[0]: is 'abc', but it must be a whole number",
        ),
        ("max_batch_size: lots", "max_batch_size: is 'lots', but it must be a whole number"),
    ],
)
def test_config_type_errors_say_what_is_expected(tmp_path: Path, line: str, expected: str) -> None:
    """A wrong type in config.yaml reads as the value and what it must be, not pydantic's
    'Input should be a valid list'."""
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.yaml").write_text(f"backend: onnxruntime\n{line}\n")
    spec = read_model(tmp_path / "m")
    assert expected in spec.error, spec.error
    assert "Input should be" not in spec.error
