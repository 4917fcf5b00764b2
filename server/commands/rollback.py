"""`serverctl rollback`: a running server returns to the ref that served before the current."""

from __future__ import annotations

import argparse

from .remote import add_remote_arguments, admin_call, print_json

HELP = "Return a running server to the ref it served before the current one."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_remote_arguments(parser)


def run(args: argparse.Namespace) -> int:
    entry = admin_call(args, "Rollback", {})
    if args.json:
        print_json(entry)
    else:
        print(f"rolled back to {entry['ref']} ({entry['commit'][:12]})")
    return 0
