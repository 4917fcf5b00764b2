"""`serverctl`: the command-line entry point. Each verb lives in server/commands/."""

from __future__ import annotations

import argparse
import sys

from .commands import serve, validate

VERBS = {"serve": serve, "validate": validate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="serverctl", description="Run and check Tiffin inference servers."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, module in VERBS.items():
        sub = verbs.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    return VERBS[args.verb].run(args)


if __name__ == "__main__":
    sys.exit(main())
