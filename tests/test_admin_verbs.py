"""`serverctl models`, `load`, `unload` and `traffic` against a running server, over TLS with
tokens: tables and JSON, refusals as sentences with a non-zero exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
from certificates import Authority
from test_security import TOKENS, token_file

from models import ECHO, write_repository

MODEL = ECHO + "version_policy: {all: {}}\n"


def serverctl(*args: str, token: str | None = None, folder: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TIFFIN_TOKEN"}
    if token is not None:
        (folder / "token").write_text(TOKENS[token] + "\n")
        args = (*args, "--token-file", str(folder / "token"))
    return subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_admin_verbs_over_tls_with_tokens(make_server, tmp_path: Path) -> None:
    repo = write_repository(tmp_path / "repo", {"echo": MODEL, "other": MODEL})
    (repo / "echo" / "2").mkdir()
    ca = Authority(tmp_path / "pki")
    cert = ca.issue("server", "localhost", server=True)
    server = make_server(
        repo,
        *(
            "--grpc-use-ssl",
            "--grpc-server-cert",
            str(cert.cert),
            "--grpc-server-key",
            str(cert.key),
        ),
        *("--auth-token-file", str(token_file(tmp_path))),
        env={"TIFFIN_MODEL_CONTROL_MODE": "none", "TIFFIN_LOAD_MODEL": ""},
        credentials=grpc.ssl_channel_credentials(ca.cert.read_bytes()),
    )
    remote = ("--url", server.url, "--ssl", "--root-cert", str(ca.cert))

    listed = serverctl("models", *remote, "--json", token="reader", folder=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {(r["model"], r["version"], r["state"]) for r in rows} == {
        ("echo", "1", "READY"), ("echo", "2", "READY"), ("other", "1", "READY"),
    }  # fmt: skip
    table = serverctl("models", *remote, token="reader", folder=tmp_path)
    assert table.returncode == 0 and "READY" in table.stdout and "other" in table.stdout

    refused = serverctl("unload", "other", *remote, token="reader", folder=tmp_path)
    assert refused.returncode == 1
    assert "unload needs the 'admin' role, which 'reader' lacks" in refused.stderr
    assert TOKENS["reader"] not in refused.stderr + refused.stdout

    missing = serverctl("models", *remote, folder=tmp_path)
    assert missing.returncode == 1 and "UNAUTHENTICATED" in missing.stderr

    assert serverctl("unload", "other", *remote, token="ops", folder=tmp_path).returncode == 0
    assert serverctl("load", "other", *remote, token="ops", folder=tmp_path).returncode == 0
    split = serverctl("traffic", "echo", "1=0", "2=100", *remote, token="ops", folder=tmp_path)
    assert split.returncode == 0, split.stderr
    assert "traffic for 'echo': 1=0, 2=100" in split.stdout
    listed = serverctl("models", *remote, "--json", token="reader", folder=tmp_path)
    rows = {(r["model"], r["version"]): r for r in json.loads(listed.stdout)}
    assert rows[("echo", "1")]["traffic"] == "0" and rows[("echo", "2")]["traffic"] == "100"
    assert rows[("other", "1")]["traffic"] == "" and rows[("other", "1")]["instances"]

    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url, ssl=True, root_certificates=str(ca.cert))
    tensor = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 2), np.float32))
    headers = {"authorization": f"Bearer {TOKENS['alice']}"}
    versions = {
        client.infer("echo", [tensor], headers=headers).get_response().model_version
        for _ in range(20)
    }
    assert versions == {"2"}

    bad = serverctl("traffic", "echo", "1=50", "3=50", *remote, token="ops", folder=tmp_path)
    assert bad.returncode == 1 and "names version 3, which is not loaded" in bad.stderr
    usage = serverctl("traffic", "echo", "one=50", *remote, token="ops", folder=tmp_path)
    assert usage.returncode == 2 and "is not VERSION=WEIGHT" in usage.stderr
