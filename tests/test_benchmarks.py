"""The benchmark pipeline (`python -m benchmarks`): a tiny whole run, and its parts.

The smoke run checks that the pipeline produces well-formed outputs, not speeds: a busy CI box
must not fail it. perf_analyzer is not needed (the lean client only).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import compare, models, peers, report  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TARGETS = ("tiffin", "echo-sync", "echo-aio")
MODES = ("unary", "streaming")


def _cpus() -> tuple[str, str]:
    """Server and client cpus: two different ones when this process may use two."""
    cpus = sorted(os.sched_getaffinity(0))
    return (str(cpus[1]), str(cpus[0])) if len(cpus) > 1 else (str(cpus[0]), str(cpus[0]))


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _tiny_run(out: Path, *flags: str, timeout: float) -> Path:
    """`python -m benchmarks run` with `flags` at one mlp point, 1 s long, into `out`."""
    server_cpus, client_cpus = _cpus()
    command = [
        sys.executable, "-m", "benchmarks", "run", *flags,
        "--models", "mlp",
        "--concurrency", "1",
        "--clients", "lean",
        "--server-cpus", server_cpus,
        "--client-cpus", client_cpus,
        "--duration", "1",
        "--warmup", "0.3",
        "--limit-seconds", "0.05",
        "--out", str(out),
        "--model-repository", str(out / "models"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_run(tmp_path_factory.mktemp("bench"), "--modes", "unary,streaming", timeout=100)


@pytest.mark.timeout(150)
def test_smoke_run_writes_json(smoke_run: Path):
    run = json.loads((smoke_run / "run.json").read_text())
    for key in ("environment", "pinning", "load_average", "settings", "limit", "results"):
        assert key in run, key
    env = run["environment"]
    assert env["python"] and env["packages"]["grpcio"] and env["packages"]["onnxruntime"]
    assert "tiffin_commit" in env
    assert run["pinning"]["server_cpus"] and run["pinning"]["client_cpus"]
    for when in ("before", "after"):
        assert len(run["load_average"][when]) == 3
        assert all(_finite(x) for x in run["load_average"][when])
    limit = run["limit"]["mlp"]
    assert _finite(limit["best_items_per_s"]) and limit["best_items_per_s"] > 0
    assert [b["batch"] for b in limit["batches"]] == [1, 2, 4, 8, 16, 32, 64]
    assert run["server_exit_status"] == {t: 0 for t in TARGETS}
    assert run["notes"] == []

    points = {(r["target"], r["mode"]): r for r in run["results"]}
    assert set(points) == {(t, m) for t in TARGETS for m in MODES}
    for (target, mode), r in points.items():
        assert r["client"] == "lean" and r["concurrency"] == 1
        assert r["errors"] == {}, (target, mode, r)
        assert _finite(r["throughput"]) and r["throughput"] >= 0
        # Speed is not asserted: a shared box can stall a server through a whole 1 s window,
        # so only the echo servers (part of this pipeline) must have answered.
        if target.startswith("echo-"):
            assert r["requests"] > 0, (target, mode, r)
        if r["requests"]:
            lat = r["latency_ms"]
            assert all(_finite(lat[k]) for k in ("p50", "p90", "p99", "mean", "max"))
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]

    derived = {d["mode"]: d for d in run["derived"]}
    assert set(derived) == set(MODES)
    for d in derived.values():
        for key in ("limit", "echo", "ideal", "ratio_limit", "ratio_ideal"):
            assert _finite(d[key]), (key, d)
        assert d["ideal"] == pytest.approx(1 / (1 / d["limit"] + 1 / d["echo"]))


@pytest.mark.timeout(150)
def test_smoke_run_writes_markdown_and_plot(smoke_run: Path):
    text = (smoke_run / "results.md").read_text()
    assert text.startswith("# Tiffin benchmark")
    assert "÷ ideal" in text and "## The limit" in text and "## Transport ceiling" in text
    for mode in MODES:
        assert f"| mlp | {mode} | 1 |" in text
    png = (smoke_run / "results.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert (smoke_run / "server.log").exists()


def test_generated_models_match_the_spec():
    ort = pytest.importorskip("onnxruntime")
    for name, spec in models.MODELS.items():
        model = models.build(name)
        assert model.ir_version == models.IR_VERSION
        assert [o.version for o in model.opset_import] == [models.OPSET]
        assert model.SerializeToString() == models.build(name).SerializeToString()  # seeded
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        (out,) = session.run(["OUTPUT0"], {"INPUT0": spec.sample(3)})
        assert out.shape == (3, *spec.output_dims) and out.dtype == np.float32
        assert np.isfinite(out).all()


def test_config_yaml_follows_the_flags():
    text = models.config_yaml(models.RepositoryOptions("inline", 2, 500))
    assert "kind: inline" in text and "count: 2" in text
    assert "max_queue_delay_microseconds: 500" in text and "intra_op_thread_count: 1" in text
    with pytest.raises(ValueError, match="instance kind"):
        models.config_yaml(models.RepositoryOptions("gpu"))


def _run(throughput: float, p99: float, limit: float, echo: float) -> dict:
    point = {"model": "mlp", "mode": "unary", "client": "lean", "concurrency": 64}
    results = [
        {"target": "tiffin", **point, "throughput": throughput,
         "latency_ms": {"p50": 1.0, "p99": p99}},
        {"target": "echo-aio", **point, "throughput": echo, "latency_ms": {"p50": 0.5, "p99": 1}},
        {"target": "echo-sync", **point, "throughput": echo / 2,
         "latency_ms": {"p50": 0.4, "p99": 1}},
    ]  # fmt: skip
    limits = {"mlp": {"best_items_per_s": limit, "batch1_p50_ms": 0.13}}
    return {
        "started": "t",
        "environment": {"tiffin_commit": "abc"},
        "limit": limits,
        "results": results,
        "derived": report.derive(limits, results),
    }


def test_ideal_uses_the_better_echo_server():
    (d,) = _run(1000, 5.0, limit=20000, echo=5000)["derived"]
    assert d["echo"] == 5000 and d["echo_target"] == "echo-aio"
    assert d["ideal"] == pytest.approx(4000)
    assert d["ratio_ideal"] == pytest.approx(0.25) and d["ratio_limit"] == pytest.approx(0.05)


def test_ideal_falls_back_to_the_lean_echo():
    """perf_analyzer is not run against echo servers with large answers: the lean echo of the
    same mode stands in, and says so."""
    run = _run(1000, 5.0, limit=20000, echo=5000)
    pa = {**run["results"][0], "client": "perf_analyzer", "mode": "unary_async"}
    (d,) = report.derive(run["limit"], [pa, *run["results"][1:]])
    assert d["echo"] == 5000 and d["echo_client"] == "lean"
    assert d["ideal"] == pytest.approx(4000)


def test_compare_prints_the_change():
    a, b = _run(1000, 5.0, 20000, 5000), _run(1500, 4.0, 22000, 5000)
    b["results"].append({**b["results"][0], "concurrency": 8})
    text = compare.compare(a, b)
    line = next(ln for ln in text.splitlines() if ln.startswith("| tiffin mlp unary lean c=64"))
    assert "1,000" in line and "1,500" in line and "+50.0%" in line and "-20.0%" in line
    assert "limit mlp: 20,000 -> 22,000 items/s (+10.0%)" in text
    assert "only in B: tiffin mlp unary lean c=8" in text


# ---- python -m benchmarks run --side-by-side --------------------------------------------

SIDE_BY_SIDE_TARGETS = ("tiffin", "tiffin-tuned", "echo-sync", "echo-aio")


def _peer_available(peer: str) -> bool:
    try:
        peers.peer_python(peer)
    except peers.PeerUnavailable:
        return False
    return True


@pytest.fixture(scope="module")
def side_by_side_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One point per server: Tiffin as a user configures it, hand-tuned, the peers that can
    run here (FastAPI from the test extra; MLServer and BentoML only from their own venvs),
    echo, limit."""
    return _tiny_run(tmp_path_factory.mktemp("side"), "--side-by-side", timeout=140)


