"""`python -m benchmarks peers-setup`: the peers' own virtual environment.

MLServer pins protobuf and grpcio versions of its own, which may not agree with Tiffin's
(protobuf<7, grpcio-tools 1.81, tritonclient 2.73), so the peers live in
`benchmarks/.peers-venv`, made with this Python and pip. Versions are pinned so that runs on
different days compare; onnxruntime is the main environment's version (the CPU package, never
onnxruntime-gpu), so that a peer and Tiffin run the same kernels.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from . import VENV

HELP = "Create benchmarks/.peers-venv with the peer servers (FastAPI, MLServer) pinned."

# fastapi below 0.116: MLServer 1.7.1 requires it.
PEER_REQUIREMENTS = ("mlserver==1.7.1", "fastapi==0.115.14", "uvicorn==0.54.0")
# MLServer 1.7 supports Python 3.9 to 3.12.
MLSERVER_PYTHONS = ((3, 9), (3, 12))


def onnxruntime_requirement() -> str:
    """`onnxruntime==` the main environment's version (also when it holds onnxruntime-gpu,
    whose CPU twin has the same version number), or unpinned when it has neither."""
    for package in ("onnxruntime", "onnxruntime-gpu"):
        try:
            return f"onnxruntime=={metadata.version(package)}"
        except metadata.PackageNotFoundError:
            continue
    return "onnxruntime"


def requirements() -> list[str]:
    return [*PEER_REQUIREMENTS, onnxruntime_requirement()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--venv", type=Path, default=VENV, help="where to create it")


def main(args: argparse.Namespace) -> int:
    low, high = MLSERVER_PYTHONS
    if not low <= sys.version_info[:2] <= high:
        raise SystemExit(
            f"MLServer 1.7 needs Python {low[0]}.{low[1]} to {high[0]}.{high[1]}; run this "
            f"with such a Python (this is {sys.version.split()[0]})"
        )
    venv: Path = args.venv
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wanted = requirements()
    print(f"installing {' '.join(wanted)}", file=sys.stderr)
    installed = subprocess.run([str(python), "-m", "pip", "install", *wanted])
    if installed.returncode != 0:
        raise SystemExit(f"pip could not install the peers into {venv} (see above)")
    checked = subprocess.run([str(python), "-m", "pip", "check"])
    if checked.returncode != 0:
        raise SystemExit(f"the peers' environment {venv} has broken requirements (see above)")
    print(f"peers ready: {python}")
    return 0
