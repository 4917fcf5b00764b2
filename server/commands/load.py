"""`serverctl load NAME`: a running server (re)loads a model from its repository folder."""

from __future__ import annotations

import argparse

from .remote import add_remote_arguments, client_from_arguments, print_json

HELP = "Load (or reload) a model on a running server."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="The model's name (its repository folder).")
    add_remote_arguments(parser)


def run(args: argparse.Namespace) -> int:
    with client_from_arguments(args) as client:
        client.load_model(args.model)
    if args.json:
        print_json({"model": args.model, "loaded": True})
    else:
        print(f"loaded '{args.model}'")
    return 0