@pytest.mark.timeout(180)
def test_side_by_side_serves_the_config_a_user_writes(side_by_side_run: Path):
    run = json.loads((side_by_side_run / "run.json").read_text())
    user_config = "max_batch_size: 64\ndynamic_batching: {}\n"
    assert (side_by_side_run / "models" / "mlp" / "config.yaml").read_text() == user_config
    settings = run["settings"]
    assert settings["side_by_side"] and settings["tiffin_config"] == "user"
    assert settings["modes"] == ["unary"]
    assert settings["config_yaml"]["tiffin"] == user_config
    tuned = settings["config_yaml"]["tiffin-tuned"]
    assert "kind: inline" in tuned and "intra_op_thread_count: 1" in tuned
    assert _finite(run["limit"]["mlp"]["best_items_per_s"])
    # What the server chose where the config left it open, as it served it.
    assert set(run["served_choices"]) == {"tiffin", "tiffin-tuned"}
    assert run["served_choices"]["tiffin"]["mlp"]["instance_group"]


@pytest.mark.timeout(180)
def test_side_by_side_measures_every_server(side_by_side_run: Path):
    run = json.loads((side_by_side_run / "run.json").read_text())
    available = [p for p in peers.PEERS if _peer_available(p)]
    targets = (*SIDE_BY_SIDE_TARGETS, *available)
    assert run["server_exit_status"] == {t: 0 for t in targets}
    points = {r["target"]: r for r in run["results"]}
    assert set(points) == set(targets)
    for target, r in points.items():
        assert r["mode"] == "unary" and r["concurrency"] == 1
        assert r["client"] == peers.PEER_CLIENTS.get(target, "lean")
        assert r["errors"] == {}, (target, r)
        assert _finite(r["throughput"]) and r["throughput"] >= 0
    for peer in (p for p in peers.PEERS if p not in available):
        hint = f"peer {peer} skipped: run `python -m benchmarks peers-setup`"
        assert any(n.startswith(hint) for n in run["notes"]), run["notes"]

    table = run["side_by_side"]
    assert table["columns"] == [{"model": "mlp", "concurrency": 1}]
    rows = {row["target"]: row for row in table["rows"]}
    assert set(rows) == {"tiffin", "tiffin-tuned", *available}
    for target in ("tiffin", "tiffin-tuned"):
        (cell,) = rows[target]["cells"]
        if cell["throughput"]:  # a stalled box may leave a point empty; the figures add up
            assert _finite(cell["ratio_limit"]) and _finite(cell["ratio_ideal"])
    (reference,) = table["references"]
    assert reference["ideal"] == pytest.approx(1 / (1 / reference["limit"] + 1 / reference["echo"]))
    verdicts = table["verdicts"]
    assert isinstance(verdicts["default_vs_tuned"]["within"], bool)
    if available:
        assert isinstance(verdicts["tiffin_ahead_of_peers"]["ahead"], bool)

    text = (side_by_side_run / "results.md").read_text()
    assert "## Side by side" in text and "| server | mlp c=1 |" in text
    assert f"| {report.USER_CONFIG_LABEL} |" in text and f"| {report.TUNED_LABEL} |" in text
    assert "↳ ÷ limit / ÷ ideal" in text and "ideal = 1 / (1/limit + 1/echo)" in text
    assert "within 5% of the hand-tuned config at every point" in text


