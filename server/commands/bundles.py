"""`serverctl bundles`: the bundles in the local store (tiffin.bundles.store).

The store is `~/.tiffin/bundles`, or the folder TIFFIN_BUNDLE_STORE names; `serverctl build`
adds to it, `serverctl bundles tag` points a name:tag at a stored bundle (promote, roll back),
and `serverctl serve --bundle NAME:TAG` serves from it.
"""

from __future__ import annotations

import argparse
import time

from tiffin.bundles.store import BundleStore

HELP = "List the bundles in the local bundle store, or tag one (promote, roll back)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="List only the bundles of this name.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    tag = actions.add_parser(
        "tag",
        help="Point NAME:TAG at a stored bundle.",
        description="Point NAME:TAG at a stored bundle: `serverctl bundles tag demo:v2 demo:prod`"
        " promotes demo:v2; tagging the bundle that served before rolls back.",
    )
    tag.add_argument("reference", help="The bundle: name:tag, or its content hash (12+ digits).")
    tag.add_argument("target", metavar="NAME:TAG", help="The tag to point at it.")


def run(args: argparse.Namespace) -> int:
    store = BundleStore()
    if args.action == "tag":
        name, colon, tag = args.target.partition(":")
        if not colon:
            raise ValueError(f"{args.target!r} must be NAME:TAG, such as demo:prod")
        entry = store.tag(args.reference, name, tag)
        print(f"{entry.name}:{entry.tag} -> {entry.content_hash}")
        return 0
    entries = [e for e in store.entries() if args.name in (None, e.name)]
    if not entries:
        print(f"no bundles in {store.root}")
        return 0
    rows = [("NAME", "TAG", "SHA256", "CREATED (UTC)", "SIZE")]
    for entry in entries:
        size = f"{entry.path.stat().st_size / 1e6:.1f} MB" if entry.path.is_file() else "missing"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry.created))
        rows.append((entry.name, entry.tag, entry.content_hash[:12], created, size))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0
