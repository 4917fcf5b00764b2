"""Traffic between versions against a real server: a 90/10 split over 10,000 requests, sticky
callers, a failing canary rolled back within its window, and weights set by an admin call."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from models import ECHO, write_repository

MODEL = ECHO.replace("toy_backends:Echo", "toy_backends:Canary") + "version_policy: {all: {}}\n"


def repository(tmp_path: Path, traffic: str) -> Path:
    repo = write_repository(tmp_path / "repo", {"m": MODEL + traffic})
    (repo / "m" / "2").mkdir()
    return repo


def one_input(value: float = 1.0) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.full((1, 2), value, np.float32))
    return [tensor]


def versions_served(url: str, requests: int, threads: int = 8) -> Counter[str]:
    served: Counter[str] = Counter()
    lock = threading.Lock()

    def call(count: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        mine: Counter[str] = Counter()
        for _ in range(count):
            mine[client.infer("m", one_input()).get_response().model_version] += 1
        with lock:
            served.update(mine)

    workers = [threading.Thread(target=call, args=(requests // threads,)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    return served


def test_a_90_10_split_lands_within_2_percent(make_server, tmp_path: Path) -> None:
    server = make_server(repository(tmp_path, "traffic: {1: 90, 2: 10}\n"))
    served = versions_served(server.url, 10_000)
    assert sum(served.values()) == 10_000
    share = served["2"] / 10_000
    assert 0.08 <= share <= 0.12, served
    # A request naming its version bypasses the split.
    client = grpcclient.InferenceServerClient(server.url)
    for _ in range(20):
        pinned = client.infer("m", one_input(), model_version="2")
        assert pinned.get_response().model_version == "2"
    # Per-version statistics show the split.
    stats = {s.version: s.inference_count for s in client.get_inference_statistics("m").model_stats}
    assert stats["2"] == served["2"] + 20 and stats["1"] == served["1"]


def test_a_sticky_key_keeps_a_caller_on_one_version(make_server, tmp_path: Path) -> None:
    traffic = "traffic: {weights: {1: 50, 2: 50}, sticky_key: user}\n"
    server = make_server(repository(tmp_path, traffic))
    client = grpcclient.InferenceServerClient(server.url)
    seen: dict[str, set[str]] = {}
    for user in range(60):
        for _ in range(5):
            result = client.infer("m", one_input(), parameters={"user": f"user-{user}"})
            seen.setdefault(f"user-{user}", set()).add(result.get_response().model_version)
        # The same key as a header (gRPC metadata) lands on the same version.
        header = client.infer("m", one_input(), headers={"user": f"user-{user}"})
        seen[f"user-{user}"].add(header.get_response().model_version)
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assert Counter(next(iter(v)) for v in seen.values()).keys() == {"1", "2"}


def test_a_failing_canary_is_rolled_back_and_weights_are_set_again(
    make_server, tmp_path: Path
) -> None:
    traffic = (
        "traffic:\n  weights: {1: 70, 2: 30}\n  rollback: {max_error_ratio: 0.2, window: 20}\n"
    )
    server = make_server(repository(tmp_path, traffic))
    client = grpcclient.InferenceServerClient(server.url)
    outcomes: list[tuple[int, str, bool]] = []  # (index, version or "", failed)
    for index in range(600):
        value = -1.0 if index % 2 else 1.0  # half the requests make the canary fail
        try:
            result = client.infer("m", one_input(value))
            outcomes.append((index, result.get_response().model_version, False))
        except InferenceServerException as exc:
            assert "the canary fails on negative input" in exc.message()
            outcomes.append((index, "", True))
    failures = [i for i, _, failed in outcomes if failed]
    assert failures, "the canary never failed"
    last_failure = failures[-1]
    to_canary = [i for i, version, _ in outcomes if version == "2"]
    # The rule judged a full window of 20 of the canary's answers (about 70 requests at a 30%
    # share), then every 2: it was out well within the first 300 requests, and after it no
    # request failed and none went to the canary. (Its last answers before the judgement
    # may all have succeeded: routing is random, so how far they run past the last failure
    # is by chance; the 300 requests after show the rollback.)
    assert last_failure < 300, last_failure
    assert max(to_canary) < 300, to_canary
    assert sum(1 for i, _, failed in outcomes if i > last_failure and failed) == 0
    index = {
        (m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models
    }
    state, reason = index[("m", "2")]
    assert state == "READY" and reason.startswith("rolled back: error ratio"), reason
    assert "model 'm' version 2 rolled back: error ratio" in server.log()
    event = 'tiffin_model_events_total{model="m",version="2",event="rolled_back"} 1'
    deadline = time.monotonic() + 10  # the event reaches the registry's loop a moment later
    while True:
        with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
            metrics = reply.read().decode()
        if event in metrics or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert event in metrics
    # An operator sets the weights again (admin call): the canary is back, its note gone.
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/repository/models/m/load",
        data=json.dumps({"parameters": {"traffic": "1=50,2=50"}}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200
    served = versions_served(server.url, 400, threads=4)
    assert served["2"] > 100, served
    reasons = {(m.name, m.version): m.reason for m in client.get_model_repository_index().models}
    assert reasons[("m", "2")] == ""


def test_bad_traffic_is_refused(make_server, tmp_path: Path) -> None:
    server = make_server(repository(tmp_path, "traffic: {1: 90, 2: 10}\n"))
    for body, fragment in (
        ({"traffic": "1=90,3=10"}, "names version 3, which is not loaded"),
        ({"traffic": "ninety"}, "is not weights such as"),
        ({"traffic": "1=0"}, "some above 0"),
    ):
        request = urllib.request.Request(
            f"http://{server.http_url}/v2/repository/models/m/load",
            data=json.dumps({"parameters": body}).encode(),
            method="POST",
        )
        try:
            urllib.request.urlopen(request, timeout=10)
            raise AssertionError(f"{body} was taken")
        except urllib.error.HTTPError as exc:
            assert exc.code == 400 and fragment in exc.read().decode(), body


def test_shadow_traffic_is_compared_and_never_returned(make_server, tmp_path: Path) -> None:
    traffic = "traffic:\n  weights: {1: 100}\n  shadow: {version: 2, share: 1.0}\n"
    server = make_server(repository(tmp_path, traffic))
    client = grpcclient.InferenceServerClient(server.url)
    for value, count in ((1.0, 30), (-1.0, 10), (200.0, 5)):
        for _ in range(count):
            result = client.infer("m", one_input(value))
            # The client always gets version 1's answer, whatever the candidate does.
            assert result.get_response().model_version == "1"
            assert result.as_numpy("OUTPUT0").tolist() == [[value, value]]
    expected = {"match": 30, "error": 10, "mismatch": 5}
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
            metrics = reply.read().decode()
        name = 'tiffin_shadow_comparisons_total{model="m",version="2",outcome="'
        lines = {outcome: f'{name}{outcome}"}} {n}' for outcome, n in expected.items()}
        if all(line in metrics for line in lines.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(line in metrics for line in lines.values()), [
        line for line in metrics.splitlines() if "shadow" in line
    ]
    assert (
        "shadow version 2 answered differently: output 'OUTPUT0' differs by up to 200"
        in server.log()
    )
    stats = {s.version: s.inference_count for s in client.get_inference_statistics("m").model_stats}
    assert stats["2"] == 35  # it ran the mirrored requests it could (the 10 failed)
