"""Peer servers, measured beside Tiffin by `python -m benchmarks run --side-by-side`.

Each peer serves version 1 of the benchmark repository's ONNX files, is pinned with
`taskset -c` to the server cpus like Tiffin, and is stopped with SIGTERM:

  fastapi   FastAPI + uvicorn, one `def` endpoint per model taking the raw FP32 body of one
            item and answering the output's raw bytes; onnxruntime per request, one intra-op
            thread (fastapi_app.py). Driven by the `raw_http` client.
  mlserver  MLServer 1.7 with a custom onnxruntime runtime (mlserver_runtime.py),
            parallel_workers 0, adaptive batching (max_batch_size 32, max_batch_time 3 ms),
            over its v2 gRPC. Driven by the `lean` client (MLServer accepts
            raw_input_contents and then answers with raw_output_contents).
  bentoml   BentoML 1.4, one service with a batchable API per model (max_batch_size 32),
            JSON in and out as BentoML's ndarray arguments take it (bentoml_service.py).
            Driven by the `json_http` client.

MLServer pins protobuf and grpcio versions of its own, so the peers run from their own
virtual environment, `benchmarks/.peers-venv` (`python -m benchmarks peers-setup`); BentoML,
whose protobuf and OpenTelemetry pins clash with MLServer's, from
`benchmarks/.peers-venv-bentoml`. The FastAPI peer also runs from the main environment when
fastapi and uvicorn are installed there (the `bench` and `test` extras bring them). A peer
that cannot run raises `PeerUnavailable`, whose message says how to set it up.

This module is the interface (start a peer, pinned, for a repository and models; a
`servers.ServerProcess` comes back); the peer modules beside it are what runs inside each
peer's own Python, and import nothing of Tiffin's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..servers import ServerProcess, free_port, pinned

PEERS = ("fastapi", "mlserver", "bentoml")
# The load client each peer speaks: FastAPI its raw body, MLServer the v2 gRPC protocol,
# BentoML its JSON.
PEER_CLIENTS = {"fastapi": "raw_http", "mlserver": "lean", "bentoml": "json_http"}
PEER_DESCRIPTIONS = {
    "fastapi": "FastAPI + uvicorn, raw binary body, onnxruntime per request",
    "mlserver": "MLServer 1.7, adaptive batching (max 32, 3 ms)",
    "bentoml": "BentoML 1.4, batchable API (max 32)",
}
PEERS_DIR = Path(__file__).resolve().parent
VENV = PEERS_DIR.parent / ".peers-venv"
BENTOML_VENV = PEERS_DIR.parent / ".peers-venv-bentoml"
PEER_VENVS = {"fastapi": VENV, "mlserver": VENV, "bentoml": BENTOML_VENV}
SETUP_HINT = "run `python -m benchmarks peers-setup`"

# MLServer's adaptive batching, as the side-by-side table was first measured.
MLSERVER_MAX_BATCH_SIZE = 32
MLSERVER_MAX_BATCH_TIME_S = 0.003


class PeerUnavailable(Exception):
    """A peer that cannot run here; the message is the note the run shows."""


def venv_python(venv: Path = VENV) -> Path | None:
    """The peers' Python, if the peers' environment exists."""
    python = venv / "bin" / "python"
    return python if python.is_file() and os.access(python, os.X_OK) else None


def peer_python(peer: str, venv: Path | None = None) -> str:
    """The Python a peer runs with: its environment (`venv`, by default the peer's own), or
    for FastAPI the main one when it has fastapi and uvicorn; PeerUnavailable otherwise."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer '{peer}'; known: {', '.join(PEERS)}")
    venv = venv or PEER_VENVS[peer]
    python = venv_python(venv)
    if python is not None:
        return str(python)
    if peer == "fastapi" and all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
        return sys.executable
    raise PeerUnavailable(f"peer {peer} skipped: {SETUP_HINT} (no {venv})")


# What a peer's figure depends on besides its own code.
PEER_PACKAGES = (
    "mlserver",
    "bentoml",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "onnxruntime",
    "numpy",
    "grpcio",
    "protobuf",
)


def describe(peer_targets: list[str], venv: Path | None = None) -> dict[str, dict]:
    """For each peer that can run: its Python and the versions of its packages there."""
    described: dict[str, dict] = {}
    script = (
        "import json, sys\nfrom importlib import metadata\nversions = {}\n"
        "for name in sys.argv[1:]:\n    try:\n        versions[name] = metadata.version(name)\n"
        "    except metadata.PackageNotFoundError:\n        versions[name] = None\n"
        "print(json.dumps(versions))"
    )
    for peer in peer_targets:
        try:
            python = peer_python(peer, venv)
        except PeerUnavailable:
            continue
        done = subprocess.run(
            [python, "-c", script, *PEER_PACKAGES], capture_output=True, text=True, timeout=60
        )
        packages = json.loads(done.stdout) if done.returncode == 0 else {}
        described[peer] = {"python": python, "packages": packages}
    return described