@pytest.mark.timeout(180)
@pytest.mark.parametrize("peer", ["mlserver", "bentoml"])
def test_side_by_side_runs_peers_from_their_venvs(side_by_side_run: Path, peer: str):
    if not _peer_available(peer):
        pytest.skip(f"the {peer} peer needs its venv: run `python -m benchmarks peers-setup`")
    run = json.loads((side_by_side_run / "run.json").read_text())
    (r,) = [r for r in run["results"] if r["target"] == peer]
    assert r["client"] == peers.PEER_CLIENTS[peer] and r["errors"] == {}
    assert run["environment"]["peers"][peer]["packages"][peer]
    assert peers.PEER_DESCRIPTIONS[peer] in (side_by_side_run / "results.md").read_text()
    if peer == "mlserver":
        settings = json.loads(
            (side_by_side_run / "mlserver-settings" / "settings.json").read_text()
        )
        assert settings["parallel_workers"] == 0


def test_mlserver_settings_batch_adaptively(tmp_path: Path):
    ports = peers.write_mlserver_settings(tmp_path, ROOT / "benchmarks" / "models", ["mlp"])
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["parallel_workers"] == 0 and settings["host"] == "127.0.0.1"
    assert {settings[k] for k in ports} == set(ports.values())
    model = json.loads((tmp_path / "mlp" / "model-settings.json").read_text())
    assert model["implementation"] == "mlserver_runtime.OnnxRuntimeModel"
    assert model["max_batch_size"] == 32 and model["max_batch_time"] == pytest.approx(0.003)
    assert model["parameters"]["uri"].endswith("mlp/1/model.onnx")


