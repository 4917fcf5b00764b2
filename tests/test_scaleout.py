"""Scale-out (issue 16), on loopback: three Tiffin replicas behind gRPC client-side
round-robin, and behind a `backend: triton` proxy model, keep answering with no failure while
one replica is stopped (SIGTERM, its drain) and started again on the same port.

Each replica serves the classifier under a version number of its own (1, 2, 3: the same
model file), so every response's model_version says which replica answered it.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

import conftest
from conftest import EXAMPLES, ServerProcess, free_port

REPLICAS = 3
CLIENT_THREADS = 2
# Round robin over every address; a replica leaves the rotation as soon as its health turns
# NOT_SERVING (the server's first step when it shuts down), and a call that a replica refuses
# with UNAVAILABLE meanwhile is tried again elsewhere (calls that never left the client are
# retried by gRPC on its own).
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": "inference.GRPCInferenceService"},
    "methodConfig": [
        {
            "name": [{"service": "inference.GRPCInferenceService"}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def start_replica(repository: Path, ports: tuple[int, int, int]) -> ServerProcess:
    """A test server (conftest's) on the gRPC, HTTP and metrics ports given, so that a replica
    can be started again where its clients look for it: ServerProcess takes its ports from
    conftest.free_port, here made to hand out these."""
    given = iter(ports)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conftest, "free_port", lambda: next(given))
        return ServerProcess(repository, "--shutdown-grace-seconds", "10")


@dataclass
class Load:
    """Clients calling `model` without pause until stopped, recording what answered."""

    client: tc.InferenceServerClient
    model: str = "classifier"
    answered: list[tuple[float, str]] = field(default_factory=list)  # (time, model_version)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        features = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
        tensor = tc.InferInput("features", [1, 4], "FP32")
        tensor.set_data_from_numpy(features)

        def call() -> None:
            while not self._stop.is_set():
                try:
                    result = self.client.infer(self.model, [tensor], client_timeout=10)
                    self.answered.append((time.monotonic(), result.get_response().model_version))
                except Exception as exc:  # every failure counts, whatever it is
                    self.failures.append(f"{time.monotonic():.3f} {exc}")

        self._threads = [threading.Thread(target=call) for _ in range(CLIENT_THREADS)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


@pytest.fixture
def replicas(tmp_path: Path):
    """Three replicas, replica i serving the classifier as version i."""
    started: list[ServerProcess] = []
    specs = []
    for number in range(1, REPLICAS + 1):
        repo = tmp_path / f"replica{number}"
        model = repo / "classifier"
        model.mkdir(parents=True)
        config = (EXAMPLES / "classifier" / "config.yaml").read_text()
        (model / "config.yaml").write_text(config.replace("num_versions: 2", "num_versions: 1"))
        shutil.copytree(EXAMPLES / "classifier" / "1", model / str(number))
        ports = (free_port(), free_port(), free_port())
        specs.append((repo, ports))
        started.append(start_replica(repo, ports))
    yield started, specs
    for replica in started:
        replica.stop()


@dataclass(frozen=True)
class Timeline:
    """When the stopped replica was sent SIGTERM, had exited, was started again, served."""

    stopping: float
    stopped: float
    restarted: float
    serving: float


def _stop_and_restart(replicas, specs, index: int) -> Timeline:
    """Stops replica `index` (SIGTERM), waits, starts it again on its ports."""
    time.sleep(2)
    stopping = time.monotonic()
    assert replicas[index].stop() == 0, replicas[index].log()
    stopped = time.monotonic()
    time.sleep(2)
    restarted = time.monotonic()
    replicas[index] = start_replica(*specs[index])
    serving = time.monotonic()
    time.sleep(3)
    return Timeline(stopping, stopped, restarted, serving)


def _count(load: Load, start: float, end: float) -> dict[str, int]:
    return dict(sorted(Counter(v for t, v in load.answered if start < t < end).items()))


def _report(name: str, load: Load, when: Timeline) -> dict:
    figures = {
        "requests": len(load.answered) + len(load.failures),
        "before_stop": _count(load, 0, when.stopping),
        "failures": len(load.failures),
        "by_replica": dict(sorted(Counter(v for _, v in load.answered).items())),
        "while_stopped": _count(load, when.stopped, when.restarted),
        "after_restart": _count(load, when.serving, float("inf")),
    }
    print(f"\n{name}: {json.dumps(figures)}")
    return figures


@pytest.mark.timeout(240)
def test_round_robin_keeps_answering_through_a_restart(replicas, tmp_path: Path) -> None:
    started, specs = replicas
    target = "ipv4:" + ",".join(r.url for r in started)
    client = tc.InferenceServerClient(
        target,
        channel_args=[
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            ("grpc.enable_retries", 1),
            # A replica that comes back rejoins within a second, not after gRPC's default
            # backoff (up to 120 s) for an address that refused connections.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )
    load = Load(client)
    load.start()
    try:
        when = _stop_and_restart(started, specs, 0)
    finally:
        load.stop()
    figures = _report("round_robin", load, when)
    assert load.failures == [], load.failures[:5]
    # Spread over all three; none answered for replica 1 while it was down; back after.
    assert set(figures["by_replica"]) == {"1", "2", "3"}
    assert "1" not in figures["while_stopped"]
    assert figures["after_restart"].get("1", 0) > 0
    counts = figures["before_stop"]
    assert len(counts) == 3 and min(counts.values()) > 0.3 * sum(counts.values())  # even


def requests_served(replica: ServerProcess) -> int:
    """The classifier requests a replica answered since it started (its metrics)."""
    with urllib.request.urlopen(replica.metrics_url, timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in lines
        if line.startswith("tiffin_requests_total{") and 'model="classifier"' in line
    )


# A proxy spreads over its remote's addresses, and steps around a replica that shuts down:
# its channel balances round robin, watches health and retries (parameters.load_balancing).
@pytest.mark.timeout(240)
def test_proxy_model_keeps_answering_through_a_restart(
    replicas, tmp_path: Path, make_server
) -> None:
    started, specs = replicas
    proxy_repo = tmp_path / "proxy"
    (proxy_repo / "classifier" / "1").mkdir(parents=True)
    target = "ipv4:" + ",".join(r.url for r in started)
    balancing = "  load_balancing: round_robin\n"
    (proxy_repo / "classifier" / "config.yaml").write_text(
        f"backend: triton\nparameters:\n  url: '{target}'\n  model_name: classifier\n{balancing}"
    )
    proxy = make_server(proxy_repo)
    load = Load(tc.InferenceServerClient(proxy.url))
    load.start()
    try:
        # Stop the first address: the one a channel that does not balance is connected to.
        when = _stop_and_restart(started, specs, 0)
    finally:
        load.stop()
    figures = _report("proxy", load, when)
    served = [requests_served(replica) for replica in started]
    print(f"proxy: classifier requests per replica since its last start: {served}")
    assert load.failures == [], load.failures[:5]
    assert figures["while_stopped"]  # answered while a replica was down
    assert all(served), served  # every replica took a share, the restarted one too
