"""`serverctl history`: a running server's rollouts: ref, commit, time, who, outcome."""

from __future__ import annotations

import argparse

from .remote import add_remote_arguments, admin_call, print_json, print_table

HELP = "List a running server's rollouts and rollbacks."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_remote_arguments(parser)


def run(args: argparse.Namespace) -> int:
    entries = admin_call(args, "RolloutHistory", {})["history"]
    if args.json:
        print_json(entries)
        return 0
    rows = [
        [
            e["time"],
            e["action"],
            e["ref"],
            e["commit"][:12],
            e["who"],
            e["outcome"] + (f" at {e['step']}: {e['reason']}" if e["step"] else ""),
        ]
        for e in entries
    ]
    columns = ["time", "action", "ref", "commit", "who", "outcome"]
    print_table(f"rollouts on {args.url}", columns, rows)
    return 0