def test_a_peer_without_its_environment_says_how_to_set_it_up(tmp_path: Path):
    with pytest.raises(peers.PeerUnavailable, match="run `python -m benchmarks peers-setup`"):
        peers.peer_python("mlserver", venv=tmp_path / "absent")
    with pytest.raises(ValueError, match="unknown peer"):
        peers.peer_python("triton", venv=tmp_path / "absent")


def _side_by_side(figures: dict[str, tuple[float, float]]) -> dict:
    """A run of made-up unary figures: target -> (mlp c=64, mlp c=1)."""
    results = [
        {"target": target, "model": "mlp", "mode": "unary", "concurrency": c,
         "client": peers.PEER_CLIENTS.get(target, "lean"), "throughput": value}
        for target, values in figures.items()
        for c, value in zip((64, 1), values, strict=True)
    ]  # fmt: skip
    limits = {"mlp": {"best_items_per_s": 20000.0, "best_batch": 8, "batches": []}}
    run = {
        "settings": {"models": ["mlp"], "tiffin_config": "user"},
        "pinning": {"server_cpus": "1", "client_cpus": "0"},
        "limit": limits,
        "results": results,
    }
    run["derived"] = report.derive(limits, results)
    return run


def test_side_by_side_verdicts():
    run = _side_by_side(
        {
            "tiffin": (3000, 500),
            "tiffin-tuned": (3100, 800),
            "fastapi": (1400, 900),
            "mlserver": (1000, 200),
            "echo-sync": (5000, 1500),
        }
    )
    table = report.side_by_side(run)
    assert table is not None
    assert table["columns"] == [
        {"model": "mlp", "concurrency": 64},
        {"model": "mlp", "concurrency": 1},
    ]
    assert [row["target"] for row in table["rows"]] == [
        "tiffin",
        "tiffin-tuned",
        "fastapi",
        "mlserver",
    ]
    tiffin = table["rows"][0]["cells"][0]
    assert tiffin["ratio_limit"] == pytest.approx(3000 / 20000)
    assert tiffin["ratio_ideal"] == pytest.approx(3000 / (1 / (1 / 20000 + 1 / 5000)))
    assert table["references"][0]["echo"] == 5000
    (behind,) = table["verdicts"]["tiffin_ahead_of_peers"]["behind"]
    assert behind == {"model": "mlp", "concurrency": 1, "peer": "fastapi", "tiffin": 500,
                      "peer_throughput": 900}  # fmt: skip
    assert table["verdicts"]["tiffin_ahead_of_peers"]["ahead"] is False
    assert table["verdicts"]["default_vs_tuned"]["within"] is False  # 500 / 800 at c=1
    text = report.markdown({**run, "environment": {}, "started": "t",
                            "settings": {**run["settings"], "warmup_s": 1, "duration_s": 1,
                                         "streams": 4}})  # fmt: skip
    assert "behind at mlp c=1 fastapi 900 vs 500" in text
    assert "(default ÷ tuned: mlp c=64 0.97, mlp c=1 0.62)" in text
    # Without peers or tiffin-tuned there is no side-by-side table.
    assert report.side_by_side(_side_by_side({"tiffin": (1, 1), "echo-aio": (2, 2)})) is None


def test_side_by_side_takes_the_median_of_rounds():
    """--rounds N: each cell is the median of the rounds' figures, shown with their range;
    Tiffin's ratios follow the median."""
    figures = {"tiffin": (900, 100, 1000), "fastapi": (950, 960, 970), "echo-aio": (2000,) * 3}
    results = [
        {"target": target, "model": "mlp", "mode": "unary", "concurrency": 1, "round": i,
         "client": peers.PEER_CLIENTS.get(target, "lean"), "throughput": value}
        for target, values in figures.items()
        for i, value in enumerate(values)
    ]  # fmt: skip
    limits = {"mlp": {"best_items_per_s": 20000.0, "best_batch": 8, "batches": []}}
    run = {
        "started": "t",
        "environment": {},
        "settings": {"models": ["mlp"], "tiffin_config": "user", "rounds": 3, "warmup_s": 1,
                     "duration_s": 1, "streams": 4},
        "pinning": {"server_cpus": "1", "client_cpus": "0"},
        "limit": limits,
        "results": results,
        "derived": report.derive(limits, results),
    }  # fmt: skip
    table = report.side_by_side(run)
    assert table is not None
    tiffin, fastapi = (row["cells"][0] for row in table["rows"])
    assert tiffin["throughput"] == 900 and tiffin["rounds"] == [900, 100, 1000]
    assert tiffin["ratio_limit"] == pytest.approx(900 / 20000)
    assert fastapi["throughput"] == 960
    assert table["verdicts"]["tiffin_ahead_of_peers"]["ahead"] is False
    text = report.markdown(run)
    assert "median of 3 rounds" in text and "| 900 (100–1,000) |" in text
    assert "| mlp | unary | 1 (round 2) | 100 |" in text


