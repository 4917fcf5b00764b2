"""`serverctl bundles`: list the bundles in the local store (tiffin.bundles.store).

The store is `~/.tiffin/bundles`, or the folder TIFFIN_BUNDLE_STORE names; `serverctl build`
adds to it, and `serverctl serve --bundle NAME:TAG` serves from it.
"""

from __future__ import annotations

import argparse
import time

from tiffin.bundles.store import BundleStore

HELP = "List the bundles in the local bundle store, with their tags, hashes and dates."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="Only the bundles of this name.")


def run(args: argparse.Namespace) -> int:
    store = BundleStore()
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
