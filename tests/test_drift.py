"""Drift monitoring: PSI and KS by hand, a full queue that drops, `serverctl profile`, and a
real server whose PSI gauge crosses 0.2 once its inputs shift."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_metrics import scrape

from conftest import ServerProcess
from models import identity, write_model
from tiffin.protos.model_config import ModelConfig
from tiffin.scheduler import drift
from tiffin.scheduler.drift import (
    FEATURES_PER_TENSOR,
    QUEUE_BATCHES,
    DriftMonitor,
    FeatureProfile,
    Profile,
    bin_counts,
    ks,
    psi,
)
from tiffin.scheduler.request import InferenceRequest, ModelKey
from tiffin.server.commands import profile as profile_command

CONFIG = """\
backend: onnxruntime
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [4]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [4]}]
instance_group: [{kind: inline}]
monitoring: {sample_rate: 1.0, window: 1000, class_outputs: [OUTPUT0]}
"""


def test_psi_by_hand() -> None:
    # Reference halves; the traffic puts a quarter in the first bin, three in the second:
    # (0.25 - 0.5) ln(0.25/0.5) + (0.75 - 0.5) ln(0.75/0.5) = 0.1733 + 0.1014.
    assert psi(np.array([0.5, 0.5]), np.array([1, 3])) == pytest.approx(0.274653, abs=1e-6)
    assert psi(np.array([0.2, 0.3, 0.5]), np.array([20, 30, 50])) == 0.0
    # An empty bin counts as 1e-4, so that the index stays finite.
    expected = (1e-4 - 0.5) * math.log(1e-4 / 0.5) + (1 - 0.5) * math.log(1 / 0.5)
    assert psi(np.array([0.5, 0.5]), np.array([0, 10])) == pytest.approx(expected)


def test_ks_by_hand() -> None:
    assert ks(np.array([1.0, 2, 3]), np.array([2.0, 3, 4])) == pytest.approx(1 / 3)
    assert ks(np.array([1.0, 2, 3]), np.array([1.0, 2, 3])) == 0.0
    assert ks(np.array([1.0, 2]), np.array([5.0, 6, 7])) == 1.0


def test_feature_profile_deciles() -> None:
    values = np.arange(1000, dtype=np.float64)
    feature = FeatureProfile.of(values)
    assert len(feature.edges) == 9 and feature.shares == pytest.approx([0.1] * 10)
    assert bin_counts(feature.edges, values).sum() == 1000
    assert feature.quantiles[0] == 0 and feature.quantiles[-1] == 999
    assert feature.scores(values) == (pytest.approx(0), pytest.approx(0, abs=0.01))
    # Every value above the reference's largest: all in the last bin, KS at its most.
    psi_far, ks_far = feature.scores(values + 2000)
    assert psi_far > 5 and ks_far == 1.0
    profile = Profile({"INPUT0": [feature]}, 1000)
    again = Profile.from_json(profile.to_json(), "p.json")
    assert again.rows == 1000 and np.array_equal(again.tensors["INPUT0"][0].edges, feature.edges)
    with pytest.raises(ValueError, match="p.json is not a drift profile"):
        Profile.from_json("{}", "p.json")


def test_a_full_queue_drops_without_blocking(tmp_path: Path) -> None:
    config = ModelConfig.model_validate(
        {
            "backend": "onnxruntime",
            "max_batch_size": 8,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [4]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [4]}],
            "monitoring": {"sample_rate": 1.0, "capture_first": 10},
        }
    )
    key = ModelKey("m", 1)
    monitor = DriftMonitor(key, config, tmp_path)  # not started: nothing takes from the queue
    rows = np.ones((8, 4), np.float32)
    request = InferenceRequest(key, {"INPUT0": rows}, ["OUTPUT0"], batch_size=8)
    offers = QUEUE_BATCHES + 50
    started = time.perf_counter()
    for _ in range(offers):
        monitor.offer([request], {"OUTPUT0": rows})
    assert time.perf_counter() - started < 1.0
    assert monitor.dropped == 50
    # Started, its thread folds what was queued; the next offers are taken again.
    monitor.start()
    try:
        monitor.offer([request], {"OUTPUT0": rows})
        deadline = time.monotonic() + 10
        while monitor.report().samples < (QUEUE_BATCHES + 1) * 8:
            assert time.monotonic() < deadline, monitor.report()
            time.sleep(1.1)  # reports are computed at most once a second
        assert monitor.report().dropped == 50
    finally:
        monitor.stop()


def test_only_the_sampled_requests_rows_are_taken(tmp_path: Path, monkeypatch) -> None:
    config = ModelConfig.model_validate(
        {
            "backend": "onnxruntime",
            "max_batch_size": 8,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [2, 40]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "INT64", "dims": [3]}],
            "monitoring": {"sample_rate": 0.5, "capture_first": 10},
        }
    )
    key = ModelKey("m", 1)
    monitor = DriftMonitor(key, config, tmp_path)
    sizes = (1, 2, 3)
    requests = [
        InferenceRequest(key, {"INPUT0": np.full((n, 2, 40), i, np.float32)}, [], batch_size=n)
        for i, n in enumerate(sizes)
    ]
    outputs = {"OUTPUT0": np.arange(18).reshape(6, 3)}
    draws = iter([0.9, 0.1, 0.9])  # only the second request is sampled
    monkeypatch.setattr(drift.random, "random", lambda: next(draws))
    monitor.offer(requests, outputs)
    sample = monitor._queue.get_nowait()
    assert sample is not None and sample.rows == 2
    # Its two rows, the first 64 of their 80 elements (the cap), as float64 copies.
    assert sample.features["INPUT0"].shape == (2, FEATURES_PER_TENSOR)
    assert np.all(sample.features["INPUT0"] == 1)
    assert sample.features["OUTPUT0"].tolist() == [[3, 4, 5], [6, 7, 8]]
    # A request that failed is never sampled.
    draws = iter([0.1, 0.9, 0.9])
    monitor.offer(requests, outputs, failed={0})
    assert monitor._queue.empty()


def _profile(model_dir: Path, data: Path) -> int:
    args = argparse.Namespace(model_dir=model_dir, data=data, output=None)
    return profile_command.run(args)


def test_profile_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_model(tmp_path, "m", CONFIG, {1: identity})
    data = tmp_path / "sample.npy"
    np.save(data, np.random.default_rng(0).normal(size=(500, 4)).astype(np.float32))
    assert _profile(model, data) == 0
    assert "wrote" in capsys.readouterr().out
    written = json.loads((model / "profile.json").read_text())
    assert written["rows"] == 500 and len(written["tensors"]["INPUT0"]) == 4
    np.save(data, np.zeros((10, 3), np.float32))
    assert _profile(model, data) == 1
    assert (
        "'INPUT0' is float32 [10, 3]; it needs numbers shaped [rows, 4]" in capsys.readouterr().out
    )
    np.savez(tmp_path / "other.npz", OTHER=np.zeros((10, 4)))
    assert _profile(model, tmp_path / "other.npz") == 1
    assert "holds 'OTHER', which is not a numeric tensor" in capsys.readouterr().out


def test_a_missing_reference_fails_the_load(tmp_path: Path, make_server) -> None:
    write_model(tmp_path, "m", CONFIG, {1: identity})
    server = make_server(tmp_path)
    with grpcclient.InferenceServerClient(server.url) as client:
        assert not client.is_model_ready("m")
        index = client.get_model_repository_index(as_json=True)["models"]
    assert "profile.json does not exist" in index[0]["reason"]


def _drift(server: ServerProcess) -> tuple[float, dict[tuple[str, str], float], dict[str, float]]:
    """Samples, scores by (feature, method) of INPUT0, and OUTPUT0's class shares."""
    found = scrape(server)
    samples = scores = shares = None
    samples = found.get(
        ("tiffin_drift_samples_total", frozenset({("model", "m"), ("version", "1")})), 0.0
    )
    scores, shares = {}, {}
    for (name, labels), value in found.items():
        labels = dict(labels)
        if name == "tiffin_drift_score" and labels["tensor"] == "INPUT0":
            scores[labels["feature"], labels["method"]] = value
        if name == "tiffin_output_class_share":
            shares[labels["class"]] = value
    return samples, scores, shares


