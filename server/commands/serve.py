"""`serverctl serve`: serve a model repository, or a bundle, until SIGTERM or Ctrl-C.

A bundle (`--bundle FILE`, or a name:tag or hash from the local store) is unpacked into a
temporary folder and every file's hash checked before any model loads; a bundle that fails a
check is refused, naming the file. The folder is removed when the server stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

from tiffin.backends import place_frontend
from tiffin.bundles.archive import unpack
from tiffin.bundles.manifest import MANIFEST_FILE, REPOSITORY_DIR, Manifest
from tiffin.bundles.store import BundleStore

from ..observability.logs import configure_logging
from ..server import Server
from ..settings import ENV_PREFIX, SettingsError, add_settings_arguments, settings_from_arguments

HELP = "Serve a model repository over the KServe v2 / Triton gRPC and HTTP/REST protocols."

log = logging.getLogger("tiffin.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, skip=("model_repository",))
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model-repository",
        default=os.environ.get(ENV_PREFIX + "MODEL_REPOSITORY"),
        help="Folder of models, one sub-folder each; or give --bundle "
        f"[env {ENV_PREFIX}MODEL_REPOSITORY]",
    )
    source.add_argument(
        "--bundle",
        default=os.environ.get(ENV_PREFIX + "BUNDLE"),
        help="A bundle to serve (serverctl build): a .tar.gz file, or a name:tag or content hash "
        f"in the local bundle store (serverctl bundles) [env {ENV_PREFIX}BUNDLE]",
    )


def _unpack_bundle(reference: str) -> tuple[Path, Manifest]:
    """The checked, unpacked bundle's folder and manifest; BundleError naming what failed."""
    path = Path(reference)
    if path.is_file():
        folder = unpack(path)
    else:
        stored, content_hash = BundleStore().resolve(reference)
        folder = unpack(stored, expected_hash=content_hash)
    return folder, Manifest.model_validate_json((folder / MANIFEST_FILE).read_bytes())


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def set_cpu_scheduling(policy: str) -> None:
    """Puts this thread, and so every thread and worker process started after it, under
    SCHED_BATCH for `policy` "batch".

    Under load a reply wakes a handler thread for each request; with the normal policy the
    woken thread takes the core from the thread that woke it, which still holds Python's
    lock, so it only waits, and the core switches back: measured on one core at c=64, 2.2
    involuntary switches a request fell to 0.3-0.9 and server CPU per request by about a
    tenth. Where the system refuses (not Linux), the normal policy stays."""
    if policy != "batch":
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as exc:
        log.info("the server's threads keep the normal scheduling policy: %s", exc)


def run(args: argparse.Namespace) -> int:
    if args.bundle and args.model_repository:
        raise SettingsError(
            "--bundle and --model-repository (or their TIFFIN_ variables) are both given; "
            "serve one or the other."
        )
    if not args.bundle and not args.model_repository:
        raise SettingsError("--model-repository or --bundle is required.")
    if not args.bundle:
        return _serve(args)
    # SIGTERM while a large bundle is unpacked: stop there, and leave no half-written folder.
    signal.signal(signal.SIGTERM, _interrupt)
    folder, manifest = _unpack_bundle(args.bundle)
    try:
        args.model_repository = str(folder / REPOSITORY_DIR)
        return _serve(args, manifest)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _serve(args: argparse.Namespace, bundle: Manifest | None = None) -> int:
    settings = settings_from_arguments(args, args.argv)
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    # Handlers first, so that a signal during model loading still shuts down cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    if bundle is not None:
        log.info(
            "bundle %s:%s (sha256 %s): %d files checked",
            bundle.name,
            bundle.tag,
            bundle.content_hash,
            len(bundle.files),
        )
    # Before any thread starts: threads inherit both.
    set_cpu_scheduling(settings.cpu_scheduling)
    log.info("%s", place_frontend(settings.frontend_core))
    server = Server(settings)
    try:
        server.start()
    except (OSError, FileNotFoundError) as exc:
        log.error("%s", exc)
        server.stop(0)
        return 1
    for model in server.registry.models():
        if model.error:
            log.info("model %-24s UNAVAILABLE  %s", model.name, model.error.splitlines()[0])
        for number, version in sorted(model.versions.items()):
            log.info(
                "model %-24s version %-4d %s%s",
                model.name,
                number,
                version.state,
                f"  {version.reason}" if version.reason else "",
            )
    http = f" and HTTP {settings.host}:{server.http_port}" if settings.allow_http else ""
    log.info("ready on gRPC %s:%d%s (Ctrl-C or SIGTERM to stop)", settings.host, server.port, http)
    stop.wait()
    server.stop()
    return 0