# ---- python -m benchmarks overload -------------------------------------------------------

OVERLOAD_COUNTS = (
    "OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "other", "not_sent"
)  # fmt: skip


def _check_phase(f: dict, capacity: float) -> None:
    """The figures of one phase agree with each other (whatever the speed)."""
    assert set(f["counts"]) == set(OVERLOAD_COUNTS)
    assert sum(f["counts"].values()) == f["offered"]
    assert sum(f["other_codes"].values()) == f["counts"]["other"]
    assert f["counts"]["OK"] == f["good"] + f["ok_late"]
    assert sum(b["offered"] for b in f["timeline"]) == f["offered"]
    assert sum(b["good"] for b in f["timeline"]) == f["good"]
    assert f["offered_rate"] == pytest.approx(f["offered"] / f["duration_s"])
    assert f["goodput"] == pytest.approx(f["good"] / f["duration_s"])
    assert f["goodput_ratio"] == pytest.approx(f["goodput"] / capacity)
    for key in ("admitted_ms", "refused_ms", "deadline_exceeded_ms", "lag_ms"):
        q = f[key]
        if q is not None:
            assert all(_finite(q[k]) for k in ("p50", "p99", "max"))
            assert q["p50"] <= q["p99"] <= q["max"]
    assert (f["admitted_ms"] is None) == (f["counts"]["OK"] == 0)
    assert isinstance(f["kept_schedule"], bool)


