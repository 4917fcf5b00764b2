"""`serverctl containerize` (issue 16): the Dockerfile it writes, its health check against a
real server, and (marked `docker`, where an engine answers) an image built for real from a
bundle with a wheelhouse, run, asked for an inference and stopped with SIGTERM.

The docker test needs no registry: its base image is made with debootstrap (Debian bookworm,
whose Python is 3.11 as here) and kept under the name BASE_IMAGE, so later runs reuse it. On an
engine without it (a clean CI machine: 1-2 minutes of downloads and unpacking) it is made in a
thread started when the session's tests are collected (conftest.py), and the docker tests run
last, so the other tests run meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import EXAMPLES, free_port
from tiffin.bundles.container import CPU_BASE, GPU_BASE, HEALTH_CHECK, USER_ID

BASE_IMAGE = "tiffin-test-base:bookworm"
IMAGE = "tiffin-test-containerize:latest"


def serverctl(*args: str, cwd: Path | None = None, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TIFFIN_BUNDLE_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    for name in ("classifier", "uppercase"):
        shutil.copytree(EXAMPLES / name, repo / name)
    return repo


def test_dockerfile_without_a_wheelhouse(repository: Path, tmp_path: Path, store: Path) -> None:
    bundle = tmp_path / "demo.tar.gz"
    serverctl("build", str(repository), "--output", str(bundle), "--name", "demo", "--tag", "v1")
    out = serverctl(
        "containerize", str(bundle), "--output-dir", str(tmp_path / "ctx"), "--no-build"
    )
    text = (tmp_path / "ctx" / "Dockerfile").read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert froms == [f"FROM {CPU_BASE} AS install", f"FROM {CPU_BASE}"]
    assert "--no-index" not in text  # no wheelhouse: the lock comes from the index
    assert [w.name for w in (tmp_path / "ctx" / "wheels").iterdir()] == [
        "tiffin-0.1.0-py3-none-any.whl"
    ]
    assert f"USER {USER_ID}:{USER_ID}" in text and USER_ID != 0
    assert "EXPOSE 8000 8001 8002" in text
    assert "TIFFIN_HOST=0.0.0.0" in text and "TIFFIN_BUNDLE=/opt/tiffin/bundle.tar.gz" in text
    assert "HEALTHCHECK" in text and "grpc_health" in text
    assert "docker build --tag tiffin-demo:v1 " in out
    # The context holds the bundle as built, byte for byte.
    assert (tmp_path / "ctx" / "bundle.tar.gz").read_bytes() == bundle.read_bytes()


def test_dockerfile_for_gpu_and_other_bases(repository: Path, tmp_path: Path, store: Path) -> None:
    serverctl("build", str(repository), "--output", str(tmp_path / "b.tar.gz"), "--name", "demo")
    serverctl(
        "containerize",
        "demo:" + _tag(store),
        "--gpu",
        "--output-dir",
        str(tmp_path / "gpu"),
        "--no-build",
    )
    text = (tmp_path / "gpu" / "Dockerfile").read_text()
    assert f"FROM {GPU_BASE}" in text and "python3.11-venv" in text
    assert text.count("apt-get install") == 2  # both stages need the interpreter
    serverctl(
        "containerize",
        str(tmp_path / "b.tar.gz"),
        "--base-image",
        "example.org/python:3.11",
        "--output-dir",
        str(tmp_path / "other"),
        "--no-build",
    )
    assert "FROM example.org/python:3.11\n" in (tmp_path / "other" / "Dockerfile").read_text()


def _tag(store: Path) -> str:
    (tag,) = (store / "tags" / "demo").iterdir()
    return tag.stem


def test_containerize_refuses_a_tampered_bundle(
    repository: Path, tmp_path: Path, store: Path
) -> None:
    bundle = tmp_path / "b.tar.gz"
    serverctl("build", str(repository), "--output", str(bundle))
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))
    done = subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", "containerize", str(bundle), "--no-build",
         "--output-dir", str(tmp_path / "ctx")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 1 and f"bundle {bundle}" in done.stderr
    assert not (tmp_path / "ctx").exists()


def test_health_check_command_asks_the_grpc_health_service(example_server) -> None:
    def check(port: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "TIFFIN_GRPC_PORT": str(port)}
        return subprocess.run(
            [sys.executable, "-c", HEALTH_CHECK],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert check(example_server.port).returncode == 0
    closed = check(free_port())  # nothing listens there
    assert closed.returncode == 1 and closed.stderr == "not serving: UNAVAILABLE\n"


# ---- docker, for real ----


def _docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def _engine() -> str:
    """Why no image can be built here ("" when one can)."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        if _docker("info", timeout=20).returncode != 0:
            return "no Docker engine answers (start dockerd; see the README)"
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer within 20 s"
    return ""


