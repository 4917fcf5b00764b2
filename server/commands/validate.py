"""`serverctl validate`: check a model repository without serving it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..repository import read_repository

HELP = "Check every model in a repository offline; exit status 1 if any problem is found."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_repository", type=Path, help="Folder of models to check.")


def run(args: argparse.Namespace) -> int:
    try:
        specs = read_repository(args.model_repository)
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 1
    problems = 0
    for spec in specs:
        found = spec.problems
        if not found:
            versions = ", ".join(str(v.version) for v in spec.versions)
            print(f"ok      {spec.name} (version {versions})")
            continue
        print(f"broken  {spec.name}")
        for problem in found:
            for line in problem.splitlines():
                print(f"        {line}")
        problems += len(found)
    if not specs:
        print(f"error: {args.model_repository} holds no model folders")
        return 1
    print(f"{len(specs)} model(s), {problems} problem(s)")
    return 1 if problems else 0
