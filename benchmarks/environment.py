"""What a result depends on besides the code under test: versions, commit, machine, load."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata

from .servers import REPO_ROOT

PACKAGES = ("grpcio", "protobuf", "onnxruntime", "numpy", "tritonclient", "onnx", "tiffin")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def describe() -> dict:
    """Versions of Python and the packages that matter, the tiffin commit, the machine."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": sys.version.split()[0],
        "packages": {name: _version(name) for name in PACKAGES},
        "tiffin_commit": _git("rev-parse", "HEAD"),
        "tiffin_dirty": bool(status) if status is not None else None,
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }


def run_header(server_cpus: str, client_cpus: str, how: str) -> dict:
    """The fields every run.json-like record starts with: when, how it was called, on what
    machine and versions, with which pinning, and the load average before it."""
    from datetime import UTC, datetime

    return {
        "schema": 1,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": ["python", "-m", "benchmarks", *sys.argv[1:]],
        "environment": describe(),
        "pinning": {"server_cpus": server_cpus, "client_cpus": client_cpus, "how": how},
        "load_average": {"before": load_average()},
    }