@pytest.mark.timeout(150)
def test_overload_run_writes_json(tmp_path: Path):
    """Short phases at a low rate (a few percent of the measured capacity) against a real
    server: the report is complete and its counts add up."""
    server_cpus, client_cpus = _cpus()
    command = [
        sys.executable, "-m", "benchmarks", "overload",
        "--model", "mlp",
        "--capacity-concurrency", "8",
        "--capacity-seconds", "1",
        "--capacity-warmup", "0.3",
        "--overload", "0.05",
        "--duration", "2",
        "--recovery-load", "0.02",
        "--recovery-duration", "2",
        "--deadline-ms", "1000",
        "--server-cpus", server_cpus,
        "--client-cpus", client_cpus,
        "--out", str(tmp_path),
        "--model-repository", str(tmp_path / "models"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert done.returncode == 0, done.stdout + done.stderr
    run = json.loads((tmp_path / "overload.json").read_text())
    for key in ("environment", "pinning", "load_average", "settings", "capacity", "phases"):
        assert key in run, key
    assert run["environment"]["packages"]["grpcio"] and "tiffin_commit" in run["environment"]
    assert run["pinning"] == {**run["pinning"], "server_cpus": server_cpus}
    for when in ("before", "after"):
        assert len(run["load_average"][when]) == 3
    assert run["capacity"]["measured"] and run["capacity"]["req_per_s"] > 0
    assert run["server_exit_status"] == 0 and run["notes"] == []

    capacity = run["capacity"]["req_per_s"]
    phases = run["phases"]
    assert list(phases) == ["overload", "recovery"]
    for f in phases.values():
        _check_phase(f, capacity)
    assert phases["overload"]["offered"] > 0
    assert phases["overload"]["rate"] == pytest.approx(0.05 * capacity)
    assert phases["recovery"]["rate"] == pytest.approx(0.02 * capacity)
    assert "recovery_s" in phases["recovery"]

    work = run["server_work"]
    assert work["answered_in_time"] == sum(f["good"] for f in phases.values())
    assert isinstance(work["rows_executed"], int) and isinstance(work["settled"], bool)
    target = run["target"]
    assert target["goodput_ratio"] == phases["overload"]["goodput_ratio"]
    assert target["pass"] == (target["goodput_ok"] and target["admitted_p99_ok"])

    text = (tmp_path / "overload.md").read_text()
    assert text.startswith("# Tiffin overload benchmark")
    assert "| overload | 0.05x, 2 s |" in text and "| recovery | 0.02x, 2 s |" in text
    assert "## Against the target" in text and ("**PASS**" in text or "**FAIL**" in text)


def test_overload_summary_counts_and_recovery():
    """Figures from made-up records: phases by scheduled time, good = OK within the deadline,
    recovery = the first window from which a second's worth of requests are good."""
    from benchmarks.overload_report import Phase, Records, summarise

    records = Records()

    def add(t: float, waited: float, code: str) -> None:
        records.scheduled.append(t)
        records.sent.append(t + 0.001)
        records.done.append(t + waited)
        records.codes.append(code)

    for i in range(100):  # overload, 0..1 s: 40 good, 10 OK too late, 30 refused, 20 expired
        if i < 50:
            add(i / 100, 0.2 if i < 40 else 1.5, "OK")
        elif i < 80:
            add(i / 100, 0.01, "RESOURCE_EXHAUSTED")
        else:
            add(i / 100, 1.0, "DEADLINE_EXCEEDED")
    for i in range(40):  # recovery, 1..3 s: expired before 1.5 s, good from then on
        t = 1 + i / 20
        add(t, 0.1 if t >= 1.5 else 1.0, "OK" if t >= 1.5 else "DEADLINE_EXCEEDED")
    add(1.12, 0.0, "NOT_SENT")
    add(1.13, 0.0, "INVALID_RESPONSE")
    phases = [Phase("overload", 2.0, 100.0, 0.0, 1.0), Phase("recovery", 0.5, 20.0, 1.0, 2.0)]
    s = summarise(records, phases, capacity=50.0, deadline_s=1.0, rows=120)

    over, rec = s["phases"]["overload"], s["phases"]["recovery"]
    assert over["counts"] == {
        "OK": 50, "RESOURCE_EXHAUSTED": 30, "UNAVAILABLE": 0, "DEADLINE_EXCEEDED": 20,
        "other": 0, "not_sent": 0,
    }  # fmt: skip
    assert over["good"] == 40 and over["ok_late"] == 10
    assert over["goodput"] == pytest.approx(40.0) and over["goodput_ratio"] == pytest.approx(0.8)
    assert over["refused_ms"]["p99"] == pytest.approx(10.0)
    assert rec["offered"] == 42 and rec["counts"]["not_sent"] == 1
    assert rec["other_codes"] == {"INVALID_RESPONSE": 1}
    assert rec["kept_schedule"] is False  # one request not sent
    # Windows of 0.25 s from the drop at 1 s: [1.5, 1.75) starts a second of good ones.
    assert rec["recovery_s"] == pytest.approx(0.5)
    assert s["server_work"]["answered_in_time"] == 40 + 30
    assert s["server_work"]["wasted_fraction"] == pytest.approx(1 - 70 / 120)
    assert s["target"]["goodput_ok"] and s["target"]["admitted_p99_ok"] is False
    assert s["target"]["pass"] is False


def test_swap_run_writes_json(tmp_path: Path):
    """A short swap scenario against a real server: the reload happens under load, every
    request is answered, and the report holds the steady and swap-second p99."""
    server_cpus, client_cpus = _cpus()
    command = [
        sys.executable, "-m", "benchmarks", "swap",
        "--model", "mlp",
        "--concurrency", "2",
        "--steady", "2",
        "--swaps", "1",
        "--every", "1",
        "--server-cpus", server_cpus,
        "--client-cpus", client_cpus,
        "--out", str(tmp_path),
        "--model-repository", str(tmp_path / "models"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert done.returncode == 0, done.stdout + done.stderr
    run = json.loads((tmp_path / "swap.json").read_text())
    assert run["failed"] == 0 and run["requests"] > 50
    assert run["steady_p99_ms"] > 0 and len(run["swaps"]) == 1
    assert run["swaps"][0]["requests_in_swap_second"] > 0


def test_load_stops_at_max_requests():
    """`--max-requests N` ends the run at the Nth answer, not at `--duration`."""
    echo = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "echo", "--kind", "sync", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert echo.stdout is not None
        port = int(echo.stdout.readline().split()[1])  # "READY <port>"
        load = subprocess.run(
            [sys.executable, "-m", "benchmarks", "load", "--url", f"127.0.0.1:{port}",
             "--model", "mlp", "--concurrency", "4", "--duration", "120", "--warmup", "0",
             "--max-requests", "200", "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        echo.terminate()
        echo.wait(10)
    assert load.returncode == 0, load.stderr
    result = json.loads(load.stdout.strip().splitlines()[-1])
    assert result["requests"] == 200 and result["error_count"] == 0
    assert result["duration_s"] < 60
