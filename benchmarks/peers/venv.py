"""`python -m benchmarks peers-setup`: the peers' own virtual environments.

MLServer pins protobuf and grpcio versions of its own, which may not agree with Tiffin's
(protobuf<7, grpcio-tools 1.81, tritonclient 2.73), so FastAPI and MLServer live in
`benchmarks/.peers-venv`, and BentoML (protobuf 7, OpenTelemetry pins that clash with
MLServer's) in `benchmarks/.peers-venv-bentoml`, each made with this Python and pip. Versions
are pinned so that runs on different days compare; onnxruntime is the main environment's
version (the CPU package, never onnxruntime-gpu), so that a peer and Tiffin run the same
kernels.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from . import PEER_VENVS, PEERS

HELP = "Create the peers' environments (benchmarks/.peers-venv*) with their versions pinned."

# fastapi below 0.116: MLServer 1.7.1 requires it. uvicorn[standard] (httptools, uvloop) is
# what a FastAPI service is deployed with; the pure-Python h11 parser would flatter Tiffin.
PEER_REQUIREMENTS = {
    "fastapi": ("fastapi==0.115.14", "uvicorn[standard]==0.54.0"),
    "mlserver": ("mlserver==1.7.1",),
    "bentoml": ("bentoml==1.4.40",),
}
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


def requirements(peers: list[str]) -> dict[Path, list[str]]:
    """What to install into which environment for these peers."""
    wanted: dict[Path, list[str]] = {}
    for peer in peers:
        wanted.setdefault(PEER_VENVS[peer], []).extend(PEER_REQUIREMENTS[peer])
    return {venv: [*packages, onnxruntime_requirement()] for venv, packages in wanted.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--peers", default=",".join(PEERS), help=f"which peers, any of {', '.join(PEERS)}"
    )


def install(venv: Path, packages: list[str]) -> None:
    """Creates `venv` if it is missing and installs `packages` into it; SystemExit with a
    sentence when pip fails."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"installing {' '.join(packages)} into {venv}", file=sys.stderr)
    if subprocess.run([str(python), "-m", "pip", "install", *packages]).returncode != 0:
        raise SystemExit(f"pip could not install the peers into {venv} (see above)")
    if subprocess.run([str(python), "-m", "pip", "check"]).returncode != 0:
        raise SystemExit(f"the peers' environment {venv} has broken requirements (see above)")


def main(args: argparse.Namespace) -> int:
    chosen = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peer {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    low, high = MLSERVER_PYTHONS
    if "mlserver" in chosen and not low <= sys.version_info[:2] <= high:
        raise SystemExit(
            f"MLServer 1.7 needs Python {low[0]}.{low[1]} to {high[0]}.{high[1]}; run this "
            f"with such a Python (this is {sys.version.split()[0]}), or leave it out with "
            "--peers fastapi,bentoml"
        )
    for venv, packages in requirements(chosen).items():
        install(venv, packages)
        print(f"peers ready: {venv / 'bin' / 'python'}")
    return 0
