"""`serverctl token`: make a bearer token for a principal, and add its hash to a token file.

The token is printed once, on stdout, and kept nowhere: the token file holds only its SHA-256.
A running server reads the changed file within a second or two (no restart).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

import yaml

from ..security.principals import ROLES, TokenFileError, parse_token_file, token_digest
from ..settings import SettingsError

HELP = "Make a bearer token for a principal and add its SHA-256 to a token file."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="The principal's name.")
    parser.add_argument(
        "--roles",
        required=True,
        help=f"Comma-separated roles: some of {', '.join(ROLES)}.",
    )
    parser.add_argument(
        "--models", default="", help="Comma-separated models its 'infer' role is limited to."
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help="The token file to add the principal to (made if absent); without it, the "
        "entry to add is printed on stderr.",
    )


def _listed(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def run(args: argparse.Namespace) -> int:
    token = "tk_" + secrets.token_urlsafe(32)
    entry = {"name": args.name, "roles": _listed(args.roles), "token_sha256": token_digest(token)}
    if args.models:
        entry["models"] = _listed(args.models)
    document: dict = {"principals": []}
    if args.token_file is not None and args.token_file.exists():
        document = yaml.safe_load(args.token_file.read_text()) or {"principals": []}
    principals = document.setdefault("principals", [])
    if not isinstance(principals, list):
        raise SettingsError(f"{args.token_file} has a 'principals' that is not a list.")
    principals.append(entry)
    text = yaml.safe_dump(document, sort_keys=False)
    try:
        parse_token_file(text, str(args.token_file or "the new entry"))
    except TokenFileError as exc:
        raise SettingsError(f"{exc}.") from None
    if args.token_file is None:
        print(yaml.safe_dump({"principals": [entry]}, sort_keys=False), end="", file=sys.stderr)
    else:
        # Written aside, then moved into place: a server never reads half a file.
        aside = args.token_file.with_name(args.token_file.name + ".new")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(aside, args.token_file)
        print(f"added '{args.name}' to {args.token_file}", file=sys.stderr)
    print(token)
    return 0
