"""The README's "Securing" example runs as written and prints what it says it prints.

Its blocks run in order in a fresh folder: the shell block that makes the certificates and
tokens (openssl, `serverctl token`), the `serverctl serve` line as a real server (its ports
replaced by free ones, the example repository's path made absolute), then the Python and
curl blocks against it, each compared with the ```text block after it as tests/test_readme.py
compares the tour's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from test_readme import matches

from conftest import EXAMPLES, ROOT, ServerProcess

MARK = "<!-- tests/test_readme_secure.py runs these blocks -->"
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def example_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index(MARK)
    end = text.index("\nFor mutual TLS", start)
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text[start:end])]


def test_the_example_is_where_this_test_looks() -> None:
    kinds = [kind for kind, _ in example_blocks()]
    assert kinds == ["sh", "sh", "python", "text", "sh", "text"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (Debian's openssl)")
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.skipif(shutil.which("serverctl") is None, reason="needs serverctl on PATH")
def test_securing_example(tmp_path: Path) -> None:
    make, serve, python, printed, curl, curled = (source for _, source in example_blocks())
    run = subprocess.run(["bash", "-e", "-c", make], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    args = shlex.split(serve.replace("\\\n", " "))
    assert args[:2] == ["serverctl", "serve"]
    assert args[2:4] == ["--model-repository", "examples/model_repository"]
    server = ServerProcess(
        EXAMPLES,
        *args[4:],
        env={"TIFFIN_MODEL_CONTROL_MODE": "none", "TIFFIN_LOAD_MODEL": ""},
        credentials=grpc.ssl_channel_credentials((tmp_path / "pki" / "ca.crt").read_bytes()),
        cwd=tmp_path,
    )
    try:
        grpc_port, http_port = server.url.rsplit(":")[1], server.http_url.rsplit(":")[1]
        source = python.replace("localhost:8001", f"localhost:{grpc_port}")
        out = subprocess.run(
            [sys.executable, "-c", source], cwd=tmp_path, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert matches(printed, out.stdout), out.stdout
        shell = curl.replace("localhost:8000", f"localhost:{http_port}")
        out = subprocess.run(
            ["bash", "-c", shell], cwd=tmp_path, capture_output=True, text=True, env=os.environ
        )
        assert matches(curled, out.stdout), out.stdout
    finally:
        assert server.stop() == 0, server.log()
