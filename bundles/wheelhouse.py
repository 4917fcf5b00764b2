"""A bundle's wheelhouse: a wheel for every locked requirement, so that it installs with no
index (`pip install --no-index --find-links wheels -r requirements.lock`).

The wheels come from pip (`pip download` of the pinned versions, binary only, for this
interpreter and platform) and Tiffin's own wheel is built from its source tree, with
SOURCE_DATE_EPOCH fixed so that building it twice gives the same bytes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tiffin.server

from .archive import MTIME

# What a source tree holds besides the source: version control, caches, earlier builds, and
# the benchmark peers' virtual environments (hundreds of MB).
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    "__pycache__",
    "*.egg-info",
    "build",
    "dist",
    ".venv",
    ".*_cache",
    "tests",
    ".peers-venv*",
)


class WheelhouseError(RuntimeError):
    """pip could not provide a wheel; the message gives pip's last lines."""


def tiffin_source_tree() -> Path:
    """The folder holding Tiffin's pyproject.toml (an install from the source tree)."""
    root = Path(tiffin.server.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "tiffin"' not in pyproject.read_text():
        raise WheelhouseError(
            "--wheels builds Tiffin's own wheel from its source tree, but this Tiffin is not "
            f"installed from one ({root} has no Tiffin pyproject.toml); run it from a clone "
            "(pip install -e .)"
        )
    return root


def _pip(arguments: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *arguments],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        said = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise WheelhouseError(f"pip {arguments[0]} failed (exit {done.returncode}):\n{said}")


def build_wheelhouse(lock: str, target: Path) -> list[Path]:
    """Fills `target` with a wheel for each line of `lock` (Tiffin's built from source) and
    returns them, sorted."""
    download_wheels(lock, target)
    build_tiffin_wheel(target)
    return sorted(target.glob("*.whl"))


def download_wheels(lock: str, target: Path) -> None:
    """Downloads into `target` the wheel of each line of `lock` but Tiffin's."""
    target.mkdir(parents=True, exist_ok=True)
    others = [line for line in lock.splitlines() if line and not line.startswith("tiffin==")]
    with tempfile.TemporaryDirectory(prefix="tiffin-lock-") as scratch:
        requirements = Path(scratch) / "requirements.txt"
        requirements.write_text("\n".join(others) + "\n")
        if others:
            _pip(
                [
                    "download",
                    "--no-deps",  # the lock holds every dependency already, pinned
                    "--only-binary",
                    ":all:",
                    "--dest",
                    str(target),
                    "-r",
                    str(requirements),
                ]
            )


def build_tiffin_wheel(target: Path) -> None:
    """Builds Tiffin's wheel from its source tree into `target`."""
    # The build tools installed here, not a fresh isolated environment: no index is needed,
    # and SOURCE_DATE_EPOCH makes the wheel's timestamps those of the bundle.
    # A copy of the tree, so that the build's scratch folders stay out of the checkout.
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(MTIME)}
    with tempfile.TemporaryDirectory(prefix="tiffin-source-") as scratch:
        source = Path(scratch) / "tiffin"
        shutil.copytree(tiffin_source_tree(), source, ignore=_NOT_SOURCE)
        _pip(
            ["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(target), str(source)],
            env=env,
        )
