"""`serverctl containerize`: a container image for a bundle (tiffin.bundles.container).

Writes the Dockerfile and its context to --output-dir, then builds the image with `docker
build` when a Docker engine answers; otherwise it prints the command to run where one does.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from tiffin.bundles.archive import unpack
from tiffin.bundles.container import recipe_for, write_context
from tiffin.bundles.manifest import MANIFEST_FILE, WHEELS_DIR, Manifest
from tiffin.bundles.store import BundleStore
from tiffin.bundles.wheelhouse import build_tiffin_wheel

HELP = "Write a Dockerfile for a bundle and build the image when a Docker engine is reachable."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="A bundle file, or a name:tag or hash in the local store.")
    parser.add_argument("--gpu", action="store_true", help="Start from a CUDA runtime image.")
    parser.add_argument(
        "--base-image", help="The image to start from (default: python:3.11-slim, or CUDA's)."
    )
    parser.add_argument(
        "--tag", dest="image", help="The image's name:tag (default: tiffin-NAME:TAG)."
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="Where to write the Dockerfile and its context (default: ./NAME-TAG-image).",
    )
    parser.add_argument(
        "--network",
        help="docker build --network (host on machines whose Docker has no bridge network).",
    )
    parser.add_argument(
        "--no-build", action="store_true", help="Write the context and print the command only."
    )


def _docker_reachable() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def run(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    expected = ""
    if not bundle.is_file():
        bundle, expected = BundleStore().resolve(args.bundle)
    unpacked = unpack(bundle, expected_hash=expected)  # a bundle that fails a check is refused
    try:
        manifest = Manifest.model_validate_json((unpacked / MANIFEST_FILE).read_bytes())
        offline = (unpacked / WHEELS_DIR).is_dir()
        recipe = recipe_for(args.gpu, args.base_image, offline)
        context = args.output_dir or Path(f"{manifest.name}-{manifest.tag}-image")
        dockerfile = write_context(bundle, unpacked, manifest, recipe, context)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
    if not offline:
        # No wheelhouse: pip installs the lock from the index, and Tiffin from its own wheel.
        build_tiffin_wheel(context / WHEELS_DIR)
        print("note: the bundle has no wheelhouse (build --wheels); the image installs from PyPI")
    image = args.image or f"tiffin-{manifest.name}:{manifest.tag}".lower()
    command = ["docker", "build", "--tag", image]
    if args.network:
        command += ["--network", args.network]
    command.append(str(context))
    print(f"wrote {dockerfile} ({recipe.base_image})")
    if args.no_build or not _docker_reachable():
        if not args.no_build:
            print("no Docker engine answers here (docker info failed); build the image with:")
        print(shlex.join(command))
        return 0
    started = time.monotonic()
    done = subprocess.run(command)
    if done.returncode != 0:
        raise RuntimeError(f"docker build failed (exit {done.returncode}): {shlex.join(command)}")
    print(f"built image {image} in {time.monotonic() - started:.0f} s")
    return 0
