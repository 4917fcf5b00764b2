"""Triton's perf_analyzer (C++) as an independent client against the same servers.

perf_analyzer is not a Python package: on this project's machines it runs through the wrapper in
`../shared/tools/perf_analyzer/` from a private Debian root made by `setup_pa.sh` (see the README
there). `find()` locates it (env PERF_ANALYZER first) or says why it is unavailable; the runner
then skips this client with that note.

Modes: `unary` (synchronous calls, one thread per concurrency slot), `unary_async` (`--async`)
and `streaming` (`--streaming`: one ModelStreamInfer stream per concurrency slot). Figures come
from its CSV (`-f`), falling back to the summary it prints.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .servers import REPO_ROOT

MAX_TRIALS = 6  # measurement windows before it gives up on a stable figure
PA_MODES = {"unary": [], "unary_async": ["--async"], "streaming": ["--streaming"]}
WRAPPER_CANDIDATES = (
    REPO_ROOT.parent / "shared" / "tools" / "perf_analyzer" / "perf_analyzer",
    Path("/work/shared/tools/perf_analyzer/perf_analyzer"),
)


@dataclass(frozen=True)
class PerfAnalyzer:
    """A perf_analyzer that starts, and the version it reports."""

    command: Path
    version: str


def _pa_root() -> Path:
    return Path(os.environ.get("PA_ROOT") or Path.home() / ".cache" / "pa-root")


def find() -> tuple[PerfAnalyzer | None, str]:
    """The perf_analyzer to use, or None and the reason it cannot be used."""
    candidates = [Path(os.environ["PERF_ANALYZER"])] if os.environ.get("PERF_ANALYZER") else []
    candidates += WRAPPER_CANDIDATES
    command = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    if command is None:
        return None, "perf_analyzer wrapper not found (shared/tools/perf_analyzer/perf_analyzer)"
    if command.name == "perf_analyzer" and "PERF_ANALYZER" not in os.environ:
        root = _pa_root()
        binary = root / "opt" / "perf_analyzer" / "bin" / "perf_analyzer"
        if not binary.is_file():
            return None, f"perf_analyzer root missing at {root}; run setup_pa.sh to make it"
    try:
        done = subprocess.run(
            [str(command), "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"perf_analyzer does not start: {exc}"
    text = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or "Perf Analyzer" not in text:
        return None, f"perf_analyzer does not start (exit {done.returncode}): {text[:200]}"
    return PerfAnalyzer(command, text.splitlines()[-1]), ""


_SUMMARY = {
    "throughput": re.compile(r"Throughput: ([0-9.]+) infer/sec"),
    "p50": re.compile(r"p50 latency: (\d+) usec"),
    "p90": re.compile(r"p90 latency: (\d+) usec"),
    "p99": re.compile(r"p99 latency: (\d+) usec"),
    "mean": re.compile(r"Avg latency: (\d+) usec"),
    "requests": re.compile(r"Request count: (\d+)"),
}
_PASS = re.compile(r"Pass \[\d+\] throughput: ([0-9.]+) infer/sec\. Avg latency: (\d+) usec")


def parse_csv(path: Path) -> dict | None:
    """The first data row of perf_analyzer's `-f` CSV: throughput and latency (usec)."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    row = rows[0]
    try:
        return {
            "throughput": float(row["Inferences/Second"]),
            "latency_ms": {
                key: float(row[f"{key} latency"]) / 1e3 for key in ("p50", "p90", "p99")
            },
        }
    except (KeyError, ValueError):
        return None


def parse_output(text: str) -> dict | None:
    """The last client summary perf_analyzer printed (used when there is no CSV); failing
    that, the mean of the measurement windows it printed (`unstable`: it never settled)."""
    found = {key: pattern.findall(text) for key, pattern in _SUMMARY.items()}
    if not found["throughput"]:
        passes = [(float(t), float(lat)) for t, lat in _PASS.findall(text)]
        if not passes:
            return None
        return {
            "throughput": sum(t for t, _ in passes) / len(passes),
            "latency_ms": {"mean": sum(lat for _, lat in passes) / len(passes) / 1e3},
            "unstable": True,
            "windows": len(passes),
        }
    latency = {
        key: float(found[key][-1]) / 1e3 for key in ("p50", "p90", "p99", "mean") if found[key]
    }
    result: dict = {"throughput": float(found["throughput"][-1]), "latency_ms": latency or None}
    if found["requests"]:
        result["measured_requests"] = int(found["requests"][-1])
    return result


def run(
    pa: PerfAnalyzer,
    url: str,
    model: str,
    mode: str,
    concurrency: int,
    interval_ms: int,
    timeout: float,
    cpus: str | None = None,
) -> dict:
    """One perf_analyzer measurement; a dict with throughput and latency_ms, or with `error`."""
    from .servers import pinned

    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "out.csv"
        command = pinned(
            [
                str(pa.command),
                "-m",
                model,
                "-i",
                "grpc",
                "-u",
                url,
                "--concurrency-range",
                str(concurrency),
                "--measurement-interval",
                str(interval_ms),
                # Bounded: up to MAX_TRIALS windows, stable when 3 in a row agree within 20 %.
                "--stability-percentage",
                "20",
                "--max-trials",
                str(MAX_TRIALS),
                "-v",  # prints every window: all there is when it never settles
                "-f",
                str(csv_path),
                *PA_MODES[mode],
            ],
            cpus,
        )
        result: dict = {"command": " ".join(command[command.index(str(pa.command)) :])}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
            parsed = parse_output(out or "")
            result["error"] = f"ran past {timeout:.0f} s"
            if parsed:
                result.update(parsed)
            return result
        output = done.stdout + done.stderr
        parsed = parse_csv(csv_path) or parse_output(output)
        summary = parse_output(output)
        if parsed:
            result.update(parsed)
            if summary and "measured_requests" in summary:
                result["measured_requests"] = summary["measured_requests"]
        result["exit_status"] = done.returncode
        if done.returncode != 0 or not parsed:
            lines = [ln for ln in output.splitlines() if ln.strip()]
            result["error"] = f"exit {done.returncode}: " + " | ".join(lines[-3:])[:400]
        return result
