"""`serverctl build`: make a model repository into a bundle (tiffin.bundles), if it validates.

The repository is checked as `serverctl validate` checks it; a repository with a problem is
refused, so that only what would load becomes a bundle. What this machine lacks (a GPU) is
only a warning, as in validate. The bundle is written to --output and added to the local
bundle store (`serverctl bundles`).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tiffin.bundles.builder import build_bundle
from tiffin.bundles.gitref import export
from tiffin.bundles.manifest import Source
from tiffin.bundles.store import BundleStore, label_problem

from ..repository import read_repository
from .validate import IMPORT_TIMEOUT, _quiet_logs, check_repository

HELP = "Make a model repository that validates into a reproducible bundle (.tar.gz)."
#: The file a python model may keep beside its config.yaml or model.py, locked into the bundle.
REQUIREMENTS_FILE = "requirements.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_repository", type=Path, help="Folder of models to bundle.")
    parser.add_argument("--output", type=Path, required=True, help="The bundle file to write.")
    parser.add_argument("--name", help="The bundle's name (default: the repository's folder name).")
    parser.add_argument(
        "--tag", help="The bundle's version tag (default: the first 12 digits of its hash)."
    )
    parser.add_argument(
        "--git-ref",
        metavar="REF",
        help="Build the repository as this git commit, branch or tag holds it, rather than "
        "its working tree.",
    )
    parser.add_argument(
        "--wheels",
        action="store_true",
        help="Add a wheelhouse: a wheel for every locked requirement and Tiffin's own, so that "
        "the bundle installs with no package index.",
    )
    parser.add_argument(
        "--no-store", action="store_true", help="Do not add the bundle to the local store."
    )
    parser.add_argument(
        "--import-timeout",
        type=float,
        default=IMPORT_TIMEOUT,
        metavar="SECONDS",
        help=f"As for serverctl validate (default: {IMPORT_TIMEOUT:g}).",
    )


def run(args: argparse.Namespace) -> int:
    repository: Path = args.model_repository
    if not args.git_ref:
        return _build(args, repository, None)
    if not repository.is_dir():
        raise ValueError(f"model repository {repository} is not a folder")
    exported, source = export(repository, args.git_ref)
    try:
        return _build(args, exported, source)
    finally:
        shutil.rmtree(exported.parent, ignore_errors=True)


def _build(args: argparse.Namespace, repository: Path, source: Source | None) -> int:
    name = args.name or repository.resolve().name
    for what, value in (("--name", name), ("--tag", args.tag)):
        problem = label_problem(what, value) if value is not None else ""
        if problem:
            raise ValueError(problem)
    with _quiet_logs():
        specs = read_repository(repository)
        verdicts = check_repository(specs, args.import_timeout)
    if not specs:
        raise ValueError(f"{repository} holds no model folders")
    problems = [p for spec in specs for p in verdicts[spec.name].problems]
    if problems:
        raise ValueError(
            f"{repository} does not validate, so it cannot be built "
            f"(serverctl validate {repository} lists every problem); first: {problems[0]}"
        )
    for spec in specs:
        for lacking in verdicts[spec.name].environment:
            print(f"warning: {lacking.splitlines()[0]}")
    backends = sorted(
        {
            v.config.backend
            for spec in specs
            for v in spec.versions
            if v.config is not None and v.config.pipeline is None and v.config.backend
        }
    )
    requirement_files = sorted(
        path
        for spec in specs
        if any(v.config is not None and v.config.backend == "python" for v in spec.versions)
        for path in [
            spec.path / REQUIREMENTS_FILE,
            *(v.path / REQUIREMENTS_FILE for v in spec.versions),
        ]
        if path.is_file()
    )
    manifest = build_bundle(
        args.output,
        name,
        args.tag or "",
        repository,
        [spec.path for spec in specs],
        backends,
        requirement_files,
        wheels=args.wheels,
        source=source,
    )
    size = args.output.stat().st_size
    print(
        f"built {manifest.name}:{manifest.tag} ({len(manifest.files) + 1} files, "
        f"{size / 1e6:.1f} MB) -> {args.output}\ncontent sha256 {manifest.content_hash}"
    )
    if not args.no_store:
        entry = BundleStore().add(args.output)
        print(f"stored in {entry.path.parent.parent} as {entry.name}:{entry.tag}")
    return 0
