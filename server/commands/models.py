"""`serverctl models`: the models of a running server: versions, states, reasons, instances
and traffic."""

from __future__ import annotations

import argparse
from typing import Any

from tiffin.clients.client import InferenceServerError

from .remote import add_remote_arguments, admin_call, client_from_arguments, print_json, print_table

HELP = "List a running server's models: versions, states, reasons, instances and traffic."
KINDS = {0: "AUTO", 1: "GPU", 2: "CPU", 3: "MODEL"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_remote_arguments(parser)


def _instances(config: Any) -> str:
    groups = [f"{g.count or 1}x{KINDS.get(g.kind, str(g.kind))}" for g in config.instance_group]
    return ", ".join(groups)


def run(args: argparse.Namespace) -> int:
    with client_from_arguments(args) as client:
        entries = [
            {"model": m.name, "version": m.version, "state": m.state, "reason": m.reason}
            for m in client.repository_index()
        ]
        for entry in entries:
            entry["instances"] = ""
            if entry["state"] == "READY":
                try:
                    config = client.model_config(entry["model"], entry["version"])
                    entry["instances"] = _instances(config)
                except InferenceServerError:
                    pass  # gone meanwhile
    try:  # Tiffin's admin service; another KServe server has none
        splits = {s["model"]: s for s in admin_call(args, "Traffic", {})["traffic"]}
    except InferenceServerError:
        splits = {}
    for entry in entries:
        split = splits.get(entry["model"])
        weight = split["weights"].get(entry["version"]) if split else None
        shadow = split and split["shadow"] and str(split["shadow"]["version"]) == entry["version"]
        entry["traffic"] = f"{weight}" if weight is not None else ("shadow" if shadow else "")
    if args.json:
        print_json(entries)
    else:
        columns = ["model", "version", "state", "instances", "traffic", "reason"]
        rows = [[str(e[c]) for c in columns] for e in entries]
        print_table(f"models on {args.url}", columns, rows)
    return 0
