"""What every admin verb shares: how to reach a running server, and how to print answers.

`--url` (TIFFIN_URL, default 127.0.0.1:8001) is the server's gRPC address; `--ssl` with
`--root-cert` (and `--client-cert`/`--client-key` for mutual TLS) as tritonclient takes them;
the bearer token comes from `--token-file` or TIFFIN_TOKEN, never from a flag's value (which
`ps` would show to everyone on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc

from tiffin.clients import InferenceClient
from tiffin.clients.client import InferenceServerError

from ..settings import SettingsError


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("TIFFIN_URL", "127.0.0.1:8001"),
        help="The server's gRPC address, HOST:PORT [env TIFFIN_URL] (default: %(default)s).",
    )
    parser.add_argument("--ssl", action="store_true", help="Call over TLS.")
    parser.add_argument("--root-cert", type=Path, help="PEM CA certificates to trust (TLS).")
    parser.add_argument("--client-cert", type=Path, help="PEM client certificate (mutual TLS).")
    parser.add_argument("--client-key", type=Path, help="PEM client key (mutual TLS).")
    parser.add_argument(
        "--token-file",
        type=Path,
        help="A file holding the bearer token to send [or env TIFFIN_TOKEN].",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds per call.")
    parser.add_argument("--json", action="store_true", help="Print JSON for scripts.")


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read {what} {path}: {exc.strerror}.") from None


def client_from_arguments(args: argparse.Namespace) -> InferenceClient:
    credentials, token = _credentials(args)
    return InferenceClient(args.url, timeout=args.timeout, credentials=credentials, token=token)


def admin_call(args: argparse.Namespace, method: str, document: dict[str, Any]) -> Any:
    """Calls the server's admin service (server/grpc/admin.py); its JSON answer. Errors as
    InferenceServerError, as the client's."""
    credentials, token = _credentials(args)
    channel = (
        grpc.secure_channel(args.url, credentials)
        if credentials is not None
        else grpc.insecure_channel(args.url)
    )
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with channel:
        call = channel.unary_unary(f"/tiffin.admin.v1.Admin/{method}")
        try:
            reply = call(json.dumps(document).encode(), timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise InferenceServerError(exc.code(), exc.details() or "") from None
    return json.loads(reply)


def _credentials(args: argparse.Namespace) -> tuple[grpc.ChannelCredentials | None, str]:
    credentials = None
    if args.ssl or args.root_cert or args.client_cert:
        if bool(args.client_cert) != bool(args.client_key):
            raise SettingsError("--client-cert and --client-key go together.")
        credentials = grpc.ssl_channel_credentials(
            _read(args.root_cert, "the root certificates"),
            _read(args.client_key, "the client key"),
            _read(args.client_cert, "the client certificate"),
        )
    token = os.environ.get("TIFFIN_TOKEN", "")
    if args.token_file is not None:
        token = (_read(args.token_file, "the token file") or b"").decode().strip()
    return credentials, token


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A table on a terminal (rich), or plain aligned columns when piped."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: columns by hand
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        for line in [columns, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        return
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(file=sys.stdout, width=200 if not sys.stdout.isatty() else None).print(table)
