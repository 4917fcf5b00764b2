"""Triton's C++ load generator perf_analyzer, as an independent client, against a real server.

perf_analyzer is not a Python package: it runs through the wrapper in the shared tools folder,
from a private Debian root made by `setup_pa.sh` (see that folder's README). Machines without
it (CI) skip these tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, ServerProcess

WRAPPER_CANDIDATES = [
    Path(os.environ["PERF_ANALYZER"]) if os.environ.get("PERF_ANALYZER") else None,
    ROOT.parent / "shared" / "tools" / "perf_analyzer" / "perf_analyzer",
    Path("/work/shared/tools/perf_analyzer/perf_analyzer"),
]
PA_ROOT = Path(os.environ.get("PA_ROOT") or Path.home() / ".cache" / "pa-root")
PA_BINARY = PA_ROOT / "opt" / "perf_analyzer" / "bin" / "perf_analyzer"
PA_LOADER = PA_ROOT / "lib64" / "ld-linux-x86-64.so.2"

RUN_TIMEOUT_S = 90  # one run: 1 s windows until stable (3 in a row), normally 5-15 s

THROUGHPUT = re.compile(r"Concurrency: 2, throughput: ([0-9.]+) infer/sec, latency (\d+) usec")


def _wrapper() -> Path:
    for candidate in WRAPPER_CANDIDATES:
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("perf_analyzer wrapper not found (shared/tools/perf_analyzer/perf_analyzer)")


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    wrapper = _wrapper()
    if not (PA_BINARY.is_file() and PA_LOADER.exists()):
        pytest.skip(f"perf_analyzer root missing at {PA_ROOT}; run setup_pa.sh to make it")
    try:
        version = subprocess.run(
            [str(wrapper), "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"perf_analyzer does not start: {exc}")
    if version.returncode != 0 or "Perf Analyzer" not in version.stdout + version.stderr:
        pytest.skip(
            f"perf_analyzer does not start (rc {version.returncode}): "
            f"{version.stdout}{version.stderr}"
        )
    return wrapper


@pytest.fixture
def server(perf_analyzer: Path, example_server: ServerProcess) -> ServerProcess:
    """The session's example server (not started where perf_analyzer is missing): a run only
    reads, and perf_analyzer's counts are differences between two reads of the statistics."""
    return example_server


def run_perf_analyzer(
    wrapper: Path, url: str, *args: str, protocol: str = "grpc"
) -> subprocess.CompletedProcess[str]:
    # This checks the protocol, not performance: a loose stability bound keeps a busy
    # two-core CI box from failing the run ("Failed to obtain stable measurement", exit 2).
    command = [
        str(wrapper),
        "-i",
        protocol,
        "-u",
        url,
        "--measurement-interval",
        "500",
        "--concurrency-range",
        "2",
        "--stability-percentage",
        "100",
        "--max-trials",
        "10",
        *args,
    ]
    env = {**os.environ, "PA_ROOT": str(PA_ROOT)}
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env
        )
    except subprocess.TimeoutExpired as exc:
        out = (
            (exc.stdout or b"").decode(errors="replace")
            if isinstance(exc.stdout, bytes)
            else (exc.stdout or "")
        )
        pytest.fail(f"perf_analyzer ran past {RUN_TIMEOUT_S} s: {' '.join(command)}\n{out}")


@pytest.mark.timeout(RUN_TIMEOUT_S + 90)
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param([], id="unary"),
        pytest.param(["--async"], id="async"),
        pytest.param(["--streaming"], id="streaming"),  # implies --async; one ModelStreamInfer each
    ],
)
def test_perf_analyzer_runs_against_server(
    perf_analyzer: Path, server: ServerProcess, mode: list[str]
):
    result = run_perf_analyzer(perf_analyzer, server.url, "-m", "classifier", *mode)
    output = result.stdout + result.stderr
    context = (
        f"perf_analyzer exited {result.returncode}:\n{output}\n--- server log ---\n{server.log()}"
    )

    assert result.returncode == 0, context
    match = THROUGHPUT.search(output)
    assert match, context
    assert float(match.group(1)) > 0, context
    # The server advertises "statistics": perf_analyzer reads ModelStatistics around each
    # window and prints a server-side block, which needs a numeric version and a growing
    # queue count for the version it served.
    assert re.search(r"^\s*Server:\s*$", output, re.MULTILINE), context
    served = re.search(r"Successful request count: (\d+)", output)
    assert served and int(served.group(1)) > 0, context


@pytest.mark.timeout(RUN_TIMEOUT_S + 90)
@pytest.mark.parametrize(
    "model, mode",
    [
        pytest.param("classifier", [], id="unary"),
        pytest.param("classifier", ["--async"], id="async"),
        pytest.param("uppercase", ["--shape", "text:3"], id="bytes"),
    ],
)
def test_perf_analyzer_runs_over_http(
    perf_analyzer: Path, server: ServerProcess, model: str, mode: list[str]
):
    """`-i http`: perf_analyzer's REST client reads the config and statistics as JSON and
    sends binary tensors (Inference-Header-Content-Length) to the REST front door."""
    result = run_perf_analyzer(perf_analyzer, server.http_url, "-m", model, *mode, protocol="http")
    output = result.stdout + result.stderr
    context = (
        f"perf_analyzer exited {result.returncode}:\n{output}\n--- server log ---\n{server.log()}"
    )
    assert result.returncode == 0, context
    match = THROUGHPUT.search(output)
    assert match and float(match.group(1)) > 0, context
    assert re.search(r"^\s*Server:\s*$", output, re.MULTILINE), context
    served = re.search(r"Successful request count: (\d+)", output)
    assert served and int(served.group(1)) > 0, context


@pytest.mark.timeout(RUN_TIMEOUT_S + 90)
def test_perf_analyzer_rejects_batch_on_unbatched_model(perf_analyzer: Path, server: ServerProcess):
    """max_batch_size 0 in ModelConfig: perf_analyzer itself refuses -b > 1 before any load."""
    result = run_perf_analyzer(
        perf_analyzer, server.url, "-m", "uppercase", "--shape", "text:4", "-b", "4"
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "does not support batching" in output, output


@pytest.mark.timeout(RUN_TIMEOUT_S + 90)
def test_perf_analyzer_runs_against_pipeline(
    perf_analyzer: Path, server: ServerProcess, tmp_path: Path
):
    """A pipeline looks like a Triton ensemble: perf_analyzer reads each step's ModelConfig
    and the statistics of every model, and the JSON text goes in as given."""
    record = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    data = tmp_path / "input.json"
    data.write_text(
        json.dumps({"data": [{"json": {"content": [json.dumps(record)], "shape": [1]}}]})
    )
    result = run_perf_analyzer(
        perf_analyzer, server.url, "-m", "classify_json", "--input-data", str(data)
    )
    output = result.stdout + result.stderr
    context = (
        f"perf_analyzer exited {result.returncode}:\n{output}\n--- server log ---\n{server.log()}"
    )
    assert result.returncode == 0, context
    match = THROUGHPUT.search(output)
    assert match and float(match.group(1)) > 0, context
    # The ensemble's composing models are listed in the server-side block.
    assert "parse_measurements" in output and "top_labels" in output, context
