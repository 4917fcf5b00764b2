"""`serverctl traffic NAME 1=90 2=10`: new weights for a model's versions, live (they clear a
rollback); the running server keeps them until the model is reloaded or weights are set again."""

from __future__ import annotations

import argparse

from ..settings import SettingsError
from .remote import add_remote_arguments, client_from_arguments, print_json

HELP = "Set the traffic weights of a model's versions on a running server."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="The model's name.")
    parser.add_argument("weights", nargs="+", help="VERSION=WEIGHT, e.g. 1=90 2=10.")
    add_remote_arguments(parser)


def run(args: argparse.Namespace) -> int:
    for weight in args.weights:
        version, _, share = weight.partition("=")
        if not (version.isdigit() and share.isdigit()):
            raise SettingsError(f"'{weight}' is not VERSION=WEIGHT, such as 1=90.")
    text = ",".join(args.weights)
    with client_from_arguments(args) as client:
        client.load_model(args.model, {"traffic": text})
    if args.json:
        print_json({"model": args.model, "traffic": dict(w.split("=") for w in args.weights)})
    else:
        print(f"traffic for '{args.model}': " + ", ".join(args.weights))
    return 0
