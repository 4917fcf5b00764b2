"""The server's log: JSON lines (--log-format json), the sampled access log, no secrets.

Real `serverctl serve` processes; their log is what they wrote to stderr.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess
from models import value_input, write_repository

ECHO = """
backend: toy_backends:Echo
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [1]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [1]}]
instance_group: [{kind: inline}]
"""
TOKEN = "secret-token-123"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("logs") / "models", {"echo": ECHO})


def test_json_lines_with_an_access_line_per_request_and_no_token(repository: Path) -> None:
    """Every line is a JSON object with timestamp (ISO 8601, UTC), level, logger and
    message; each answered call has an access line with its request id, model, version,
    status and latency; the bearer token a client sent (to a server that does not
    authenticate) appears nowhere, nor do tensor values."""
    server = ServerProcess(repository, "--log-format", "json", "--access-log-sample", "1")
    headers = {"authorization": f"Bearer {TOKEN}"}
    with grpcclient.InferenceServerClient(server.url) as client:
        for i in range(3):
            client.infer("echo", [value_input(123456.75)], request_id=f"req-{i}", headers=headers)
        with pytest.raises(InferenceServerException):
            client.infer("no_such_model", [value_input(1.0)], request_id="lost", headers=headers)
    tensor = httpclient.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[123456.75]], np.float32))
    with httpclient.InferenceServerClient(server.http_url) as client:
        client.infer("echo", [tensor], request_id="rest-1", headers=headers)
    assert server.stop() == 0
    text = server.log_path.read_text()

    assert TOKEN not in text
    assert "123456" not in text  # tensors are never logged
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    for line in lines:
        assert {"timestamp", "level", "logger", "message"} <= line.keys(), line
        stamp = datetime.fromisoformat(line["timestamp"])
        assert stamp.utcoffset() == timedelta(0)
    assert any(line["message"].startswith("serving 1 of 1 model") for line in lines)
    access = [line for line in lines if line["logger"] == "tiffin.access"]
    by_id = {line["request_id"]: line for line in access if line["request_id"]}
    assert {"req-0", "req-1", "req-2", "rest-1"} <= by_id.keys()
    ok = by_id["req-1"]
    assert (ok["model"], ok["version"], ok["status"], ok["protocol"]) == ("echo", "1", "OK", "grpc")
    assert ok["level"] == "INFO" and ok["latency_ms"] > 0
    # Refused before its request was read further (so without its id): still logged.
    (lost,) = [line for line in access if line["model"] == "no_such_model"]
    assert (lost["version"], lost["status"]) == ("", "INVALID_ARGUMENT")  # as Triton
    assert by_id["rest-1"]["protocol"] == "rest" and by_id["rest-1"]["status"] == "OK"
    # Health probes (the fixture's readiness checks, the clients' own) are not access-logged.
    assert all(line["operation"] not in ("live", "ready") for line in access)


def test_access_log_is_sampled(repository: Path) -> None:
    """--access-log-sample 0.25: about a quarter of 200 calls are logged (as text lines)."""
    server = ServerProcess(repository, "--access-log-sample", "0.25")
    with grpcclient.InferenceServerClient(server.url) as client:
        for i in range(200):
            client.infer("echo", [value_input(float(i))])
    assert server.stop() == 0
    logged = [
        line
        for line in server.log_path.read_text().splitlines()
        if " tiffin.access: grpc infer " in line
    ]
    # Binomial(200, 0.25): mean 50, standard deviation 6.1; this fails once in ~10^8 runs.
    assert 15 <= len(logged) <= 90, len(logged)
    assert "model=echo version=1 status=OK latency_ms=" in logged[0]


def test_bad_log_format_is_refused_naming_the_flag(repository: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiffin.server.cli",
            "serve",
            "--model-repository",
            str(repository),
            "--log-format",
            "yaml",
            "--access-log-sample",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--log-format is 'yaml', but it must be one of text or json." in result.stderr
    assert "--access-log-sample is '2', but it must be a number from 0 to 1." in result.stderr