def _send(server: ServerProcess, rows: np.ndarray) -> None:
    with grpcclient.InferenceServerClient(server.url) as client:
        for batch in np.split(rows.astype(np.float32), len(rows) // 8):
            tensor = grpcclient.InferInput("INPUT0", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            client.infer("m", [tensor], model_version="1")


def _wait(
    server: ServerProcess, samples: int
) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    deadline = time.monotonic() + 30
    while True:
        seen, scores, shares = _drift(server)
        if seen >= samples and scores:
            return scores, shares
        assert time.monotonic() < deadline, f"{seen} of {samples} rows sampled"
        time.sleep(0.5)


def test_drift_crosses_the_threshold_when_inputs_shift(tmp_path: Path, make_server) -> None:
    rng = np.random.default_rng(7)
    model = write_model(tmp_path, "m", CONFIG, {1: identity})
    np.savez(tmp_path / "reference.npz", INPUT0=rng.normal(size=(5000, 4)))
    assert _profile(model, tmp_path / "reference.npz") == 0
    server = make_server(tmp_path)

    _send(server, rng.normal(size=(1000, 4)))
    before, shares = _wait(server, 1000)
    print("PSI before the shift:", {f: round(before[f, "psi"], 4) for f in "0123"})
    print("KS before the shift:", {f: round(before[f, "ks"], 4) for f in "0123"})
    assert all(before[f, "psi"] < 0.1 for f in "0123"), before
    assert all(before[f, "ks"] < 0.1 for f in "0123"), before
    assert set(shares) == set("0123") and all(0.15 < s < 0.35 for s in shares.values()), shares

    # Features 0 and 1 move to N(2, 1); 2 and 3 stay. The window (1000 rows) turns over.
    shifted = rng.normal(size=(1000, 4))
    shifted[:, :2] += 2
    _send(server, shifted)
    after, shares = _wait(server, 2000)
    print("PSI after the shift:", {f: round(after[f, "psi"], 4) for f in "0123"})
    print("KS after the shift:", {f: round(after[f, "ks"], 4) for f in "0123"})
    assert after["0", "psi"] > 0.2 and after["1", "psi"] > 0.2, after
    assert after["0", "ks"] > 0.5 and after["1", "ks"] > 0.5, after
    assert after["2", "psi"] < 0.1 and after["3", "psi"] < 0.1, after
    # The argmax now lands on the shifted features far more often.
    assert shares["0"] + shares["1"] > 0.8, shares


@pytest.mark.parametrize(
    ("monitoring", "message"),
    [
        ({"reference": "../profile.json"}, "must be a file inside the model folder"),
        ({"sample_rate": 0}, "greater than 0"),
        ({"class_outputs": ["NOPE"]}, "'NOPE', which is not an output"),
    ],
)
def test_monitoring_config_is_checked(monitoring: dict, message: str) -> None:
    document = {
        "backend": "onnxruntime",
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [4]}],
        "monitoring": monitoring,
    }
    with pytest.raises(ValueError, match=message):
        ModelConfig.model_validate(document)


def test_a_captured_reference_from_a_worker_instance(tmp_path: Path, make_server) -> None:
    """No profile file: the first 2000 sampled rows become the reference. The model runs in
    a worker process, whose outputs are views of shared memory until copied."""
    config = CONFIG.replace("kind: inline", "kind: cpu").replace(
        "window: 1000", "window: 1000, capture_first: 2000"
    )
    write_model(tmp_path, "m", config, {1: identity})
    server = make_server(tmp_path)
    rng = np.random.default_rng(11)
    _send(server, rng.normal(size=(2000, 4)))
    before, _ = _wait(server, 2000)
    assert all(before[f, "psi"] < 0.1 for f in "0123"), before
    shifted = rng.normal(size=(1000, 4))
    shifted[:, 3] += 2
    _send(server, shifted)
    after, shares = _wait(server, 3000)
    print(
        "captured reference, PSI after the shift:", {f: round(after[f, "psi"], 4) for f in "0123"}
    )
    assert after["3", "psi"] > 0.2 and all(after[f, "psi"] < 0.2 for f in "012"), after
    assert shares["3"] > 0.6, shares
