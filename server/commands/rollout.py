"""`serverctl rollout --ref REF`: a running server moves to another ref of its git repository."""

from __future__ import annotations

import argparse

from .remote import add_remote_arguments, admin_call, print_json

HELP = "Move a running server to another ref of its git model repository."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ref", required=True, help="A branch, tag or commit.")
    add_remote_arguments(parser)


def run(args: argparse.Namespace) -> int:
    entry = admin_call(args, "Rollout", {"ref": args.ref})
    if args.json:
        print_json(entry)
    else:
        print(f"serving {entry['ref']} ({entry['commit'][:12]})")
    return 0
