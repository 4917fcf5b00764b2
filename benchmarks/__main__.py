"""`python -m benchmarks VERB ...`: each verb is one module of this folder."""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> module; modules are imported only when their verb runs.
VERBS = {
    "run": "runner",
    "compare": "compare",
    "models": "models",
    "limit": "limit",
    "echo": "echo",
    "load": "load",
    "overload": "overload",
    "swap": "swap",
    "peers-setup": "peers.venv",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Tiffin load tests, reported beside the in-process limit.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    modules = {}
    for verb, module_name in VERBS.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        modules[verb] = module
        sub = verbs.add_parser(verb, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    return int(modules[args.verb].main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