def _make_base_image() -> str:
    """BASE_IMAGE, made with debootstrap when the engine does not have it yet."""
    why = _engine()
    if why:
        pytest.skip(why)
    if _docker("image", "inspect", BASE_IMAGE).returncode == 0:
        return BASE_IMAGE
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        pytest.skip(f"{BASE_IMAGE} is missing and making it needs debootstrap, as root")
    scratch = Path(tempfile.mkdtemp(prefix="tiffin-base-image-"))
    try:
        root = scratch / "rootfs"
        steps = [
            ["debootstrap", "--variant=minbase", "bookworm", str(root)],
            ["chroot", str(root), "apt-get", "install", "-y", "--no-install-recommends",
             "python3", "python3-venv"],
            ["chroot", str(root), "apt-get", "clean"],
        ]  # fmt: skip
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{step[0]} failed:\n{done.stderr[-2000:]}"
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        done = subprocess.run(
            ["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True
        )
        assert tar.wait() == 0 and done.returncode == 0, done.stderr
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return BASE_IMAGE


class _BaseImage:
    """_make_base_image() run once, in a thread: conftest.py starts it when docker tests are
    collected; the test waits for it and gets its image, its skip or its failure."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._outcome: tuple[str | None, BaseException | None] = (None, None)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="base-image", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        if _engine():
            return  # no engine yet (CI starts dockerd just before): the test asks again
        try:
            self._outcome = (_make_base_image(), None)
        except BaseException as exc:  # pytest.skip's exception too: the test raises it again
            self._outcome = (None, exc)

    def get(self) -> str:
        self.start()
        assert self._thread is not None
        self._thread.join()
        image, error = self._outcome
        if error is not None:
            raise error
        return image if image is not None else _make_base_image()


base_image = _BaseImage()


def _wait_serving(url: str, container: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.5)
    raise TimeoutError(_docker("logs", container).stderr[-3000:])


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_image_from_a_bundle_serves_and_stops_cleanly(
    repository: Path, tmp_path: Path, store: Path
) -> None:
    base = base_image.get()  # skips without an engine, or without debootstrap as root
    bundle = tmp_path / "demo.tar.gz"
    serverctl("build", str(repository), "--output", str(bundle), "--wheels", "--name", "demo")
    previous = _docker("image", "inspect", IMAGE, "--format", "{{.Id}}").stdout.strip()
    started = time.monotonic()
    serverctl(
        "containerize", str(bundle), "--base-image", base, "--tag", IMAGE,
        "--output-dir", str(tmp_path / "ctx"), "--network", "host",
    )  # fmt: skip
    build_seconds = time.monotonic() - started
    size = int(_docker("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout)
    if previous:
        _docker("rmi", previous)  # an earlier run's image, now untagged (fails if it is this one)
    _docker("image", "prune", "--force", "--filter", "label=dev.tiffin.stage=install")
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    name = f"tiffin-test-{grpc_port}"
    run = _docker(
        "run", "--detach", "--name", name, "--network", "host", "--init",
        "--env", f"TIFFIN_GRPC_PORT={grpc_port}", "--env", f"TIFFIN_HTTP_PORT={http_port}",
        "--env", f"TIFFIN_METRICS_PORT={metrics_port}", IMAGE,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    try:
        url = f"127.0.0.1:{grpc_port}"
        _wait_serving(url, name)
        client = tc.InferenceServerClient(url)
        features = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
        tensor = tc.InferInput("features", [2, 4], "FP32")
        tensor.set_data_from_numpy(features)
        got = client.infer("classifier", [tensor], model_version="1").as_numpy("probabilities")
        import onnxruntime

        session = onnxruntime.InferenceSession(str(repository / "classifier" / "1" / "model.onnx"))
        (expected,) = session.run(None, {"features": features})
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        # The image's HEALTHCHECK (every 10 s) reports the container healthy.
        deadline = time.monotonic() + 40
        health = ""
        while time.monotonic() < deadline and health != "healthy":
            time.sleep(1)
            health = _docker("inspect", name, "--format", "{{.State.Health.Status}}").stdout.strip()
        assert health == "healthy"
        user = _docker("exec", name, "id", "-u").stdout.strip()
        assert user == "10001"  # not root
        stop = _docker("stop", "--time", "40", name)  # SIGTERM, then the server's drain
        assert stop.returncode == 0, stop.stderr
        state = json.loads(_docker("inspect", name, "--format", "{{json .State}}").stdout)
        logs = _docker("logs", name)
        assert state["ExitCode"] == 0, logs.stderr[-3000:]
        assert "INFO tiffin.server.server: stopped" in logs.stderr
    finally:
        _docker("rm", "--force", name)
    print(
        f"\nimage {IMAGE}: {size / 1e6:.0f} MB, containerize + docker build {build_seconds:.0f} s"
    )
