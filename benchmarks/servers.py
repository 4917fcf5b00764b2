"""Servers under test, as pinned subprocesses: `serverctl serve` and the echo servers.

Each is started with `taskset -c CPUS`, waited on (the gRPC health check for Tiffin, a
`READY <port>` line for the echo servers), and stopped with SIGTERM; its output goes to a log
file in the run's folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(command: list[str], cpus: str | None) -> list[str]:
    """`command` under `taskset -c cpus` (unchanged when cpus is None)."""
    if cpus is None:
        return command
    taskset = shutil.which("taskset")
    if taskset is None:
        raise SystemExit("taskset not found (util-linux); it pins the server and the client")
    return [taskset, "-c", cpus, *command]


def run_pinned(command: list[str], cpus: str | None, timeout: float) -> subprocess.CompletedProcess:
    """Runs a benchmark part (load generator, limit) pinned to `cpus`, from the repository
    root, and returns what it printed."""
    return subprocess.run(
        pinned(command, cpus), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )


def serverctl() -> list[str]:
    """The `serverctl` of this Python environment, or the module that implements it."""
    script = Path(sys.executable).parent / "serverctl"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "tiffin.server.cli"]


class ServerProcess:
    """A server subprocess with a log file; `url` is host:port for clients."""

    def __init__(
        self,
        command: list[str],
        log_path: Path,
        url: str = "",
        pipe_stdout: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = command
        self.log_path = log_path
        self.url = url
        self.http_url = ""  # host:port of the REST front door, where there is one
        self._log = open(log_path, "w+b")
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE if pipe_stdout else self._log,
            stderr=self._log,
            cwd=REPO_ROOT,
            env=env,
        )

    def log_tail(self, lines: int = 30) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{' '.join(self.command)} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return int(self.proc.returncode)


def start_tiffin(
    repository: Path,
    cpus: str | None,
    log_path: Path,
    models: list[str],
    grpc_threads: int | None = None,
    timeout: float = 120.0,
    http: bool = True,
    metrics: bool = True,
    extra: Sequence[str] = (),
) -> ServerProcess:
    """`serverctl serve` pinned to `cpus`, once SERVING and every model in `models` ready;
    with the REST front door on a free port (`http_url`), or off (`http` False), and the
    metrics endpoint on a free port, or off (`metrics` False)."""
    port = free_port()
    command = [
        *serverctl(),
        "serve",
        "--model-repository",
        str(repository),
        "--grpc-port",
        str(port),
        "--log-level",
        "WARNING",
    ]
    http_port = free_port() if http else 0
    command += ["--http-port", str(http_port)] if http else ["--no-allow-http"]
    command += ["--metrics-port", str(free_port())] if metrics else ["--no-allow-metrics"]
    if grpc_threads is not None:
        command += ["--grpc-threads", str(grpc_threads)]
    command += list(extra)
    server = ServerProcess(pinned(command, cpus), log_path, f"127.0.0.1:{port}")
    server.http_url = f"127.0.0.1:{http_port}" if http else ""
    try:
        _wait_serving(server, models, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_serving(server: ServerProcess, models: list[str], timeout: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tiffin.protos import method_path, protocol

    pb = protocol()
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        model_ready = channel.unary_unary(
            method_path("ModelReady"),
            request_serializer=pb.ModelReadyRequest.SerializeToString,
            response_deserializer=pb.ModelReadyResponse.FromString,
        )
        while time.monotonic() < deadline:
            server._check_alive()
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        else:
            raise TimeoutError(f"server not SERVING within {timeout} s:\n{server.log_tail()}")
        for name in models:
            try:
                ready = model_ready(pb.ModelReadyRequest(name=name), timeout=5).ready
            except grpc.RpcError as exc:
                ready, detail = False, exc.details()
            else:
                detail = "not ready"
            if not ready:
                raise RuntimeError(f"model {name} is not ready ({detail}):\n{server.log_tail()}")


# The parameters in which the server says what it chose for a model and why.
CHOICE_PARAMETERS = (
    "instance_choice",
    "thread_defaults",
    "intra_op_thread_count",
    "allow_spinning",
)


def served_choices(url: str, models: list[str], timeout: float = 5.0) -> dict[str, dict]:
    """What a running Tiffin chose for each model, from its ModelConfig: the instance kinds
    and the parameters that say how the instances run (a user's config leaves them to it)."""
    from tiffin.protos import method_path, protocol

    pb = protocol()
    choices: dict[str, dict] = {}
    with grpc.insecure_channel(url) as channel:
        model_config = channel.unary_unary(
            method_path("ModelConfig"),
            request_serializer=pb.ModelConfigRequest.SerializeToString,
            response_deserializer=pb.ModelConfigResponse.FromString,
        )
        for name in models:
            try:
                config = model_config(pb.ModelConfigRequest(name=name), timeout=timeout).config
            except grpc.RpcError as exc:
                choices[name] = {"error": exc.details() or str(exc.code())}
                continue
            parameters = {k: v.string_value for k, v in config.parameters.items()}
            choices[name] = {
                "instance_group": [
                    {"kind": pb.ModelInstanceGroup.Kind.Name(g.kind), "count": g.count}
                    for g in config.instance_group
                ],
                **{k: parameters[k] for k in CHOICE_PARAMETERS if k in parameters},
            }
    return choices


def start_echo(kind: str, cpus: str | None, log_path: Path, timeout: float = 60.0) -> ServerProcess:
    """`python -m benchmarks echo --kind KIND` pinned to `cpus`, once it printed its port."""
    command = [sys.executable, "-m", "benchmarks", "echo", "--kind", kind, "--port", "0"]
    server = ServerProcess(pinned(command, cpus), log_path, pipe_stdout=True)
    assert server.proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    # The READY line is the only thing the echo server prints; readline returns at EOF too.
    while time.monotonic() < deadline and not line.startswith(b"READY"):
        line = server.proc.stdout.readline()
        if not line:
            server.stop()
            raise RuntimeError(f"echo server ({kind}) exited:\n{server.log_tail()}")
    if not line.startswith(b"READY"):
        server.stop()
        raise TimeoutError(f"echo server ({kind}) did not start within {timeout} s")
    server.url = f"127.0.0.1:{int(line.split()[1])}"
    return server
