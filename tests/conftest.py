"""Fixtures: real `serverctl serve` processes on free loopback ports, gated on gRPC health."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "model_repository"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python_path() -> str:
    """tests/ on the path of servers we start, so their workers can import toy_backends."""
    here = str(Path(__file__).resolve().parent)
    return os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)


def leaked_arenas() -> list[str]:
    """Tiffin arenas in /dev/shm whose creating process is gone."""
    from tiffin.scheduler.arena import _OWNER, SHM_DIR, _alive

    leaked = []
    for path in SHM_DIR.iterdir() if SHM_DIR.is_dir() else []:
        match = _OWNER.match(path.name)
        if match and not _alive(int(match.group(1))):
            leaked.append(path.name)
    return leaked


@pytest.fixture(autouse=True)
def no_shared_memory_leaks() -> Iterator[None]:
    """Fails any test after which an arena outlives the server that created it."""
    yield
    leaked = leaked_arenas()
    for name in leaked:
        (Path("/dev/shm") / name).unlink(missing_ok=True)
    assert not leaked, f"shared memory leaked: {leaked}"


class ServerProcess:
    """`serverctl serve` in a subprocess; `url` is host:port for gRPC clients, `http_url` for
    HTTP/REST ones."""

    def __init__(
        self,
        repository: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.credentials = credentials  # for the health check of a TLS server
        for attempt in range(1, 4):
            self._launch(repository, extra, env, cwd)
            try:
                self.wait_serving()
                return
            except RuntimeError as exc:
                # free_port's port can be taken by another process before the server binds
                # it (a busy machine): the same server again, on other ports.
                if attempt == 3 or "address already in use" not in str(exc).lower():
                    raise
                self._log.close()

    def _launch(
        self, repository: Path, extra: tuple[str, ...], env: dict[str, str] | None, cwd: Path | None
    ) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        # Every server gets its own HTTP port too: parallel servers never meet on 8000.
        self.http_port = free_port()
        self.http_url = f"127.0.0.1:{self.http_port}"
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tiffin-serve-{self.port}.log"
        self._log = open(self.log_path, "w+b")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tiffin.server.cli",
                "serve",
                "--model-repository",
                str(repository),
                "--grpc-port",
                str(self.port),
                "--http-port",
                str(self.http_port),
                "--metrics-port",
                str(self.metrics_port),
                *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={
                **os.environ,
                "PYTHONPATH": _python_path(),
                "TIFFIN_ALLOWED_BACKENDS": "toy_backends",  # the only import-path backends
                # Tests drive load and unload calls: every model loaded at start, and the
                # calls taken (the default mode, 'none', refuses them; test_security.py).
                "TIFFIN_MODEL_CONTROL_MODE": "explicit",
                "TIFFIN_LOAD_MODEL": "*",
                **(env or {}),
            },
        )

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        channel = (
            grpc.secure_channel(self.url, self.credentials)
            if self.credentials is not None
            else grpc.insecure_channel(self.url)
        )
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server did not become SERVING within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def example_server() -> Iterator[ServerProcess]:
    """The bundled example repository, served once for the whole session."""
    server = ServerProcess(EXAMPLES)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture
def make_server() -> Iterator:
    """Starts servers on demand; stops them (and checks a clean exit) after the test."""
    started: list[ServerProcess] = []

    def start(repository: Path, *extra: str, **kwargs) -> ServerProcess:
        server = ServerProcess(repository, *extra, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def example_repo_copy(tmp_path: Path) -> Path:
    """A writable copy of the example repository."""
    target = tmp_path / "models"
    shutil.copytree(EXAMPLES, target)
    return target


ONNX_EXAMPLES = ("add_sub", "classifier", "uppercase")


def example_models(target: Path, *names: str) -> Path:
    """A repository of only the named example models, copied to `target`. A server of the
    ONNX ones (inline instances) is serving in about a second; the whole example repository
    starts a torch and two python workers first (8-13 s on two busy cores)."""
    for name in names:
        shutil.copytree(EXAMPLES / name, target / name)
    return target


@pytest.fixture
def example_onnx_copy(tmp_path: Path) -> Path:
    """A writable copy of the example repository's ONNX models (ONNX_EXAMPLES)."""
    return example_models(tmp_path / "models", *ONNX_EXAMPLES)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Docker tests run last: the base image they need is made meanwhile (below)."""
    items.sort(key=lambda item: item.get_closest_marker("docker") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Starts making test_containerize's base image (debootstrap, 1-2 minutes on a clean
    machine) in a thread, while the other tests run."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        if item.get_closest_marker("docker") is not None:
            starter = getattr(item.module, "base_image", None)
            if starter is not None:
                starter.start()
            return