def start_peer(
    peer: str,
    repository: Path,
    models: list[str],
    cpus: str | None,
    log_path: Path,
    timeout: float = 120.0,
    venv: Path | None = None,
) -> ServerProcess:
    """Starts `peer` pinned to `cpus`, serving `models` from the benchmark `repository`, and
    returns once every model answers ready; `url` is host:port for its client. Raises
    PeerUnavailable when its environment is missing, RuntimeError or TimeoutError when it
    does not come up."""
    python = peer_python(peer, venv)
    if peer == "fastapi":
        return _start_fastapi(python, repository, models, cpus, log_path, timeout)
    if peer == "bentoml":
        return _start_bentoml(python, repository, models, cpus, log_path, timeout)
    return _start_mlserver(python, repository, models, cpus, log_path, timeout)


def _start_fastapi(
    python: str,
    repository: Path,
    models: list[str],
    cpus: str | None,
    log_path: Path,
    timeout: float,
) -> ServerProcess:
    port = free_port()
    command = [
        python,
        str(PEERS_DIR / "fastapi_app.py"),
        "--repository",
        str(repository.resolve()),
        "--models",
        ",".join(models),
        "--port",
        str(port),
    ]
    server = ServerProcess(pinned(command, cpus), log_path, f"127.0.0.1:{port}")
    server.http_url = server.url
    try:
        _wait_http_ready(server, f"http://{server.url}/health", timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_http_ready(server: ServerProcess, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server._check_alive()
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s:\n{server.log_tail()}")


def _start_bentoml(
    python: str,
    repository: Path,
    models: list[str],
    cpus: str | None,
    log_path: Path,
    timeout: float,
) -> ServerProcess:
    port = free_port()
    command = [
        str(Path(python).parent / "bentoml"),
        "serve",
        "bentoml_service:Models",
        "--working-dir",
        str(PEERS_DIR),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {
        **os.environ,
        "TIFFIN_PEER_REPOSITORY": str(repository.resolve()),
        "TIFFIN_PEER_MODELS": ",".join(models),
        # Its store and logs in the run's folder, not ~/bentoml; no usage reports.
        "BENTOML_HOME": str(log_path.with_name(log_path.stem + "-home")),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    server = ServerProcess(pinned(command, cpus), log_path, f"127.0.0.1:{port}", env=env)
    server.http_url = server.url
    try:
        _wait_http_ready(server, f"http://{server.url}/readyz", timeout)
    except BaseException:
        server.stop()
        raise
    return server


def write_mlserver_settings(folder: Path, repository: Path, models: list[str]) -> dict[str, int]:
    """Writes MLServer's settings.json (one process, loopback, free ports) and one
    model-settings.json per model into `folder`; returns the ports."""
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"debug": False, "parallel_workers": 0, "host": "127.0.0.1", **ports}
    (folder / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    for name in models:
        model_settings = {
            "name": name,
            "implementation": "mlserver_runtime.OnnxRuntimeModel",
            "max_batch_size": MLSERVER_MAX_BATCH_SIZE,
            "max_batch_time": MLSERVER_MAX_BATCH_TIME_S,
            "parameters": {"uri": str((repository / name / "1" / "model.onnx").resolve())},
        }
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "model-settings.json").write_text(json.dumps(model_settings, indent=1))
    return ports


def _start_mlserver(
    python: str,
    repository: Path,
    models: list[str],
    cpus: str | None,
    log_path: Path,
    timeout: float,
) -> ServerProcess:
    folder = log_path.with_name(log_path.stem + "-settings")
    ports = write_mlserver_settings(folder, repository, models)
    mlserver = Path(python).parent / "mlserver"
    command = [str(mlserver), "start", str(folder)]
    # The runtime module is imported by name from this folder; MLServer reads its own
    # MLSERVER_* variables, so none leak in from the caller's environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER")}
    env["PYTHONPATH"] = str(PEERS_DIR)
    server = ServerProcess(
        pinned(command, cpus), log_path, f"127.0.0.1:{ports['grpc_port']}", env=env
    )
    try:
        _wait_v2_ready(server, models, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_v2_ready(server: ServerProcess, models: list[str], timeout: float) -> None:
    """Polls the v2 gRPC ServerReady, then ModelReady for each model (MLServer has no gRPC
    health service)."""
    import grpc

    from tiffin.protos import method_path, protocol

    pb = protocol()
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.url) as channel:
        server_ready = channel.unary_unary(
            method_path("ServerReady"),
            request_serializer=pb.ServerReadyRequest.SerializeToString,
            response_deserializer=pb.ServerReadyResponse.FromString,
        )
        model_ready = channel.unary_unary(
            method_path("ModelReady"),
            request_serializer=pb.ModelReadyRequest.SerializeToString,
            response_deserializer=pb.ModelReadyResponse.FromString,
        )
        waiting = list(models)
        while time.monotonic() < deadline:
            server._check_alive()
            try:
                if server_ready(pb.ServerReadyRequest(), timeout=1).ready:
                    waiting = [
                        m
                        for m in waiting
                        if not model_ready(pb.ModelReadyRequest(name=m), timeout=1).ready
                    ]
                    if not waiting:
                        return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(
        f"MLServer did not have {', '.join(waiting)} ready within {timeout} s:\n{server.log_tail()}"
    )
