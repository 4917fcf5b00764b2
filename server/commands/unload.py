"""`serverctl unload NAME`: a running server unloads every version of a model."""

from __future__ import annotations

import argparse

from .remote import add_remote_arguments, client_from_arguments, print_json

HELP = "Unload a model on a running server."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="The model's name.")
    add_remote_arguments(parser)


def run(args: argparse.Namespace) -> int:
    with client_from_arguments(args) as client:
        client.unload_model(args.model)
    if args.json:
        print_json({"model": args.model, "unloaded": True})
    else:
        print(f"unloaded '{args.model}'")
    return 0
