"""`serverctl`: the command-line entry point. Each verb lives in server/commands/.

Errors reach the user as sentences: usage errors (a bad flag or TIFFIN_ variable) exit 2,
others 1; a traceback only with `--log-level DEBUG` (or TIFFIN_LOG_LEVEL=DEBUG). A pipe
closed early (`serverctl validate ... | head`) ends the command quietly.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import traceback
from importlib import metadata

from .commands import (
    build,
    bundles,
    containerize,
    deploy,
    history,
    load,
    models,
    profile,
    rollback,
    rollout,
    serve,
    status,
    token,
    traffic,
    unload,
    validate,
)
from .settings import ENV_PREFIX, SettingsError

VERBS = {
    "serve": serve,
    "validate": validate,
    "build": build,
    "bundles": bundles,
    "containerize": containerize,
    "deploy": deploy,
    "token": token,
    "models": models,
    "load": load,
    "unload": unload,
    "traffic": traffic,
    "rollout": rollout,
    "rollback": rollback,
    "history": history,
    "status": status,
    "profile": profile,
}
# The frameworks behind the backends, by distribution name, as --version reports them.
FRAMEWORKS = ("onnxruntime", "onnxruntime-gpu", "torch", "tritonclient", "numpy", "grpcio")


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def version_text() -> str:
    """Tiffin's version, Python's, and each backend framework found (without importing it)."""
    lines = [f"tiffin {_installed('tiffin') or '0+unknown'}"]
    lines.append(f"Python {platform.python_version()} ({sys.executable})")
    for name in FRAMEWORKS:
        found = _installed(name)
        lines.append(f"{name} {found}" if found else f"{name} not installed")
    return "\n".join(lines)


def _debug(args: argparse.Namespace) -> bool:
    level = getattr(args, "log_level", None) or os.environ.get(ENV_PREFIX + "LOG_LEVEL", "")
    return str(level).upper() == "DEBUG"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="serverctl",
        description="Run and check Tiffin inference servers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # --version's lines as they are
    )
    parser.add_argument("--version", action="version", version=version_text())
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, module in VERBS.items():
        sub = verbs.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"serverctl {args.verb}"
    try:
        return int(VERBS[args.verb].run(args))
    except SettingsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away: point stdout at /dev/null so that the interpreter's final
        # flush does not fail again, and stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a sentence for the user; the traceback only when debugging
        if _debug(args):
            traceback.print_exc()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
