"""serverctl as a user meets it: errors are sentences naming the flag or variable (usage
errors exit 2), no traceback, quiet when a pipe closes early, and --version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import write_repository

SERVERCTL = [sys.executable, "-m", "tiffin.server.cli"]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "model_repository"


def serverctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SERVERCTL, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "flags, env, expected",
    [
        (
            ["--grpc-port", "abc"],
            {},
            "--grpc-port is 'abc', but it must be a whole number from 0 to 65535.",
        ),
        (
            ["--http-port=70000"],
            {},
            "--http-port is '70000', but it must be a whole number from 0 to 65535.",
        ),
        (
            [],
            {"TIFFIN_GRPC_PORT": "notaport"},
            "TIFFIN_GRPC_PORT (the environment variable for --grpc-port) is 'notaport', "
            "but it must be a whole number from 0 to 65535.",
        ),
        (
            ["--stream-idle-timeout-seconds", "soon"],
            {},
            "--stream-idle-timeout-seconds is 'soon', but it must be a number of at least 0.",
        ),
        (
            ["--max-message-bytes", "10"],
            {},
            "--max-message-bytes is '10', but it must be 0 (automatic) or at least 1024 bytes.",
        ),
        (["--max-streams", "300"], {}, "--max-streams (300) must be below --grpc-threads (256)"),
    ],
)
def test_bad_settings_are_one_sentence_and_exit_2(flags, env, expected) -> None:
    result = serverctl("serve", "--model-repository", str(EXAMPLES), *flags, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("serverctl serve: error: "), result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_an_unknown_flag_is_a_usage_error() -> None:
    result = serverctl("serve", "--model-repository", str(EXAMPLES), "--grpc-prot", "1")
    assert result.returncode == 2
    assert "unrecognized arguments: --grpc-prot" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_repository_is_a_sentence() -> None:
    result = serverctl("serve", "--model-repository", "/nonexistent/models", "--grpc-port", "0")
    assert result.returncode == 1
    assert "model repository /nonexistent/models is not a folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_pipe_closed_early_is_quiet(tmp_path: Path) -> None:
    """`serverctl validate REPO | head -1`: once the reader is gone, no BrokenPipeError."""
    for i in range(1500):  # enough output to outgrow the pipe's buffer
        (tmp_path / f"model_{i:04d}").mkdir()
    process = subprocess.Popen(
        [*SERVERCTL, "validate", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.readline()
    process.stdout.close()  # what head does after its line
    stderr = process.stderr.read()
    process.wait(60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_version_names_tiffin_python_and_the_frameworks() -> None:
    result = serverctl("--version")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tiffin ")
    assert lines[1].startswith(f"Python {sys.version.split()[0]}")
    assert any(line.startswith("onnxruntime ") for line in lines)
    assert any(line.startswith("torch ") for line in lines)  # a version, or "not installed"


AUTO = """
backend: toy_backends:Echo
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [1]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [1]}]
instance_group: [{kind: auto}]
"""


def test_no_gpu_is_said_once_per_process(make_server, tmp_path: Path) -> None:
    """Several `kind: auto` models on a machine without a GPU: one line, not one each."""
    from tiffin.scheduler.devices import visible_gpus

    if visible_gpus():
        pytest.skip("this machine has a GPU: auto instances use it")
    server = make_server(write_repository(tmp_path / "models", {"a": AUTO, "b": AUTO, "c": AUTO}))
    log = server.log()
    assert log.count("no GPU available: instances of kind auto run on the CPU") == 1, log


def test_a_repeated_flag_replaces_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--load-model a` with TIFFIN_LOAD_MODEL=* loads a, not every model."""
    import argparse

    from tiffin.server.settings import add_settings_arguments

    monkeypatch.setenv("TIFFIN_LOAD_MODEL", "*,b")
    monkeypatch.setenv("TIFFIN_MODEL_REPOSITORY", "models")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    assert parser.parse_args([]).load_model == ["*", "b"]
    assert parser.parse_args(["--load-model", "a"]).load_model == ["a"]
    assert parser.parse_args(["--load-model", "a", "--load-model", "c"]).load_model == ["a", "c"]
