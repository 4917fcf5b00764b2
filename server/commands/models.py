"""`serverctl models`: the models of a running server, their versions, states and reasons."""

from __future__ import annotations

import argparse

from .remote import add_remote_arguments, client_from_arguments, print_json, print_table

HELP = "List a running server's models: versions, states and reasons."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_remote_arguments(parser)


def run(args: argparse.Namespace) -> int:
    with client_from_arguments(args) as client:
        entries = [
            {"model": m.name, "version": m.version, "state": m.state, "reason": m.reason}
            for m in client.repository_index()
        ]
    if args.json:
        print_json(entries)
    else:
        rows = [[e["model"], e["version"], e["state"], e["reason"]] for e in entries]
        print_table(f"models on {args.url}", ["model", "version", "state", "reason"], rows)
    return 0
