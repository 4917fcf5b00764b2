"""Triton's load overrides against a real server: a model sent in the load call (config and
files) serves without the repository being written; a config alone replaces config.yaml for
the repository's files; code is never taken over the wire; paths and forms are checked."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from models import ECHO, identity, write_repository

UPLOADED = {
    "backend": "onnxruntime",
    "max_batch_size": 8,
    "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
    "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
}


@pytest.fixture
def server(make_server, tmp_path: Path):
    repo = write_repository(tmp_path / "repo", {"echo": ECHO})
    return make_server(repo), repo


def onnx_bytes(tmp_path: Path) -> bytes:
    return identity(tmp_path / "model.onnx").read_bytes()


def four(value: float) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), value, np.float32))
    return [tensor]


def test_a_model_sent_with_the_load_serves(server, tmp_path: Path) -> None:
    process, repo = server
    client = grpcclient.InferenceServerClient(process.url)
    client.load_model(
        "uploaded",
        config=json.dumps(UPLOADED),
        files={"file:1/model.onnx": onnx_bytes(tmp_path)},
    )
    result = client.infer("uploaded", four(3.0))
    assert result.as_numpy("OUTPUT0").tolist() == [[3.0] * 4]
    assert not (repo / "uploaded").exists(), "the repository was written"
    # Sent again with another config: swapped like any reload.
    client.load_model(
        "uploaded",
        config=json.dumps({**UPLOADED, "max_batch_size": 2}),
        files={"file:1/model.onnx": onnx_bytes(tmp_path)},
    )
    assert client.get_model_config("uploaded").config.max_batch_size == 2
    client.unload_model("uploaded")


def test_a_config_alone_replaces_config_yaml(server) -> None:
    process, repo = server
    client = grpcclient.InferenceServerClient(process.url)
    before = (repo / "echo" / "config.yaml").read_text()
    override = {
        "backend": "toy_backends:Echo",
        "max_batch_size": 4,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [2]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [2]}],
        "instance_group": [{"kind": "KIND_CPU"}],
    }
    client.load_model("echo", config=json.dumps(override))
    assert client.get_model_config("echo").config.max_batch_size == 4
    assert (repo / "echo" / "config.yaml").read_text() == before
    # A plain reload goes back to the repository's config.
    client.load_model("echo")
    assert client.get_model_config("echo").config.max_batch_size == 8


@pytest.mark.parametrize(
    ("config", "files", "fragment"),
    [
        (None, {"file:1/model.onnx": b"x"}, "need a 'config' parameter too"),
        (
            {**UPLOADED, "backend": "python"},
            {"file:1/model.py": b"import os"},
            "not taken over the wire",
        ),
        ({"max_batch_size": 1}, {"file:1/model.onnx": b"x"}, "names backend onnxruntime"),
        (UPLOADED, {"file:1/../../escape.onnx": b"x"}, "name part '..'"),
        (UPLOADED, {"file:one/model.onnx": b"x"}, "must be file:<version>/<name>"),
        (UPLOADED, {"file:1/a b.onnx": b"x"}, "is not letters, digits"),
        (UPLOADED, {"file:1/model.onnx": b"not an onnx file"}, "failed to load 'sent'"),
    ],
)
def test_bad_overrides_are_refused(server, tmp_path: Path, config, files, fragment) -> None:
    process, repo = server
    client = grpcclient.InferenceServerClient(process.url)
    with pytest.raises(InferenceServerException) as refused:
        client.load_model(
            "sent", config=json.dumps(config) if config is not None else None, files=files
        )
    assert fragment in refused.value.message(), refused.value.message()
    assert not (tmp_path / "escape.onnx").exists() and not (repo / "sent").exists()


def test_rest_takes_files_as_base64(server, tmp_path: Path) -> None:
    process, _ = server
    body = {
        "parameters": {
            "config": json.dumps(UPLOADED),
            "file:1/model.onnx": base64.b64encode(onnx_bytes(tmp_path)).decode(),
        }
    }
    request = urllib.request.Request(
        f"http://{process.http_url}/v2/repository/models/viarest/load",
        data=json.dumps(body).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200
    client = grpcclient.InferenceServerClient(process.url)
    assert client.infer("viarest", four(1.5)).as_numpy("OUTPUT0").tolist() == [[1.5] * 4]
    bad = {"parameters": {"config": json.dumps(UPLOADED), "file:1/model.onnx": "%%%"}}
    request = urllib.request.Request(
        f"http://{process.http_url}/v2/repository/models/viarest/load",
        data=json.dumps(bad).encode(),
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400 and b"is not base64" in refused.value.read()
