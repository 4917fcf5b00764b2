"""A container recipe for a bundle: a Dockerfile and its build context.

The image holds the bundle itself (checked again each time the container starts: `serverctl
serve --bundle`), a virtual environment with the bundle's locked requirements installed from
its wheelhouse (no index) when it has one, and runs as a non-root user, listening on every
address, with a HEALTHCHECK that asks the gRPC health service.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .manifest import LOCK_FILE, WHEELS_DIR, Manifest

CPU_BASE = "python:3.11-slim"
# A CUDA runtime with cuDNN; Ubuntu 22.04's universe has the Python 3.11 that bundles need.
GPU_BASE = "nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04"
#: The user the server runs as: a number, so that Kubernetes' runAsNonRoot can check it.
USER_ID = 10001
PORTS = (8000, 8001, 8002)
BUNDLE_FILE = "bundle.tar.gz"

# Asks the server's gRPC health service, on the port the server was told to use; a failed
# call is a short line, not a traceback, in `docker inspect`'s health log.
HEALTH_CHECK = (
    "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
    "c = grpc.insecure_channel('127.0.0.1:' + os.environ.get('TIFFIN_GRPC_PORT', '8001')); "
    "f = g.HealthStub(c).Check.future(h.HealthCheckRequest(), timeout=3); "
    "e = f.exception(); "
    "sys.exit(f'not serving: {e.code().name}' if e else "
    "0 if f.result().status == h.HealthCheckResponse.SERVING else 'not serving')"
)


@dataclass(frozen=True)
class Recipe:
    """What goes into an image."""

    base_image: str
    python: str  # the interpreter's command in the base image
    install_python: bool  # the base image has no Python: install it with apt-get
    offline: bool  # every wheel is in the context: install with no index


def recipe_for(gpu: bool, base_image: str | None, offline: bool) -> Recipe:
    """The recipe for a CPU or GPU image, on `base_image` when given."""
    if gpu and base_image is None:
        return Recipe(GPU_BASE, "python3.11", install_python=True, offline=offline)
    return Recipe(base_image or CPU_BASE, "python3", install_python=False, offline=offline)


def dockerfile(manifest: Manifest, recipe: Recipe) -> str:
    """The Dockerfile text for a bundle: one stage installs the locked requirements into a
    virtual environment, the image keeps that environment and the bundle (not the wheels)."""
    major_minor = ".".join(manifest.python.split(".")[:2])
    index = "--no-index " if recipe.offline else ""
    commit = manifest.source.commit if manifest.source else ""
    python = []
    if recipe.install_python:
        python = [
            "RUN apt-get update \\",
            f" && apt-get install -y --no-install-recommends {recipe.python} "
            f"{recipe.python}-venv \\",
            " && rm -rf /var/lib/apt/lists/*",
        ]
    lines = [
        f"# The image of bundle {manifest.name}:{manifest.tag} (sha256 {manifest.content_hash}),",
        "# written by `serverctl containerize`. Run it with `docker run --init` so that an init",
        "# process reaps what the server's workers leave; the server itself handles SIGTERM.",
        f"FROM {recipe.base_image} AS install",
        # Marks this stage's image, which Docker keeps untagged: `docker image prune --filter
        # label=dev.tiffin.stage=install` removes it once the image is built.
        'LABEL dev.tiffin.stage="install"',
        *python,
        f"COPY {LOCK_FILE} /opt/tiffin/{LOCK_FILE}",
        f"COPY {WHEELS_DIR}/ /opt/tiffin/{WHEELS_DIR}/",
        # The wheels are built for the Python that built the bundle: say so if the base differs.
        f"RUN {recipe.python} -c \"import sys; v = '%d.%d' % sys.version_info[:2]; "
        f"sys.exit(0 if v == '{major_minor}' else 'the bundle was built with Python "
        f"{major_minor}, this base image has Python ' + v)\" \\",
        f" && {recipe.python} -m venv /opt/tiffin/venv \\",
        f" && PIP_NO_CACHE_DIR=1 /opt/tiffin/venv/bin/pip install {index}\\",
        f"      --find-links /opt/tiffin/{WHEELS_DIR} -r /opt/tiffin/{LOCK_FILE}",
        "",
        f"FROM {recipe.base_image}",
        *python,
        f'LABEL org.opencontainers.image.title="{manifest.name}" \\',
        f'      org.opencontainers.image.version="{manifest.tag}" \\',
        f'      org.opencontainers.image.revision="{commit}" \\',
        f'      dev.tiffin.bundle.sha256="{manifest.content_hash}"',
        "ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \\",
        "    TIFFIN_HOST=0.0.0.0 TIFFIN_BUNDLE=/opt/tiffin/" + BUNDLE_FILE,
        "COPY --from=install /opt/tiffin/venv /opt/tiffin/venv",
        f"COPY {BUNDLE_FILE} /opt/tiffin/{BUNDLE_FILE}",
        f"USER {USER_ID}:{USER_ID}",
        "EXPOSE " + " ".join(map(str, PORTS)),
        "HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \\",
        f'  CMD ["/opt/tiffin/venv/bin/python", "-c", "{HEALTH_CHECK}"]',
        'ENTRYPOINT ["/opt/tiffin/venv/bin/serverctl", "serve"]',
    ]
    return "\n".join(lines) + "\n"


def write_context(
    bundle: Path, unpacked: Path, manifest: Manifest, recipe: Recipe, target: Path
) -> Path:
    """Writes the build context into `target` (the bundle, its lock and wheels, the
    Dockerfile) and returns the Dockerfile's path. `unpacked`: the checked, unpacked bundle."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle, target / BUNDLE_FILE)
    shutil.copyfile(unpacked / LOCK_FILE, target / LOCK_FILE)
    wheels = target / WHEELS_DIR
    shutil.rmtree(wheels, ignore_errors=True)
    if (unpacked / WHEELS_DIR).is_dir():
        shutil.copytree(unpacked / WHEELS_DIR, wheels)
    wheels.mkdir(exist_ok=True)
    kept = "".join(f"!{name}\n" for name in (BUNDLE_FILE, LOCK_FILE, WHEELS_DIR))
    (target / ".dockerignore").write_text("*\n" + kept)
    path = target / "Dockerfile"
    path.write_text(dockerfile(manifest, recipe))
    return path
