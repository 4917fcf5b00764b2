"""`serverctl serve`: serve a model repository until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from ..server import Server
from ..settings import add_settings_arguments, settings_from_arguments

HELP = "Serve a model repository over the KServe v2 / Triton gRPC and HTTP/REST protocols."

log = logging.getLogger("tiffin.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_arguments(args, args.argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    # Handlers first, so that a signal during model loading still shuts down cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
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
